"""Export formats opened by a real viewer: speedscope (npm, `make viewers`) in headless
Chromium imports `report --format folded`, and its sandwich view's table (the weight of
each frame, by speedscope's own parser) must give each lock the wait time the report
shows."""
import base64
import html
import json
import os
import re
import shutil
import subprocess

import pytest

import kvmlockprof
from kvmlockprof.analysis import locks as analysis
from kvmlockprof.views import folded
from test_html_chromium import FLAGS as CHROMIUM_FLAGS
from tests_support import small_recording

SPEEDSCOPE = "/var/cache/kvmlockprof/speedscope-1.25.0/package/dist/release/index.html"
# the HTML test's Chromium flags, with a longer budget, file access for the loader, the DOM
FLAGS = [f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time-budget")] + [
    "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom"]


@pytest.fixture(scope="module")
def viewer():
    chromium = shutil.which("chromium")
    missing = [what for what, ok in (("chromium", chromium),
                                     ("speedscope (make viewers)", os.path.exists(SPEEDSCOPE)))
               if not ok]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(missing)} missing in CI (make test installs them)")
        pytest.skip(f"{', '.join(missing)} not installed")
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
    first = {x.rsplit(" ", 1)[0]: int(x.rsplit(" ", 1)[1]) for x in folded.text(rec).splitlines()}
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
