"""A long recording: record's memory, CPU and chunk files over time, then what
`report` takes to read the result.

record runs the built-in workload (memslot churn at a fixed rate) for --seconds;
every 10 s this samples record's resident memory and CPU time (/proc: the
kernel's accounting) and the files in its .partial directory. Then `report` reads
the recording, its peak RSS taken from the kernel (getrusage of the child).
"""
import argparse
import os
import subprocess
import sys
import time

import kvmlockprof

from results_io import RESULTS, save      # bench/ is on sys.path when run as a script

KLP = [sys.executable, "-m", "kvmlockprof"]


def sample(pid, partial):
    """(VmRSS, RssAnon) in kB, CPU seconds, files in .partial."""
    with open(f"/proc/{pid}/status") as f:
        st = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
              if k in ("VmRSS", "RssAnon")}
    rss = (st["VmRSS"], st.get("RssAnon")) if "VmRSS" in st else None
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, cpu, len(os.listdir(partial))


def slope(series, key):
    """MiB an hour of series[key] (kB) against t (s), least squares; NaN if too short."""
    pts = [(s["t"], s[key]) for s in series if s.get(key) is not None]
    if len(pts) < 3:
        return float("nan")
    n = len(pts)
    mt, mv = sum(t for t, _ in pts) / n, sum(v for _, v in pts) / n
    b = sum((t - mt) * (v - mv) for t, v in pts) / sum((t - mt) ** 2 for t, _ in pts)
    return b * 3600 / 1024


def peak_rss_kb(argv):
    """Run argv; its peak RSS, from a process whose only child it is (getrusage)."""
    out = subprocess.run([sys.executable, "-c", (
        "import resource, subprocess, sys; "
        f"subprocess.run({argv!r}, check=True, stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")],
        check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3600)
    ap.add_argument("--workload", default="--vcpus 2 --churn --churn-rate 250")
    ap.add_argument("--out", default="/var/tmp/kvmlockprof-soak.parquet")
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "soak.json"))
    a = ap.parse_args()
    p = subprocess.Popen(KLP + ["record", "-q", "-f", "-o", a.out, "--"] + KLP +
                         ["workload", "--duration", str(a.seconds)] + a.workload.split(),
                         stdout=subprocess.DEVNULL)
    series = []
    t0 = time.monotonic()
    while p.poll() is None:
        time.sleep(10)
        try:
            rss, cpu, files = sample(p.pid, a.out + ".partial")
        except (OSError, StopIteration):
            continue
        if rss:
            series.append({"t": time.monotonic() - t0, "rss_kb": rss[0], "anon_kb": rss[1],
                           "cpu_s": cpu, "files": files})
    assert p.wait() == 0, "record failed"
    t = time.monotonic()
    report_rss = peak_rss_kb(KLP + ["report", a.out, "--limit", "20"])
    report_s = time.monotonic() - t
    rec = kvmlockprof.load(a.out)
    first = next(s for s in series if s["t"] >= 30)
    last = series[-1]
    res = {"seconds": a.seconds, "workload": a.workload, "series": series,
           "samples": rec.manifest["samples"], "file_mb": os.path.getsize(a.out) / 2**20,
           "rss_mb_at_30s": first["rss_kb"] / 1024, "rss_mb_end": last["rss_kb"] / 1024,
           "record_cpu_share": (last["cpu_s"] - first["cpu_s"]) / (last["t"] - first["t"]),
           # the resident memory's trend after start-up, MiB an hour (least squares)
           "rss_mb_per_h": slope([s for s in series if s["t"] >= 300], "rss_kb"),
           "anon_mb_per_h": slope([s for s in series if s["t"] >= 300], "anon_kb"),
           "max_files": max(s["files"] for s in series),
           "report_s": report_s,
           "report_peak_rss_mb": report_rss / 1024}
    print(f"record {a.seconds:.0f} s of `workload {a.workload}`: {res['samples']} samples, "
          f"{res['file_mb']:.0f} MB file")
    print(f"  record RSS {res['rss_mb_at_30s']:.0f} MiB at 30 s -> {res['rss_mb_end']:.0f} MiB "
          f"at the end (after 5 min: {res['rss_mb_per_h']:+.1f} MiB/h, anonymous "
          f"{res['anon_mb_per_h']:+.1f} MiB/h); CPU {res['record_cpu_share']:.1%} of one CPU; "
          f"at most {res['max_files']} files in .partial")
    print(f"  report: {report_s:.1f} s, peak RSS {res['report_peak_rss_mb']:.0f} MiB")
    save(res, a.output)


if __name__ == "__main__":
    main()
