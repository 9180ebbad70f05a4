"""A probe is a vertical slice: its C file and one module, registered with the
catalog, reach the loader, report, HTML, compare and top without an edit
anywhere else; and every constant the two sides share is stated once, in the C."""
import importlib.util
import re

import numpy as np
import pandas as pd
import pytest
import click
from click.testing import CliRunner

import kvmlockprof
from kvmlockprof import catalog, cdefs, cli
from kvmlockprof.analysis import locks as analysis, compare
from kvmlockprof.probes import functions
from kvmlockprof.recording.arrow import to_arrow
from kvmlockprof.recording.store import RecordingError, Writer
from kvmlockprof.views import html, report, top

TOY_C = """
/* toy: a function's latency, streamed. */
enum toy_counter { TOY_C_CALLS, TOY_C_LOST_RINGBUF_FULL };
enum toy_result { TOY_OK, TOY_FAILED };
struct toy_event { u64 kvm; u64 lat_ns; u32 result; u32 pad; };
BPF_RINGBUF_OUTPUT(toy_events, 1);
"""

TOY_PY = '''
import pandas as pd
from kvmlockprof import cdefs
from kvmlockprof.catalog import FENTRY, KPROBE, Probe, Section, Target

C = {c_path!r}
RESULTS = cdefs.labels(C, "toy_result", {{"TOY_OK": "ok", "TOY_FAILED": "failed"}})


def per_vm(rec):
    df = rec.table("toy")
    if df.empty:
        return df
    df = df.assign(result=df["result"].map(RESULTS))
    g = df.groupby(["kvm", "result"])["lat_ns"]
    return pd.DataFrame({{"count": g.size(), "mean_ns": g.mean()}}).reset_index()


def figure(rec):
    import plotly.express as px
    df = per_vm(rec)
    return None if df.empty else px.bar(df, x="result", y="count")


def compare_values(rec):
    df = rec.table("toy")
    return {{}} if df.empty else {{("toy mean latency", "lower", "ns"): float(df["lat_ns"].mean())}}


def top_ratios(batches, snaps):
    ev = batches.get("toy")
    if ev is None or not ev.size:
        return {{}}
    return {{"toy ok": (int((ev["result"] == 0).sum()), int(ev.size), False)}}


PROBE = Probe(
    name="toy", summary="a toy function's latency",
    targets=(Target("TOY", ("toy_function",), (FENTRY, KPROBE), ret=True),),
    bpf=C, tables=("toy",), streams=(("toy_events", "toy"),),
    columns={{"toy": {{"kvm": "n", "lat_ns": "n", "result": "n"}}}},
    sections=(Section("toy", "Toy calls per VM", per_vm, figure, hex=("kvm",)),),
    compare=compare_values, top=top_ratios)
'''


