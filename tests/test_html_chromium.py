"""The HTML report in a real headless Chromium: it renders with no JavaScript
errors and the screenshot holds the plots (CI installs Debian's chromium)."""
import os
import shutil
import subprocess

import pytest

import kvmlockprof
from kvmlockprof.views import html
from tests_support import small_recording

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("chromium missing in CI (make setup installs Debian's chromium)")
        pytest.skip("chromium is not installed")
    return path


def render(chromium, page, tmp_path):
    """Load the page in headless Chromium: (console errors, screenshot path)."""
    shot = tmp_path / (page.stem + ".png")
    p = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                        "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    return [line for line in p.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line], \
        shot


def test_page_renders_without_js_errors(chromium, tmp_path):
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    page = tmp_path / "r.html"
    page.write_text(html.render(rec))
    console, shot = render(chromium, page, tmp_path)
    assert not console, console
    assert shot.exists() and shot.stat().st_size > 30_000      # plots drawn, not a blank page


def rendered_text(chromium, page, tmp_path, figure):
    """The page's DOM after its scripts ran (Chromium's --dump-dom): the text of every
    SVG <text> element plotly drew in the figure that holds the text `figure`,
    unescaped."""
    import html as h
    import re
    p = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile-dom'}",
                        "--window-size=1280,2400", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    figures = p.stdout.split('class="plotly-graph-div')[1:]
    texts = [[h.unescape(re.sub(r"<[^>]+>", "", t))
              for t in re.findall(r"<text\b[^>]*>(.*?)</text>", f, re.S)] for f in figures]
    return next((t for t in texts if figure in t), [])


def test_the_histogram_draws_every_top_lock(chromium, tmp_path):
    """The drawn histogram (not the figure we built): every lock of the report's top
    eight by wait time is a label Chromium drew in it, and there is a bucket label drawn for each
    power of two the waits' times fall in (the recording's own waits, log2 by numpy)."""
    import re
    import numpy as np
    from kvmlockprof.analysis import locks
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    page = tmp_path / "r.html"
    page.write_text(html.render(rec))
    drawn = set(rendered_text(chromium, page, tmp_path, "wait (log2 bucket)"))
    top = [str(x) for x in locks.top(rec, by="lock").head(8)["lock"]]
    assert top and not [x for x in top if x not in drawn], (top, sorted(drawn)[:60])
    s = rec.samples
    powers = set(np.floor(np.log2(s["wait_ns"].to_numpy(dtype=float))).astype(int))
    buckets = {t for t in drawn if re.fullmatch(r"\d+( \w+)?-\d+ (ns|us|ms|s)", t)}
    assert len(buckets) == len(powers), (sorted(buckets), sorted(powers))


def test_compare_page_renders(chromium, tmp_path):
    from kvmlockprof.analysis import compare
    from kvmlockprof.views import compare_report
    rows = [(w, 0x1000, 7, 32, 1) for w in range(100, 400)] + \
        [(w, 0x2000, 7, 1, 2) for w in range(50, 150)]
    slower = [(w * 2, lock, t, f, s) for w, lock, t, f, s in rows]
    base = [kvmlockprof.load(small_recording(tmp_path / "b.parquet", rows))]
    new = [kvmlockprof.load(small_recording(tmp_path / "n.parquet", slower))]
    df = compare.compare(base, new)
    assert set(df.loc[df["metric"] == "mean wait", "verdict"]) == {"regressed"}
    page = tmp_path / "cmp.html"
    page.write_text(compare_report.page(df, base, new, [], 0.05))
    console, shot = render(chromium, page, tmp_path)
    assert not console, console
    assert shot.exists() and shot.stat().st_size > 30_000


def test_page_reads_like_a_report(tmp_path):
    """Times carry their unit (not a `_ns` column of numbers), flags are the text
    report's marks, and a probe that did not attach is one collapsed line."""
    from kvmlockprof.recording.arrow import to_arrow
    from kvmlockprof.recording.store import Writer
    from tests_support import ROWS, aggregates_of, events, sample_manifest, sample_stacks
    ev = events(ROWS)
    w = Writer(tmp_path / "g.parquet")
    w.append("contention", to_arrow(ev))
    w.append("stacks", sample_stacks())
    w.snapshot("aggregates", to_arrow(aggregates_of(ev)))
    m = sample_manifest(len(ev))
    m["probes"]["gpc"] = {"status": "unavailable",
                          "reason": "kvm_gpc_refresh: kprobe: no kprobes here"}
    w.finalize(m)
    page = html.render(kvmlockprof.load(tmp_path / "g.parquet"))
    assert "total_ns" not in page and "<th>total</th>" in page and " us</td>" in page
    assert "<td>K</td>" in page and "<td>True</td>" not in page
    assert "<details><summary>probe gpc: unavailable</summary>kvm_gpc_refresh: kprobe: " \
           "no kprobes here</details>" in page


def test_compare_page_shows_flagged_distributions_side_by_side(chromium, tmp_path):
    """Every wait twice as long on NEW: the flagged lock's two distributions are drawn,
    NEW's mass a bucket to the right of BASE's (the made-up waits set it)."""
    import numpy as np
    from kvmlockprof.analysis import compare
    from kvmlockprof.views import compare_report, plots
    rows = [(w, 0x1000, 7, 32, 1) for w in range(1100, 1900, 4)]       # all in [1024, 2048)
    slower = [(w * 2, lock, t, f, s) for w, lock, t, f, s in rows]     # all in [2048, 4096)
    base = [kvmlockprof.load(small_recording(tmp_path / "b.parquet", rows))]
    new = [kvmlockprof.load(small_recording(tmp_path / "n.parquet", slower))]
    for r in base + new:                # (a named lock: a bare address has no row drawn)
        r.manifest["lock_names"] = {"0x1000": {"name": "kvm(7)->slots_lock"}}
    df = compare.compare(base, new)
    fig = plots.compare_distributions(df, base, new)
    assert fig is not None
    bars = {t.name: dict(zip(t.x, np.asarray(t.customdata))) for t in fig.data}
    assert bars == {"BASE": {"1-2 us": len(rows)}, "NEW": {"2-4 us": len(rows)}}
    page = tmp_path / "cmp.html"
    page.write_text(compare_report.page(df, base, new, [], 0.05))
    assert "side by side" in page.read_text()
    console, shot = render(chromium, page, tmp_path)
    assert not console, console
    assert shot.stat().st_size > 30_000
