"""Overhead: the built-in workload's work rate unprofiled vs profiled, side by side.

Configurations:
  kvmlockprof-agg      kvmlockprof record -a --sample-every 0 (in-kernel aggregates only,
                       the default stack budget: at most 250 stack walks/s per CPU)
  kvmlockprof-stream   kvmlockprof record -a (every wait streamed as a sample)
  kvmlockprof-agg-allstacks  aggregates only, a kernel stack for every wait (--stack-budget 0)
  kvmlockprof-agg-allstacks8  the same, stacks of 8 frames as perf's (--max-stack 8): the
                       same information as perf-lock-b
  bpftrace             the same aggregation in bpftrace (bench/contention.bt)
  perf                 perf record -e lock:contention_begin,lock:contention_end -a -g
  perf-lock-b          the real peer: perf lock contention -ab (in-kernel aggregation,
                       caller stacks; perf built with BPF skeletons by `make peer`)
  perf-lock-b-addr     perf lock contention -ab -l (by lock address, no stacks), where the
                       built perf has -l (6.2+)
Control (not in the default set):
  kvmlockprof-agg-detached   kvmlockprof-agg whose probes are detached when its loop starts,
                       after its start-up (bench/record_detached.py): the record process, its
                       start-up, polls and flushes, without the probes' work

This host's work rate wanders by +-10-25% from one workload run to the next, more than
the effects to measure, so everything happens inside ONE long workload run, which
prints its progress (exits, memslot ops) four times a second. The profilers are
started and stopped in turn while it runs, with an unprofiled window between any two:
    off, P1, off, P2, off, ..., P5, off, P1, off, ...
A profiled window is measured from --settle s after the profiler attached (its
start-up, compiling and loading, is not measured) until it is told to stop; an
unprofiled window from --settle s after the previous profiler exited. Each profiled
window's ratio is its rate over the geometric mean rate of the two unprofiled windows
beside it (which cancels the drift); a configuration's ratio is the geometric mean over
--rounds, with a bootstrap 95% interval. Not the median of the ratios: the rates are
right-skewed here, and the median of rate / mean(two rates) is then biased low (about
-2% on this host's unprofiled windows alone); the mean of log ratios is not biased.
Beside it, direct measures: the in-kernel run time of the profiler's BPF programs
(kernel.bpf_stats_enabled: per invocation and as a share of one CPU), the
profiler process's own CPU and its resident memory (VmRSS, VmHWM). bpf_stats reads
the clock twice per program run (~90 ns each here, as much as a third of our
programs' own time), so it is on only in a
--cost-window after the rate window, never while the rate is measured. Prints all,
writes JSON. --reanalyse FILE summarises a result again (e.g. one written with an
older estimator) without running anything.
"""
import argparse
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from scipy import stats

from results_io import RESULTS, save      # bench/ is on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
KLP = [sys.executable, "-m", "kvmlockprof"]
CONFIGS = ("kvmlockprof-agg,kvmlockprof-stream,kvmlockprof-agg-allstacks,"
           "kvmlockprof-agg-allstacks8,bpftrace,perf,perf-lock-b,perf-lock-b-addr")


def peer_perf():
    """The built `perf lock contention -b` (bench/peer.py's cache), or None."""
    from peer import find
    try:
        return find(verbose=False)[0]
    except Exception:
        return None


def available(config, peer):
    if config.startswith("kvmlockprof"):
        return True
    if config.startswith("perf-lock-b"):
        if not peer:
            return False
        if config.endswith("-addr"):
            h = subprocess.run([peer, "lock", "contention", "-h"], capture_output=True,
                               text=True)
            return "--lock-addr" in h.stdout + h.stderr
        return True
    return bool(shutil.which(config))
WORK = ("exits", "churn_ops")