@pytest.fixture
def toy(tmp_path):
    """The toy probe's two files, in a directory of their own, registered."""
    c = tmp_path / "toy.bpf.c"
    c.write_text(TOY_C)
    (tmp_path / "toy_probe.py").write_text(TOY_PY.format(c_path=str(c)))
    spec = importlib.util.spec_from_file_location("toy_probe", tmp_path / "toy_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    catalog.register(mod.PROBE)
    yield mod.PROBE
    catalog.unregister(mod.PROBE)


def toy_recording(path, lat, kvm=0xffff888100000000, columns=None):
    ev = pd.DataFrame({"kvm": np.full(len(lat), kvm, np.uint64),
                       "lat_ns": np.asarray(lat, np.uint64),
                       "result": np.array([i % 2 for i in range(len(lat))], np.uint32)})
    w = Writer(path)
    w.append("toy", to_arrow(ev[columns or list(ev.columns)].to_records(index=False)))
    w.finalize({"format": "kvmlockprof-recording", "version": 1, "probes": {},
                "duration_s": 1.0})
    return kvmlockprof.load(path)


def test_a_toy_probe_reaches_every_view(toy, tmp_path):
    assert toy.counters == ("calls", "lost_ringbuf_full")         # from its C
    rec = toy_recording(tmp_path / "a.parquet", [100, 200, 300, 400])
    text = report.render(rec)
    assert "Toy calls per VM" in text and "0xffff888100000000" in text
    page = html.render(rec)
    assert "Toy calls per VM" in page and "plotly" in page
    new = toy_recording(tmp_path / "b.parquet", [200, 400, 600, 800])
    table = compare.compare([rec], [new])
    row = table[(table["kind"] == "probe") & (table["name"] == "toy mean latency")]
    assert len(row) == 1 and row["ratio"].iloc[0] == pytest.approx(2.0)

    class Source:               # what top reads of the loaded function probes
        plans = {toy: None}
        role = "functions"

        def poll(self):
            return {"toy": np.array([(1, 5, 0, 0), (1, 6, 1, 0)],
                                    [("kvm", "u8"), ("lat_ns", "u8"), ("result", "u4"),
                                     ("pad", "u4")])}

        def counters(self):
            return {"toy": {"calls": 2, "lost_ringbuf_full": 0}}
    t = top.LiveView.__new__(top.LiveView)
    t.sources, t.prev_counters, t.hits = {"functions": Source()}, {}, {}
    lines = t._read_functions(1.0, {})
    assert any("toy ok hit ratio: 50.0%" in line for line in lines), lines
    assert any(line.split()[0] == "toy" and "calls 2/s" in line for line in lines), lines
    out = CliRunner().invoke(cli.main, ["probes"])
    assert out.exit_code == 0 and "a toy function's latency" in out.output


def test_a_toy_probes_c_reaches_the_loader(toy):
    """Its C is inlined into the function probes' module, with its counters laid out
    after the others' and its return handler numbered, from the catalog alone."""
    plans = functions.forced_plans([catalog.BY_NAME["gpc"], toy], catalog.KPROBE)
    assert TOY_C in functions.module_source(plans)
    d = functions.module_defines(plans, None)
    assert d["KVMLP_CBASE_TOY"] == len(catalog.BY_NAME["gpc"].counters)
    assert d["KVMLP_NR_COUNTERS"] == len(catalog.BY_NAME["gpc"].counters) + 2
    assert sorted(v for k, v in d.items() if k.startswith("KVMLP_FN_")) == [1, 2, 3]


def test_a_toy_table_that_lacks_a_column_is_refused(toy, tmp_path):
    rec = toy_recording(tmp_path / "bad.parquet", [1, 2], columns=["kvm", "lat_ns"])
    with pytest.raises(RecordingError, match="lacks column 'result'"):
        rec.table("toy")


# --- constants stated once ---------------------------------------------------------

def test_every_enum_of_the_c_is_read_from_the_c():
    """Each enum in bpf/ is a probe's counters or has labels taken from it (cdefs), and
    the labels cover it (cdefs.labels refuses otherwise)."""
    enums = {(f.name, m.group(1)) for f in cdefs.BPF_DIR.iterdir()
             for m in re.finditer(r"\benum\s+(\w+)\s*\{", f.read_text())}
    counters = {(p.header or p.bpf, f"{p.name}_counter") for p in catalog.CATALOG}
    assert enums - counters <= cdefs.READ, enums - counters - cdefs.READ
    for p in catalog.CATALOG:
        if p.bpf:
            assert p.counters, f"{p.name}: no enum {p.name}_counter in bpf/{p.header or p.bpf}"


def test_counters_and_sentinels_agree_between_c_and_python():
    from kvmlockprof import locktypes
    from kvmlockprof.probes import contention, vgic
    assert contention.COUNTERS == cdefs.counters("contention.h", "contention_counter")
    assert set(contention.LOSSES) - {contention.RECURSION} <= set(contention.COUNTERS)
    assert analysis.NO_STACK == cdefs.define("contention.h", "KVMLP_NO_STACK") < 0
    assert locktypes.LCB_F_MUTEX == cdefs.define("contention.h", "KVMLP_LCB_F_MUTEX")
    # the C's copy of the kernel's include/trace/events/lock.h
    assert [getattr(locktypes, f"LCB_F_{f}") for f in ("SPIN", "READ", "WRITE", "RT",
                                                        "PERCPU", "MUTEX")] == \
        [1 << i for i in range(6)]
    assert vgic.MIN_LPI == 8192 and vgic.INTID_UNKNOWN == 0xffffffff


def test_a_c_constant_with_no_python_reader_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(cdefs, "BPF_DIR", tmp_path)
    (tmp_path / "x.bpf.c").write_text("enum x_kind { X_A, X_B = 4, X_C };\n"
                                      "#define X_BIT (1U << 5)\n")
    cdefs._text.cache_clear()
    try:
        assert cdefs.enum("x.bpf.c", "x_kind") == {"X_A": 0, "X_B": 4, "X_C": 5}
        assert cdefs.define("x.bpf.c", "X_BIT") == 32
        with pytest.raises(cdefs.CDefsError, match="unlabelled.*X_C"):
            cdefs.labels("x.bpf.c", "x_kind", {"X_A": "a", "X_B": "b"})
        with pytest.raises(cdefs.CDefsError, match="not in the C.*X_D"):
            cdefs.labels("x.bpf.c", "x_kind", {"X_A": "a", "X_B": "b", "X_C": "c", "X_D": "d"})
    finally:
        cdefs._text.cache_clear()


# --- one meaning per flag, one default per knob ------------------------------------

def _options(command):
    return [p for p in command.params if isinstance(p, click.Option)]


def test_a_short_flag_means_the_same_in_every_command():
    meaning = {}
    for name, command in cli.main.commands.items():
        for opt in _options(command):
            longs = sorted(o for o in opt.opts if o.startswith("--"))
            for short in (o for o in opt.opts if not o.startswith("--")):
                meaning.setdefault(short, {}).setdefault(longs[0], []).append(name)
    clashes = {s: m for s, m in meaning.items() if len(m) > 1}
    assert not clashes, clashes
    assert set(meaning["-o"]) == {"--output"} and set(meaning["-n"]) == {"--limit"}


def test_the_python_api_defaults_are_the_clis():
    """A command run without options and the Python API open the same session."""
    from kvmlockprof.probes.sources import SessionOptions
    for name in ("record", "top", "exporter"):
        defaults = cli.main.commands[name].make_context(name, []).params
        assert SessionOptions.from_kwargs(defaults) == SessionOptions(), name


def test_every_kprobe_program_has_a_name_of_its_own_in_the_kernel():
    """The kernel keeps 15 characters of a program's name (bpftool prog shows them):
    each target's kprobe and kretprobe handler must stay told apart there."""
    plans = functions.forced_plans([p for p in catalog.CATALOG if p.bpf and
                                    p.targets[0].methods != (catalog.TRACEPOINT,)],
                                   catalog.KPROBE)
    fp = functions.FunctionProbes.__new__(functions.FunctionProbes)
    fp.plans = plans
    names = [fn for p in plans for fn, _, _ in fp.kprobe_functions(p)]
    short = [n[:15] for n in names]
    assert len(set(short)) == len(short), sorted(n for n in names if short.count(n[:15]) > 1)
    assert all(n.startswith("kvmlp_") for n in names)
