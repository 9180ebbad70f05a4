"""How fast report's HTML page opens: Chromium's own paint timings, headless.

Renders a recording's page (`kvmlockprof report --format html`) and loads it --runs
times in headless Chromium with its startup trace on (a screenshot taken, real time),
beside a one-line page the same way (the browser's own floor). From each trace, the
page frame's first contentful paint, largest contentful paint (its last candidate:
the plots drawn) and load event, from its navigationStart. Prints the median and range
of each; writes JSON (bench/results/html-paint.json).
Example: python bench/html_paint.py demo.parquet
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import RESULTS, save

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kvmlockprof  # noqa: E402
from kvmlockprof.views import html  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,2400",
         "--trace-startup=loading,devtools.timeline,blink.user_timing",
         "--trace-startup-format=json", "--trace-startup-duration=8"]
MARKS = ("firstContentfulPaint", "largestContentfulPaint::Candidate", "loadEventEnd")


def timings(chromium, page, d):
    """ms from the page's navigationStart to its first contentful paint, its last
    largest-contentful-paint candidate and its load event's end (Chromium's trace)."""
    trace, shot = d / "trace.json", d / "shot.png"
    subprocess.run([chromium, *FLAGS, f"--user-data-dir={d / 'profile'}",
                    f"--trace-startup-file={trace}", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, text=True, timeout=120)
    events = json.load(open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    nav = next((e for e in events if e.get("name") == "navigationStart" and
                ((e.get("args") or {}).get("data") or {}).get("documentLoaderURL") ==
                page.as_uri()), None)
    if nav is None:
        raise RuntimeError(f"no navigation to {page} in Chromium's trace")
    mine = [e for e in events if (e.get("args") or {}).get("frame") == nav["args"]["frame"]
            and e["ts"] >= nav["ts"]]
    out = {}
    for mark in MARKS:          # (the first paint and load, the last LCP candidate)
        ts = [e["ts"] for e in mine if e["name"] == mark]
        if ts:
            out[mark] = ((max(ts) if "Candidate" in mark else min(ts)) - nav["ts"]) / 1e3
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recording")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "html-paint.json"))
    a = ap.parse_args()
    chromium = shutil.which("chromium")
    if not chromium:
        sys.exit("no chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        text = html.render(kvmlockprof.load(a.recording))
        pages = {"report": d / "report.html", "empty": d / "empty.html"}
        pages["report"].write_text(text)
        pages["empty"].write_text("<html><body><p>kvmlockprof</p></body></html>")
        result = {"recording": os.path.basename(a.recording), "page_bytes": len(text.encode()),
                  "runs": a.runs, "pages": {}}
        for name, page in pages.items():
            runs = []
            for i in range(a.runs):
                (d / f"{name}-{i}").mkdir()
                runs.append(timings(chromium, page, d / f"{name}-{i}"))
            result["pages"][name] = runs
            for key in MARKS:
                v = [r[key] for r in runs if key in r]
                if v:
                    print(f"{name:<7} {key.split(':')[0]:<23} median "
                          f"{statistics.median(v):7.0f} ms [{min(v):.0f}, {max(v):.0f}] "
                          f"({len(v)} runs)")
        print(f"page: {result['page_bytes'] / 1e6:.1f} MB")
    save(result, a.output)


if __name__ == "__main__":
    main()