def wait_for(pred, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    raise RuntimeError("profiler did not start")


def prog_stats():
    """{prog id: (run_time_ns, run_cnt)} of the BPF programs loaded now."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"]: (p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in json.loads(out)}


def cpu_seconds(pid):
    """utime + stime of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sigint_default():
    """In the child: a SIGINT that a background shell ignored would be ignored by
    Python too (no KeyboardInterrupt), and the profiler would never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(config, tmp, peer=None):
    """Start a profiler; return its Popen once it is attached."""
    if config.startswith("kvmlockprof"):
        out = os.path.join(tmp, f"{config}.parquet")
        cmd = [sys.executable, os.path.join(HERE, "record_detached.py")] \
            if config.endswith("-detached") else KLP
        argv = cmd + ["record", "-a", "-q", "-f", "-o", out] + \
            (["--sample-every", "0"] if "-agg" in config else []) + \
            (["--stack-budget", "0"] if "-allstacks" in config else []) + \
            (["--max-stack", "8"] if config.endswith("-allstacks8") else []) + \
            (["--lock-owner"] if config.endswith("-owners") else [])
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             preexec_fn=_sigint_default)
        wait_for(lambda: os.path.exists(f"{out}.partial/manifest.json") or p.poll() is not None)
    elif config == "bpftrace":
        log = os.path.join(tmp, "bpftrace.log")
        p = subprocess.Popen(["bpftrace", os.path.join(HERE, "contention.bt")],
                             stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             preexec_fn=_sigint_default)
        wait_for(lambda: "Attaching" in open(log).read() or p.poll() is not None)
    elif config == "perf":
        data = os.path.join(tmp, "perf.data")
        p = subprocess.Popen(["perf", "record", "-q", "-o", data, "-a", "-g", "-e",
                              "lock:contention_begin,lock:contention_end"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             preexec_fn=_sigint_default)
        wait_for(lambda: os.path.exists(data) and os.path.getsize(data) > 0 or
                 p.poll() is not None)
    elif config.startswith("perf-lock-b"):
        before = set(prog_stats())
        log = os.path.join(tmp, f"{config}.log")
        p = subprocess.Popen([peer, "lock", "contention", "-ab"] +
                             (["-l"] if config.endswith("-addr") else []),
                             stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             preexec_fn=_sigint_default)
        # attached: its two tp_btf programs are loaded (it prints nothing until the end)
        wait_for(lambda: len(set(prog_stats()) - before) >= 2 or p.poll() is not None)
    if p.poll() is not None:
        raise RuntimeError(f"{config} exited at start ({p.returncode})")
    return p


class Progress:
    """The workload's progress lines, read as they come."""

    def __init__(self, proc):
        self.q = queue.Queue()
        self.last = None
        self.history = []               # every report, in order
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, f):
        for line in f:
            if line.startswith('{"progress"'):
                report = json.loads(line)["progress"]
                self.history.append(report)
                self.q.put(report)

    def now(self):
        """The newest progress report (waits for the next one)."""
        self.last = self.q.get(timeout=10)
        while not self.q.empty():
            self.last = self.q.get()
        return self.last


