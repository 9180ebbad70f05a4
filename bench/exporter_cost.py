"""The exporter's own CPU and memory while it serves ~1k lock series, scraped every
second as Prometheus would (bench/README.md, "Exporter").

synthetic (default): the exporter's read path (ExporterSession.read: the aggregates'
  increases, names, labels, counters, the snapshot) and its HTTP server, in a process
  of its own, fed by a stand-in for the contention probe whose aggregate map holds
  --locks x --procs entries, every one growing at each read (--procs live sleeper
  processes named vm0.. as QEMU's -name names a VM): --locks x --procs series.
live: the real `kvmlockprof exporter` (BPF), beside the built-in workload with --vms
  VMs churning memslots: as many series as that contends.
Either way the exporter's /proc/PID/stat (utime+stime) and status (VmRSS, VmHWM) are
read every second over --seconds, after --warmup."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import RESULTS, save  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


class FakeContention:
    """What ExporterSession reads of the contention probe, with a map of `locks`
    addresses x the given tgids, each entry's count growing at every read."""

    role = "waits"

    def run_queues_or_none(self, warn=None):
        return {}

    def lock_kinds(self):
        return {}

    def __init__(self, locks, tgids, seed=0):
        import pyarrow as pa
        self.pa = pa
        self.rng = np.random.default_rng(seed)
        addr = 0xffff888100000000 + 64 * np.arange(locks, dtype=np.uint64)
        self.lock_addr = np.repeat(addr, len(tgids))
        self.tgid = np.tile(np.asarray(tgids, np.uint32), locks)
        n = len(self.lock_addr)
        self.count = np.zeros(n, np.uint64)
        self.total = np.zeros(n, np.uint64)
        self.hist = np.zeros((n, 64), np.uint64)
        self.options = {"agg_entries": 16384}
        self.bpf = {}

    def poll(self):
        return {}

    def snapshots(self):
        n = len(self.count)
        more = self.rng.integers(1, 100, n).astype(np.uint64)
        slot = self.rng.integers(8, 24, n)
        self.count += more
        self.total += more * (np.uint64(1) << slot.astype(np.uint64))
        self.hist[np.arange(n), slot] += more
        pa = self.pa
        return {"aggregates": pa.table({
            "lock_addr": pa.array(self.lock_addr), "tgid": pa.array(self.tgid),
            "flags": pa.array(np.full(n, 32, np.uint32)),          # mutex
            "stack_id": pa.array(np.full(n, -1000, np.int32)),     # no stack walked
            "count": pa.array(self.count), "total_ns": pa.array(self.total),
            "max_ns": pa.array(self.total), "min_ns": pa.array(self.total),
            "hist": pa.FixedSizeListArray.from_arrays(pa.array(self.hist.ravel()), 64)
            .cast(pa.list_(pa.uint64()))})}

    def counters(self):
        return {"end": int(self.count.sum()), "lost_agg_full": 0}


def serve_synthetic(args):
    """The child: the exporter's read path and server over the stand-in source."""
    from kvmlockprof.views import exporter as exp
    tgids = [int(t) for t in args.tgids.split(",")]
    src = FakeContention(args.locks, tgids)
    status = {"contention": {"status": "attached", "method": "raw_tracepoint"}}
    session = exp.ExporterSession({"contention": src}, status, top_locks=args.locks,
                                  top_vms=len(tgids), kbtf=None, filters={})
    server, _ = exp.serve(session.collector, args.listen)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    next_read = time.monotonic()
    while True:
        session.read()
        next_read += args.interval
        time.sleep(max(0.0, next_read - time.monotonic()))


