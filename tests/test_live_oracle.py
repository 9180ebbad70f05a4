"""Live: kvmlockprof's numbers against clocks that are not ours.

While `record` profiles the built-in workload, Debian's perf (no BPF: the raw
lock:contention_* events, CLOCK_MONOTONIC) and an ftrace instance (trace_clock mono)
record the same tracepoints, and a second kvmlockprof records the whole host with
--sample-every 0 and no stack walks (a walk in its begin handler would sit between the
others' timestamps and the first kvmlockprof's). The waits are paired here, per thread,
from perf's and ftrace's own text, never by project code; the rule is the plain one: a
thread's wait on a lock runs from its first contention_begin on that lock to the next
contention_end on it."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pytest

import kvmlockprof
from kvmlockprof.analysis import locks as analysis
from kvmlockprof.probes.contention import RECURSION
from conftest import ROOT, assert_none_left, kernel_objects, klp, workload_argv
from ftrace import Ftrace

pytestmark = pytest.mark.live

EVENTS = ("contention_begin", "contention_end")
MIN_WAITS = 200                     # locks compared on their mean, max and histogram
# Tracing-machinery frames: never a caller, whatever else is attached.
TRACING = re.compile(r"^(__traceiter_|__bpf_trace_|bpf_trace_run|bpf_prog_|perf_trace_|"
                     r"trace_event_raw_event_|perf_tp_event|trace_call_bpf)")


def pair(events):
    """[(tgid, lock, wait_ns, end_ns, tid)] from (tid, tgid, ts_ns, event, lock) in
    time order."""
    pending, waits = {}, []
    for tid, tgid, ts, ev, lock in events:
        key = (tid, lock)
        if ev == "contention_begin":
            pending.setdefault(key, ts)         # a mutex begins again while it waits
        elif key in pending:
            waits.append((tgid, lock, ts - pending.pop(key), ts, tid))
    return waits


PERF_LINE = re.compile(r"^\s*(\d+)/(\d+)\s+(\d+)\.(\d+):\s+lock:(\w+):\s+(0x[0-9a-f]+)")


def perf_events(perf, data):
    out = subprocess.run([perf, "script", "-i", data, "-F", "pid,tid,time,event,trace",
                          "--ns"], capture_output=True, text=True, check=True).stdout
    ev = []
    for line in out.splitlines():
        m = PERF_LINE.match(line)
        if m:
            tgid, tid, s, ns, name, lock = m.groups()
            ev.append((int(tid), int(tgid), int(s) * 10**9 + int(ns), name, int(lock, 16)))
    return ev


def ftrace_waits_events(ft):
    """The instance's contention events as pair() takes them."""
    return [(tid, tgid, ts, ev, f["lock_addr"]) for tid, tgid, ts, ev, f in ft.events()]


