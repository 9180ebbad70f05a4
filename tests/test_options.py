"""Options objects: a setting is declared once (kvmlockprof/options.py) and reaches the
command line, its checks and the BPF from there."""
import dataclasses

import click
import pytest
from click.testing import CliRunner

from kvmlockprof import catalog, cdefs, cli, options
from kvmlockprof.kernel import bpfload
from kvmlockprof.options import OptionError, knob
from kvmlockprof.probes import contention
from kvmlockprof.probes.contention import ContentionOptions, ContentionProbe
from kvmlockprof.probes.sources import SessionOptions
from kvmlockprof.cdefs import BPF_DIR


class Loaded(Exception):
    """Raised by a stand-in compile_bpf: what the C would be built with, no BPF."""


def _capture_defines(monkeypatch):
    got = {}

    def compile_bpf(source=None, text=None, defines=None, headers=None, cache=False):
        got.update(defines or {})
        raise Loaded()
    monkeypatch.setattr(bpfload, "compile_bpf", compile_bpf)
    return got


def test_a_new_option_is_one_field(monkeypatch):
    """A knob added to the contention probe's options (here by a subclass) is a command-
    line option with its range checked, and reaches the C's build without another
    line anywhere."""
    Extended = dataclasses.make_dataclass(
        "Extended", [("test_knob", int, knob(3, "--test-knob", min=1, max=9,
                                             define="KVMLP_TEST_KNOB", help="a test"))],
        bases=(ContentionOptions,), frozen=True)
    got_opts = {}

    @click.command()
    @options.click_options(Extended)
    def cmd(**kw):
        got_opts["o"] = options.from_kwargs(Extended, kw)
        assert not kw, "every parameter is an option's"
    r = CliRunner().invoke(cmd, ["--test-knob", "7", "--max-stack", "9"])
    assert r.exit_code == 0, r.output
    o = got_opts["o"]
    assert (o.test_knob, o.max_stack, o.sample_every) == (7, 9, contention.SAMPLE_EVERY)
    r = CliRunner().invoke(cmd, ["--test-knob", "12"])
    assert r.exit_code == 2 and "1<=x<=9" in r.output
    with pytest.raises(OptionError, match="--test-knob must be 1..9"):
        Extended(test_knob=0)                       # the Python API checks it too
    monkeypatch.setattr(contention, "vcpu_exit_tracepoints", lambda: (0, None))
    defines = _capture_defines(monkeypatch)
    with pytest.raises(Loaded):
        ContentionProbe(o)
    assert defines["KVMLP_TEST_KNOB"] == 7 and defines["KVMLP_STACK_DEPTH"] == 9


def test_runtime_knobs_are_fields_the_c_reads():
    """A bpf= knob is written into `armed` at load: the C's struct kvmlp_arm must have
    the field (a ctypes struct would silently take an unknown attribute)."""
    c = open(f"{BPF_DIR}/contention.bpf.c").read()
    fields = {f[0] for f in cdefs.struct_fields("contention.bpf.c", "kvmlp_arm")}
    runtime = {k["bpf"] for _, k in options.knobs(ContentionOptions) if k["bpf"]}
    assert runtime == {"sample_every", "stack_every"}
    assert runtime <= fields
    for name in runtime:            # and no define of the same setting is left
        assert f"KVMLP_{name.upper()}" not in c


def test_every_option_is_on_the_commands_that_take_it():
    """record takes every knob with flags (its own, the session's, every probe's);
    top and exporter the ones they name; none is declared twice."""
    classes = [ContentionOptions, SessionOptions] + [p.options for p in catalog.CATALOG
                                                     if p.options]
    dests = [k["dest"] or f.name for c in classes for f, k in options.knobs(c) if k["flags"]]
    assert len(dests) == len(set(dests))
    record = {p.name for p in cli.record.params}
    assert set(dests) <= record
    top = {p.name for p in cli.top.params}
    assert {"stack_budget", "vcpu_exits", "probe_names", "prefer", "kernel_mem_mb"} <= top
    assert "sample_every" not in top
    assert {"map_nr_entries", "stack_budget"} <= {p.name for p in cli.exporter.params}


def test_the_options_reach_the_contention_probe(monkeypatch, tmp_path):
    """record's options arrive at ContentionProbe as one object, unchanged; the
    live session's fixed ones (no samples) replace only theirs."""
    from kvmlockprof.kernel import host
    from kvmlockprof.recording import recorder, session
    got = []

    class Stop(bpfload.BpfUnavailable):
        pass

    def probe(opts, tgids=None, kfilter=None, offsets=None, cache=False):
        got.append((opts, tgids))
        raise Stop("stopped here")
    monkeypatch.setattr("kvmlockprof.probes.sources.ContentionProbe", probe)
    # (loaded here, not in the loader child: `got` is this process's)
    monkeypatch.setattr("kvmlockprof.kernel.handover.run", lambda load, fds: load())
    monkeypatch.setattr(recorder, "load_btf", lambda warn: (None, "no BTF in this test"))
    monkeypatch.setattr(session, "load_btf", lambda warn: (None, "no BTF in this test"))
    monkeypatch.setattr(host, "can_bpf", lambda: True)
    r = CliRunner().invoke(cli.main, [
        "record", "-o", str(tmp_path / "r.parquet"), "-d", "1", "--probes", "contention",
        "--sample-every", "3", "--max-stack", "9", "-M", "2048", "--stack-budget", "0",
        "-p", "1"])
    assert r.exit_code == 1 and "stopped here" in r.output, r.output
    opts, tgids = got[0]
    assert opts == ContentionOptions(sample_every=3, max_stack=9, map_entries=2048,
                                     stack_budget=0)
    assert tgids == [1]
    s = SessionOptions(probes=("contention",), contention=ContentionOptions(stack_budget=7))
    with pytest.raises(Stop):
        with session.live_session(lambda *a: None, s, None, print):
            pass
    assert got[1][0] == ContentionOptions(stack_budget=7, sample_every=0, ringbuf_mb=1)


def test_an_option_out_of_range_fails_before_anything_loads(tmp_path):
    r = CliRunner().invoke(cli.main, ["record", "-o", str(tmp_path / "r.parquet"),
                                      "--max-stack", "500"])
    assert r.exit_code == 2 and "--max-stack" in r.output
    r = CliRunner().invoke(cli.main, ["record", "-o", str(tmp_path / "r.parquet"),
                                      "--srcu-at", "a,b,c,d,e", "--probes", "lockorder"])
    assert r.exit_code == 1 and "--srcu-at takes at most 4" in r.output
    r = CliRunner().invoke(cli.main, ["record", "-o", str(tmp_path / "r.parquet"),
                                      "--srcu-at", "kvm_gpc_check"])
    assert r.exit_code == 1 and "--srcu-at is the lockorder probe's" in r.output
    assert not (tmp_path / "r.parquet").exists()