def proc_sample(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK        # utime + stime
    mem = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                mem[k] = int(v.split()[0]) / 1024           # MiB
    return cpu, mem


def scrape(url):
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
    return time.monotonic() - t0, body


def measure(pid, url, seconds, warmup, scrape_every):
    """Scrape every scrape_every s; CPU and RSS of pid over `seconds` after warmup."""
    t_end = time.monotonic() + warmup + seconds
    t_measure = time.monotonic() + warmup
    cpu0 = wall0 = None
    rss, scrapes, body = [], [], b""
    while time.monotonic() < t_end:
        dt, body = scrape(url)
        now = time.monotonic()
        if now >= t_measure:
            if cpu0 is None:
                cpu0, mem = proc_sample(pid)
                wall0 = now
            scrapes.append(dt)
            rss.append(proc_sample(pid)[1]["VmRSS"])
        time.sleep(max(0.0, scrape_every - (time.monotonic() - now)))
    cpu1, mem = proc_sample(pid)
    wall = time.monotonic() - wall0
    text = body.decode()
    series = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    lock_series = {ln.split(" ")[0] for ln in series
                   if ln.startswith("kvmlockprof_lock_waits_total{")}
    return {"cpu_percent": 100 * (cpu1 - cpu0) / wall, "cpu_s": cpu1 - cpu0, "wall_s": wall,
            "rss_mib_first": rss[0], "rss_mib_last": rss[-1], "rss_mib_max": max(rss),
            "vm_hwm_mib": mem["VmHWM"], "scrapes": len(scrapes),
            "scrape_ms_median": 1000 * float(np.median(scrapes)),
            "scrape_ms_max": 1000 * max(scrapes), "metrics_bytes": len(body),
            "samples": len(series), "lock_series": len(lock_series)}


def wait_http(url, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the exporter exited ({proc.returncode})")
        try:
            scrape(url)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the exporter never served")


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_synthetic(args):
    # (python, not sh: a killed sh would leave its sleep behind)
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1e6)",
                                  "--name", f"vm{i}"], stdout=subprocess.DEVNULL)
                for i in range(args.procs)]
    child = None
    try:
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve",
                                  "--listen", args.listen, "--locks", str(args.locks),
                                  "--interval", str(args.interval), "--tgids",
                                  ",".join(str(s.pid) for s in sleepers)])
        url = f"http://{args.listen}/metrics"
        wait_http(url, child)
        out = measure(child.pid, url, args.seconds, args.warmup, args.scrape)
    finally:
        if child:
            stop(child)
        for s in sleepers:
            s.kill()
            s.wait()
    return out


def run_live(args):
    from kvmlockprof.views.exporter import parse_listen
    parse_listen(args.listen)
    exporter = subprocess.Popen([sys.executable, "-m", "kvmlockprof", "exporter", "--listen",
                                 args.listen, "--interval", str(args.interval)])
    wl = None
    try:
        url = f"http://{args.listen}/metrics"
        wait_http(url, exporter)
        wl = subprocess.Popen([sys.executable, "-m", "kvmlockprof", "workload", "--vms",
                               str(args.vms), "--vcpus", "1", "--churn", "--churn-rate",
                               "50", "--duration", str(args.warmup + args.seconds + 5)],
                              stdout=subprocess.DEVNULL)
        out = measure(exporter.pid, url, args.seconds, args.warmup, args.scrape)
    finally:
        if wl:
            wl.send_signal(signal.SIGINT)
            wl.wait(60)
        stop(exporter)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["synthetic", "live"], default="synthetic")
    ap.add_argument("--locks", type=int, default=50, help="synthetic: lock classes")
    ap.add_argument("--procs", type=int, default=20, help="synthetic: VMs (processes)")
    ap.add_argument("--vms", type=int, default=10, help="live: workload VMs")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--interval", type=float, default=1.0, help="the exporter's reads")
    ap.add_argument("--scrape", type=float, default=1.0, help="seconds between scrapes")
    ap.add_argument("--listen", default="127.0.0.1:19476")
    ap.add_argument("-o", "--output")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tgids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve_synthetic(args)
    out = run_synthetic(args) if args.mode == "synthetic" else run_live(args)
    result = {"mode": args.mode, "settings": {k: v for k, v in vars(args).items()
                                              if k not in ("serve", "tgids", "output")},
              **out}
    print(json.dumps(result, indent=1))
    save(result, args.output or os.path.join(
        RESULTS, "exporter-cost.json" if args.mode == "synthetic" else
        "exporter-cost-live.json"))


if __name__ == "__main__":
    main()