def memory_kb(pid):
    """{VmRSS, VmHWM} of a process now, in kB (the kernel's count: /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        got = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
               if k in ("VmRSS", "VmHWM")}
    return {"VmRSS": got.get("VmRSS", 0), "VmHWM": got.get("VmHWM", 0)}  # (0: a zombie)


def window(progress, seconds, pid=None):
    """Rates over `seconds` of the running workload (and a profiler's own CPU in it,
    and its resident memory at the window's end: steady, and the peak so far)."""
    c0 = cpu_seconds(pid) if pid else 0.0
    a = progress.now()
    time.sleep(seconds)
    b = progress.now()
    c1 = cpu_seconds(pid) if pid else 0.0
    dt = b["t"] - a["t"]
    out = {**{k: (b[k] - a[k]) / dt for k in WORK}, "own_cpu": (c1 - c0) / dt}
    if pid:
        mem = memory_kb(pid)
        out.update(rss_kb=mem["VmRSS"], hwm_kb=mem["VmHWM"])
    return out


def bpf_cost(seconds):
    """In-kernel run time of the BPF programs loaded now, with bpf_stats on for
    `seconds` only: ns per second and runs per second."""
    set_bpf_stats("1")
    try:
        s0, t0 = prog_stats(), time.monotonic()
        time.sleep(seconds)
        s1, dt = prog_stats(), time.monotonic() - t0
    finally:
        set_bpf_stats("0")
    ns = sum(s1[i][0] - s0[i][0] for i in s1 if i in s0)
    runs = sum(s1[i][1] - s0[i][1] for i in s1 if i in s0)
    return {"bpf_ns_per_s": ns / dt, "bpf_runs_per_s": runs / dt}


def set_bpf_stats(value):
    with open("/proc/sys/kernel/bpf_stats_enabled", "w") as f:
        f.write(value)


def geomean_ci(log_ratios, rng):
    """exp(mean) of log ratios and a bootstrap 95% interval of it."""
    x = np.asarray(log_ratios, float)
    if len(x) < 3:
        return float(np.exp(x.mean())), float("nan"), float("nan")
    res = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", rng=rng)
    return float(np.exp(x.mean())), *map(float, np.exp(res.confidence_interval))


def log_ratios_aligned(on, before, after):
    """log(profiled rate / geometric mean of the unprofiled rates beside it), one per
    profiled window, in order; nan where a rate is missing or zero."""
    on, before, after = (np.asarray(v, float) for v in (on, before, after))
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log(on) - (np.log(before) + np.log(after)) / 2
    lr[~np.isfinite(lr)] = np.nan
    return lr


def log_ratios(on, before, after):
    """The measured ones of log_ratios_aligned."""
    lr = log_ratios_aligned(on, before, after)
    return lr[np.isfinite(lr)]


def summarize(result):
    """Add each configuration's ratios and cost summary to `result` (which holds the
    unprofiled windows in order and each configuration's windows, round by round) and
    print the table."""
    configs, offs = list(result["configs"]), result["unprofiled"]
    rng = np.random.default_rng(0)
    print(f"\n{'config':<26} {'exits/s ratio [95% CI]':>26} {'memslot ops/s ratio [95% CI]':>30}"
          f" {'BPF ns/run':>10} {'BPF CPU':>8} {'own CPU':>8} {'RSS MiB':>8} {'peak MiB':>8}")
    for ci, c in enumerate(configs):
        cfg = result["configs"][c]
        wins = cfg["windows"]
        # the i-th profiled window overall sits between unprofiled windows i and i + 1
        idx = [r * len(configs) + ci for r in range(len(wins))]
        lrs = {k: log_ratios([w[k] for w in wins], [offs[i][k] for i in idx],
                             [offs[i + 1][k] for i in idx]) for k in WORK}
        summary = {k: geomean_ci(v, rng) for k, v in lrs.items() if len(v)}
        runs = sum(w["bpf_runs_per_s"] for w in wins)
        per_run = sum(w["bpf_ns_per_s"] for w in wins) / runs if runs else float("nan")
        bpf_cpu = statistics.median(w["bpf_ns_per_s"] / 1e9 for w in wins)
        own = statistics.median(w["own_cpu"] for w in wins)
        rss = [w["rss_kb"] / 1024 for w in wins if "rss_kb" in w]   # (older results: none)
        hwm = [w["hwm_kb"] / 1024 for w in wins if "hwm_kb" in w]
        if rss:
            cfg.update({"rss_mib_median": statistics.median(rss),
                        "rss_mib_range": [min(rss), max(rss)],
                        "hwm_mib_median": statistics.median(hwm),
                        "hwm_mib_range": [min(hwm), max(hwm)]})
        cfg.update({"estimator": "geometric mean of paired ratios",
                    "ratio_to_unprofiled": {k: v[0] for k, v in summary.items()},
                    "ratio_ci95": {k: v[1:] for k, v in summary.items()},
                    "ratios": {k: np.exp(v).tolist() for k, v in lrs.items()},
                    "bpf_ns_per_invocation": per_run, "bpf_cpu_share": bpf_cpu,
                    "own_cpu_share": own})
        cell = {k: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in summary.items()}
        print(f"{c:<26} {cell.get('exits', '-'):>26} {cell.get('churn_ops', '-'):>30} "
              f"{per_run:>10,.0f} {bpf_cpu:>8.2%} {own:>8.2%} "
              f"{cfg.get('rss_mib_median', float('nan')):>8.0f} "
              f"{cfg.get('hwm_mib_median', float('nan')):>8.0f}")
    print("ratio: geometric mean over rounds of (profiled window's rate / geometric mean of "
          "the unprofiled windows beside it); BPF CPU and own CPU: share of one CPU; RSS: "
          "the profiler's resident memory at its window's end, peak: its VmHWM then "
          "(medians over rounds)")
    if result.get("skipped"):
        print(f"(not installed, skipped: {', '.join(result['skipped'])})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--window", type=float, default=5.0, help="seconds measured per window")
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--cost-window", type=float, default=2.0,
                    help="seconds with bpf_stats on, after each profiled rate window")
    ap.add_argument("--workload", default="--vcpus 2 --churn")
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "overhead.json"))
    ap.add_argument("--reanalyse", metavar="FILE",
                    help="summarise this earlier result again, run nothing")
    a = ap.parse_args()
    if a.reanalyse:
        with open(a.reanalyse) as f:
            result = json.load(f)
        result.pop("machine", None)
        summarize(result)
        save(result, a.reanalyse)
        return
    peer = peer_perf() if "perf-lock-b" in a.configs else None
    configs = [c for c in a.configs.split(",") if available(c, peer)]
    skipped = sorted(set(a.configs.split(",")) - set(configs))
    # off + (settle + start-up ~3 s + window + cost window + stop ~1 s) per profiled window
    duration = a.rounds * len(configs) * (2 * (a.window + a.settle) + a.cost_window + 6) + 60
    with open("/proc/sys/kernel/bpf_stats_enabled") as f:
        stats_was = f.read().strip()
    set_bpf_stats("0")
    wl = subprocess.Popen(KLP + ["workload", "--duration", str(duration), "--progress-every",
                                 "0.25", *a.workload.split()],
                          stdout=subprocess.PIPE, text=True)
    progress = Progress(wl)
    offs, ons = [], []            # offs[i]: before the i-th profiled window; ons[i]: (config, w)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            progress.now()
            time.sleep(2 * a.settle)                    # the workload warms up
            for r in range(a.rounds):
                for c in configs:
                    time.sleep(a.settle)
                    offs.append(window(progress, a.window))
                    p = start(c, tmp, peer)
                    try:
                        time.sleep(a.settle)
                        ons.append((c, window(progress, a.window, p.pid)))
                        ons[-1][1].update(bpf_cost(a.cost_window))
                    finally:
                        p.send_signal(signal.SIGINT)
                        p.wait(120)
                    w, o = ons[-1][1], offs[-1]
                    print(f"round {r + 1}/{a.rounds} {c:<26} {w['exits']:>9,.0f} exits/s "
                          f"(before: {o['exits']:>9,.0f})  {w['churn_ops']:>7,.0f} memslot "
                          f"ops/s (before: {o['churn_ops']:>7,.0f})  BPF "
                          f"{w['bpf_ns_per_s'] / 1e7:5.2f}% CPU  own {w['own_cpu']:6.1%} CPU",
                          flush=True)
            time.sleep(a.settle)
            offs.append(window(progress, a.window))
    finally:
        wl.send_signal(signal.SIGTERM)
        wl.wait(60)
        set_bpf_stats(stats_was)
    result = {"workload": a.workload, "window_s": a.window, "settle_s": a.settle,
              "cost_window_s": a.cost_window, "rounds": a.rounds, "skipped": skipped,
              "unprofiled": offs,
              "configs": {c: {"windows": [w for cc, w in ons if cc == c]} for c in configs}}
    summarize(result)
    save(result, a.output)


if __name__ == "__main__":
    main()
