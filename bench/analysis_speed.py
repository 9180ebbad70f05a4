"""Analysis speed: `report` and `compare` on a 10M-sample recording.

The big recording is built from a real one: record the built-in workload once
(--source, or a fresh 5 s memslot-churn recording), then repeat its samples
with shifted timestamps until --samples rows, and scale its aggregates by the
same factor. Its contents are a real recording's, many times over; what is
measured is the time of the commands a user runs on it.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

import kvmlockprof
from kvmlockprof.recording.store import Writer

from results_io import RESULTS, save      # bench/ is on sys.path when run as a script

KLP = [sys.executable, "-m", "kvmlockprof"]


def grow(src, out, samples, seed):
    """A recording of `samples` rows from the real recording `src`."""
    rec = kvmlockprof.load(src)
    base = pa.Table.from_pandas(rec.samples, preserve_index=False)
    n = base.num_rows
    reps = -(-samples // n)
    span = int(base.column("ts_ns").to_numpy().max() - base.column("ts_ns").to_numpy().min()) + 1
    rng = np.random.default_rng(seed)
    w = Writer(out)
    written = 0
    for i in range(reps):
        t = base.slice(0, min(n, samples - written))
        ts = t.column("ts_ns").to_numpy() + np.uint64(i * span)
        # jitter the waits a little so the two sides of compare are not identical
        wait = (t.column("wait_ns").to_numpy() *
                rng.uniform(0.95, 1.05, t.num_rows)).astype(np.uint64)
        t = t.set_column(t.schema.get_field_index("ts_ns"), "ts_ns", pa.array(ts))
        t = t.set_column(t.schema.get_field_index("wait_ns"), "wait_ns", pa.array(wait))
        w.append("contention", t)
        written += t.num_rows
    aggs = rec.aggregates.copy()
    for c in ("count", "total_ns"):
        aggs[c] = aggs[c] * reps
    aggs["hist"] = [np.asarray(h) * reps for h in aggs["hist"]]
    w.snapshot("aggregates", pa.Table.from_pandas(aggs, preserve_index=False))
    w.append("stacks", pa.Table.from_pandas(rec.stacks, preserve_index=False))
    m = dict(rec.manifest)
    m.update(samples=written, duration_s=m["duration_s"] * reps,
             counters={k: v * reps for k, v in m["counters"].items()})
    if m.get("work"):
        m["work"] = {k: (v * reps if isinstance(v, int) and k != "pid" and k != "vcpus" else v)
                     for k, v in m["work"].items()}
    w.finalize(m)
    return written


def timed(argv, repeat=3):
    """(median wall time of `repeat` runs (this host's page-fault time varies 2x),
    largest resident set size in MiB, the kernel's count for the process)."""
    times, rss = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            raise SystemExit(f"{' '.join(argv)} failed:\n{err.decode()}")
        times.append(time.perf_counter() - t)
        rss = max(rss, usage.ru_maxrss / 1024)
    return sorted(times)[len(times) // 2], rss


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10_000_000)
    ap.add_argument("--source", help="A real recording to grow (default: record one now).")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each report command")
    ap.add_argument("--keep", metavar="DIR", help="build the recordings in DIR and keep "
                    "them (a 100 M-sample one is 0.9 GB and takes minutes to build)")
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "analysis.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        d = a.keep or tmp
        os.makedirs(d, exist_ok=True)
        src = a.source
        if not src:
            src = os.path.join(d, "src.parquet")
            subprocess.run(KLP + ["record", "-q", "-f", "-o", src, "--"] + KLP +
                           ["workload", "--duration", "5", "--churn"], check=True,
                           stdout=subprocess.DEVNULL)
        paths = [os.path.join(d, f"{s}-{a.samples}.parquet") for s in ("base", "new")]
        t = time.perf_counter()
        rows = [kvmlockprof.load(p).manifest["samples"] if a.keep and os.path.exists(p)
                else grow(src, p, a.samples, seed) for seed, p in enumerate(paths)]
        build = time.perf_counter() - t
        size = os.path.getsize(paths[0])
        runs = {"report": timed(KLP + ["report", paths[0]], a.repeat),
                "report --by caller --stacks": timed(KLP + ["report", paths[0], "--by",
                                                            "caller", "--stacks"], a.repeat),
                "compare (one run per side)": timed(KLP + ["compare", paths[0], paths[1]],
                                                    repeat=1)}
    res = {"samples": rows[0], "file_bytes": size, "build_s": build,
           "seconds": {k: t for k, (t, _) in runs.items()},
           "max_rss_mib": {k: m for k, (_, m) in runs.items()}}
    print(f"recording: {rows[0]:,} samples, {size / 2**20:.0f} MiB (built in {build:.0f} s); "
          f"times: median of {a.repeat} runs (compare: 1)")
    for k, (t, m) in runs.items():
        print(f"{k:<32} {t:6.2f} s  {m:6.0f} MiB")
    print(f"target report <= 5 s: {'met' if runs['report'][0] <= 5 else 'NOT met'}")
    save(res, a.output)


if __name__ == "__main__":
    main()