def _wait_for(path, timeout=60):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def oracle(live, tmp_path_factory):
    perf = shutil.which("perf")
    if not perf:
        pytest.fail("perf is missing: `make setup` installs linux-perf") if os.environ.get(
            "CI") else pytest.skip("perf is missing (apt-get install linux-perf)")
    d = tmp_path_factory.mktemp("oracle")
    before = kernel_objects()
    ft = Ftrace(f"kvmlockprof-oracle-{os.getpid()}", {f"lock/{e}": None for e in EVENTS})
    perf_p = agg_p = None
    try:
        perf_p = subprocess.Popen([perf, "record", "-e", ",".join(f"lock:{e}" for e in EVENTS),
                                   "-a", "-k", "CLOCK_MONOTONIC", "-m", "16M",
                                   "-o", str(d / "perf.data")],
                                  stdout=subprocess.DEVNULL, stderr=open(d / "perf.err", "w"))
        agg_out = d / "agg.parquet"
        agg_p = subprocess.Popen([sys.executable, "-m", "kvmlockprof", "record", "-q", "-a",
                                  "--sample-every", "0", "--stack-every", str(2**31),
                                  "--duration", "300", "-o", str(agg_out)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for(f"{agg_out}.partial/manifest.json")
        out = d / "full.parquet"
        klp("record", "-q", "-o", out, "--",
            *workload_argv("--duration", 4, "--vcpus", 2, "--churn"))
        agg_p.send_signal(signal.SIGINT)
        assert agg_p.wait(60) == 0, agg_p.stderr.read()
        time.sleep(0.5)
        perf_p.send_signal(signal.SIGINT)
        perf_p.wait(60)
        ft.stop()
        rec, agg = kvmlockprof.load(out), kvmlockprof.load(agg_out)
        pid = rec.manifest["command_pid"]
        perf_ev = perf_events(perf, str(d / "perf.data"))
        perf_stats = subprocess.run([perf, "report", "--stats", "-i", str(d / "perf.data")],
                                    capture_output=True, text=True).stdout
        ftrace_ev, overruns = ftrace_waits_events(ft), ft.overruns()
    finally:
        for p in (perf_p, agg_p):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        ft.remove()
    assert_none_left(before)        # no program, map, link or probe event of ours left
    perf_lost = sum(int(n) for n in re.findall(r"LOST\w* events:\s+(\d+)", perf_stats))
    return dict(rec=rec, agg=agg, pid=pid, perf=pair(perf_ev), ftrace=pair(ftrace_ev),
                perf_lost=perf_lost, ftrace_overruns=overruns)


def by_lock(waits, pid, window=None):
    """{lock: waits} of the process, those ending in window (start, end) ns if given."""
    out = defaultdict(list)
    lo, hi = window or (0, 2**64)
    for tgid, lock, w, end, _ in waits:
        if tgid == pid and lo <= end <= hi:
            out[lock].append(w)
    return {k: np.array(v, np.int64) for k, v in out.items()}


def handler_ns(rec, tp="contention_begin"):
    """What a recording measured one run of its handler to cost (ns)."""
    h = rec.manifest["handler_ns"][tp]
    assert h["runs"] > 0 and 0 < h["ns_per_run"] < 1e6, h
    return h["ns_per_run"]


# The handlers between a clock's timestamps and kvmlockprof's: the tracepoint runs
# its probes in attach order: ftrace's, perf's, the second kvmlockprof's, ours.
BETWEEN = {"ftrace": 3, "perf": 2}


def handler_floor(oracle, clock="perf"):
    """How far a clock and ours drift apart per wait: by what the handlers that run
    between their timestamps cost, each taken as costing no more than ours
    measured (begin + end), ours included."""
    return (BETWEEN[clock] + 1) * sum(handler_ns(oracle["rec"], tp) for tp in EVENTS)


def ours_by_lock(rec, pid):
    a = rec.aggregates
    a = a[a["tgid"] == pid]
    g = a.groupby("lock_addr")
    return g.agg(count=("count", "sum"), total_ns=("total_ns", "sum"), max_ns=("max_ns", "max"))


def test_nothing_lost_on_either_side(oracle):
    """Nothing lost but what the kernel itself withholds: a handler's event that fires
    inside it on the same CPU (an interrupt's wait) is not run, and counted by the
    kernel (recursion_misses, our lost_recursion): rare, and counted, not hidden."""
    rec = oracle["rec"]
    assert oracle["perf_lost"] == 0 and oracle["ftrace_overruns"] == 0
    losses = rec.manifest["losses"]
    assert not any(v for k, v in losses.items() if k.startswith("lost_")
                   and k != RECURSION), losses
    assert losses[RECURSION] <= 1e-4 * rec.manifest["counters"]["end"], losses
    assert len(oracle["perf"]) > 1000


@pytest.mark.parametrize("clock", ["perf", "ftrace"])
def test_wait_counts_per_lock_match(oracle, clock):
    """perf and ftrace still see every event while kvmlockprof is attached (a BPF
    program on a perf tracepoint returning 0 hid them all from perf), and count
    the same waits per lock as kvmlockprof's in-kernel aggregates, within 1%."""
    pid, rec = oracle["pid"], oracle["rec"]
    theirs = by_lock(oracle[clock], pid)
    ours = ours_by_lock(rec, pid)
    total_theirs = sum(len(v) for v in theirs.values())
    total_ours = int(ours["count"].sum())
    assert total_theirs > 1000, f"{clock} saw {total_theirs} waits of the workload"
    print(f"\n{clock}: {total_theirs} waits, kvmlockprof {total_ours}")
    assert abs(total_ours - total_theirs) <= 0.01 * total_theirs
    for lock, w in theirs.items():
        if len(w) >= MIN_WAITS:
            n = int(ours["count"].get(lock, 0))
            assert abs(n - len(w)) <= max(2, 0.01 * len(w)), (hex(lock), n, len(w))


@pytest.mark.parametrize("clock", ["perf", "ftrace"])
def test_mean_wait_per_lock_matches(oracle, clock):
    """A wait runs from the top of the begin handler to the top of the end handler,
    walked or not: the mean agrees with an outside clock within 5% or within our
    measured per-wait handler cost, whichever is larger (it read 12-70% short when
    the wait started after the stack walk)."""
    pid, rec = oracle["pid"], oracle["rec"]
    floor = handler_floor(oracle, clock)
    theirs = by_lock(oracle[clock], pid)
    ours = ours_by_lock(rec, pid)
    checked = 0
    for lock, w in theirs.items():
        if len(w) < MIN_WAITS or lock not in ours.index:
            continue
        o = ours.loc[lock]
        mean_o, mean_t = o["total_ns"] / o["count"], w.mean()
        assert abs(mean_o - mean_t) <= max(0.05 * mean_t, floor), \
            (hex(lock), mean_o, mean_t, floor)
        print(f"\n{clock} {lock:#x}: {len(w)} waits, mean {mean_o:.0f} vs {mean_t:.0f} ns, "
              f"max {o['max_ns']} vs {w.max()} ns (floor {floor:.0f} ns)")
        checked += 1
    assert checked >= 2


def per_wait(oracle, clock):
    """{lock: (ours, theirs)} wait by wait (worked out once per clock: three tests
    and shifted() use it). A thread's waits on a lock are sequential and the
    outside clock's handler runs before ours at the end, so each of our waits is
    the one of theirs that ended last at or before ours ended, within a
    millisecond: a wait one side lost leaves the rest matched."""
    if ("per_wait", clock) not in oracle:
        oracle[("per_wait", clock)] = _per_wait(oracle, clock)
    return oracle[("per_wait", clock)]


def _per_wait(oracle, clock):
    pid, s = oracle["pid"], oracle["rec"].samples
    mine = defaultdict(list)
    for tid, lock, ts, w in zip(s["tid"].tolist(), s["lock_addr"].tolist(),
                                s["ts_ns"].tolist(), s["wait_ns"].tolist()):
        mine[(tid, lock)].append((ts, w))
    theirs = defaultdict(list)
    for tgid, lock, w, end, tid in oracle[clock]:
        if tgid == pid:
            theirs[(tid, lock)].append((end, w))
    out = defaultdict(lambda: ([], []))
    for key, m in mine.items():
        t = sorted(theirs.get(key, []))
        ends = np.array([e for e, _ in t], np.int64)
        for end, w in m:
            i = int(np.searchsorted(ends, end, side="right")) - 1
            if i >= 0 and end - ends[i] < 1_000_000:
                out[key[1]][0].append(w)
                out[key[1]][1].append(t[i][1])
    return {k: (np.array(a, np.int64), np.array(b, np.int64)) for k, (a, b) in out.items()}


def shifted(oracle, clock="perf"):
    """{lock: share of its waits, matched wait by wait, that differ from the outside
    clock's by more than the handlers between them}: those a stall of the CPU
    inside the tracepoint, between the two timestamps, moved (see
    test_each_wait_matches_the_outside_clock)."""
    floor = handler_floor(oracle, clock)
    return {lock: float((np.abs(o - t) > floor).mean())
            for lock, (o, t) in per_wait(oracle, clock).items() if len(o)}


@pytest.mark.parametrize("clock", ["perf", "ftrace"])
def test_each_wait_matches_the_outside_clock(oracle, clock):
    """Wait by wait, most agree with the outside clock within the handlers between
    the two, and a lock's longest wait agrees within the largest difference.

    The rest are stalls: on this nested host the CPU is sometimes held for 8-16 us
    inside contention_begin, between one probe and the next, even between two
    trivial programs that only read the clock (bench/probe_stalls.py: 1-4% of
    run-queue lock begins, none of the others'; likely the hypervisor taking the
    vCPU when the lock's holder sends it a reschedule IPI). A stall after the
    outside clock's timestamp and before ours is a wait that begins later by ours,
    so the waits beyond the bound mostly read shorter (measured 97-99% of them here,
    89% of 1479 in a CI run: a stall between the two contention_end probes reads
    longer), on run-queue locks (measured: KVM's locks 99.4-100% within, run-queue
    locks 79-97%). Their share sets the total, so the bound is on the median and on
    three quarters (measured 86-99% within), and the waits beyond it mostly read short."""
    floor = handler_floor(oracle, clock)
    matched = per_wait(oracle, clock)
    n = sum(len(o) for o, _ in matched.values())
    assert n >= 0.99 * len(oracle["rec"].samples)
    diff = np.concatenate([o - t for o, t in matched.values()])
    beyond = diff[np.abs(diff) > floor]
    print(f"\n{clock}: {n} waits matched; ours - theirs: median {np.median(diff):.0f} ns, "
          f"1-99% [{np.percentile(diff, 1):.0f}, {np.percentile(diff, 99):.0f}] ns, "
          f"{(np.abs(diff) <= floor).mean():.2%} within {floor:.0f} ns; beyond it "
          f"{(beyond < 0).mean() if len(beyond) else 1:.1%} of {len(beyond)} read shorter")
    for lock, (o, t) in matched.items():
        if len(o) >= MIN_WAITS:
            d = o - t
            print(f"  {lock:#x}: {len(o)} waits, within {(np.abs(d) <= floor).mean():.2%}, "
                  f"1-99% [{np.percentile(d, 1):.0f}, {np.percentile(d, 99):.0f}]")
    assert abs(np.median(diff)) <= floor and (np.abs(diff) <= floor).mean() >= 0.75
    assert len(beyond) <= 0.01 * n or (beyond < 0).mean() >= 0.75
    for lock, (o, t) in matched.items():
        if len(o) >= MIN_WAITS:
            assert abs(o.max() - t.max()) <= max(np.abs(o - t).max(), floor)


def _edges(hist_rows):
    return [(int(lo), int(hi), int(n)) for lo, hi, n in
            zip(hist_rows["lo_ns"], hist_rows["hi_ns"], hist_rows["count"])]


def test_histogram_buckets_hold_what_they_say(oracle):
    """The log2 buckets as the user sees them (wait_histogram's [lo_ns, hi_ns), the
    HTML's bars): kvmlockprof's own samples binned by those edges give exactly the
    in-kernel counts (a 2x edge error shifts every wait one bucket), and perf's
    waits give the same counts but for waits within our handler cost of an edge and
    those a stall moved (shifted())."""
    pid, rec = oracle["pid"], oracle["rec"]
    floor = handler_floor(oracle)
    moved = shifted(oracle)
    h = analysis.wait_histogram(rec, by="lock", top_n=1000)
    names = analysis.lock_names(rec)
    addr = {names.get(f"{a:#x}", f"{a:#x}"): a for a in rec.aggregates["lock_addr"]}
    samples = rec.samples[rec.samples["tgid"] == pid]
    assert rec.aggregates["tgid"].eq(pid).all()     # the recording is of the workload alone
    perf = by_lock(oracle["perf"], pid)
    checked = 0
    for lock, rows in h.groupby("lock"):
        a = addr[lock]
        mine = samples.loc[samples["lock_addr"] == a, "wait_ns"].to_numpy()
        buckets = _edges(rows)
        assert sum(n for _, _, n in buckets) == len(mine)
        for lo, hi, n in buckets:
            assert ((mine >= lo) & (mine < hi)).sum() == n, (lock, lo, hi)
        w = perf.get(a)
        if w is None or len(w) < MIN_WAITS:
            continue
        near = sum(((w >= e - floor) & (w < e + floor)).sum() for _, e, _ in buckets)
        for lo, hi, n in buckets:
            assert abs(((w >= lo) & (w < hi)).sum() - n) <= \
                near + (0.01 + moved.get(a, 0)) * len(w), (lock, lo, hi, n)
        checked += 1
    assert checked >= 2


def test_percentile_bounds_hold_exact_percentiles(oracle):
    """With --sample-every 0 every p50/p90/p99 is a `<=` bucket bound: at least the
    exact percentile of perf's waits and less than twice it (within what perf's
    handler and its own cost, as it measured it), but for the waits a stall moved:
    those are a share of the ranks, measured wait by wait against perf (shifted():
    a stall between perf's timestamp and this recording's is one between perf's and
    the later full recording's). On run-queue locks, whose waits are bimodal (~1.5
    and ~9 us), 8% moved took a p50 from 8347 to 2254 ns."""
    pid, agg = oracle["pid"], oracle["agg"]
    floor = 2 * sum(handler_ns(agg, tp) for tp in EVENTS)
    moved = shifted(oracle)
    top = analysis.top(agg, by="lock", pids=[pid])
    assert not top["pct_exact"].any()
    perf = by_lock(oracle["perf"], pid)
    text = klp("report", agg.path, "--pid", pid, "--limit", 1000).stdout
    names = analysis.lock_names(agg)
    checked = 0
    for lock_addr, w in perf.items():
        rows = top[top["lock"] == names.get(f"{lock_addr:#x}", f"{lock_addr:#x}")]
        if len(w) < MIN_WAITS or len(rows) != 1:   # (one lock type: one distribution)
            continue
        f = moved.get(lock_addr, 0)
        for col, q in analysis.QUANTILES.items():
            lo, hi = (np.quantile(w, min(max(q + d, 0), 1), method="inverted_cdf")
                      for d in (-f, f))
            bound = rows[col].iloc[0]
            assert lo - floor <= bound < 2 * hi + floor, (hex(lock_addr), col, lo, hi, bound, f)
        checked += 1
    assert checked >= 1, top[["lock", "type", "contended"]]
    assert "<=" in text


def test_callers_skip_the_tracing_machinery(oracle):
    """With perf and ftrace attached the tracepoint runs its probes through
    __traceiter_*: the caller is still the first frame outside locking,
    scheduling and tracing code."""
    rec = oracle["rec"]
    st = analysis.contention_stacks(rec)
    assert len(st) > 0
    frames = [f for fr in st["frames"] for f in fr]
    assert any(f.startswith("__traceiter_contention") for f in frames), \
        "perf/ftrace attached: the stacks should pass through __traceiter_*"
    bad = [c for c in st["caller"] if TRACING.match(c)]
    assert not bad, bad
    top = analysis.top(rec, by="caller")
    assert not top["caller"].str.match(TRACING).any()


def test_resolution_floor_is_reported(oracle):
    rec = oracle["rec"]
    floor = handler_floor(oracle)
    text = klp("report", rec.path).stdout
    assert "resolution: every wait includes" in text
    assert floor < 50_000


def test_a_walked_wait_starts_after_its_walk(live, tmp_path):
    """Every wait walked (--stack-budget 0): wait by wait, an ftrace instance attached
    before us sees our walk inside the wait and we do not, so its wait is longer than
    ours by about what our begin handler costs (the kernel's bpf_stats, walks included),
    and never by more than that plus the handlers between the two clocks (a walked
    wait used to read as long as ftrace's: the walk counted as the lock's wait)."""
    before = kernel_objects()
    ft = Ftrace(f"kvmlockprof-walk-{os.getpid()}", {f"lock/{e}": None for e in EVENTS})
    try:
        out = tmp_path / "walked.parquet"
        klp("record", "-q", "--stack-budget", 0, "-o", out, "--",
            *workload_argv("--duration", 3, "--vcpus", 2, "--churn"))
        ft.stop()
        theirs_all = pair(ftrace_waits_events(ft))
    finally:
        ft.remove()
    assert_none_left(before)
    rec = kvmlockprof.load(out)
    pid, s = rec.manifest["command_pid"], rec.samples
    walked = s[s["stack_id"] >= 0]
    assert len(walked) >= 0.9 * len(s) >= 500, (len(walked), len(s))
    theirs = defaultdict(list)
    for tgid, lock, w, end, tid in theirs_all:
        if tgid == pid:
            theirs[(tid, lock)].append((end, w))
    theirs = {k: (np.array([e for e, _ in sorted(v)], np.int64),
                  [w for _, w in sorted(v)]) for k, v in theirs.items()}
    diff = []
    for tid, lock, end, w in zip(walked["tid"].tolist(), walked["lock_addr"].tolist(),
                                 walked["ts_ns"].tolist(), walked["wait_ns"].tolist()):
        ends, ws = theirs.get((tid, lock), (np.array([], np.int64), []))
        i = int(np.searchsorted(ends, end, side="right")) - 1
        if i >= 0 and end - ends[i] < 1_000_000:
            diff.append(ws[i] - w)
    diff = np.array(diff)
    begin = handler_ns(rec)
    floor = (BETWEEN["ftrace"] + 1) * sum(handler_ns(rec, tp) for tp in EVENTS)
    print(f"\n{len(diff)} walked waits matched of {len(walked)}; ftrace's - ours: median "
          f"{np.median(diff):.0f} ns, 5-95% [{np.percentile(diff, 5):.0f}, "
          f"{np.percentile(diff, 95):.0f}]; our begin handler {begin:.0f} ns a run")
    assert len(diff) >= 0.95 * len(walked)
    assert 0.5 * begin <= np.median(diff) <= begin + floor, (np.median(diff), begin, floor)
