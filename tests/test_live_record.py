"""Live: real BPF on the built-in KVM workload (root, /dev/kvm)."""
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import pytest

import kvmlockprof
from kvmlockprof import cdefs
from kvmlockprof.analysis import locks as analysis
from conftest import ROOT, assert_none_left, klp, kernel_objects, workload_argv
from kvmlockprof.probes.contention import STACK_BUDGET
from kvmlockprof.probes.contention import stack_window

pytestmark = pytest.mark.live

KVM_CALLERS = re.compile(r"kvm_mmu_|kvm_set_memslot|kvm_vcpu_ioctl|kvm_vm_ioctl")


def test_churn_contention_goes_through_kvm(churn_recording):
    rec, _, _ = churn_recording
    top = analysis.top(rec, by="lock", limit=None)
    kvm_rows = top[top["kvm"] & top["caller"].str.contains(KVM_CALLERS)]
    assert not kvm_rows.empty, top.to_string()
    assert (kvm_rows["total_ns"] > 0).all() and (kvm_rows["max_ns"] > 0).all()
    # The memslot path: the churn thread's slots_lock (mutex) under kvm_vm_ioctl and the
    # vCPUs' mmu_lock (rwlock) under kvm_mmu_* show up among the top KVM rows.
    assert set(kvm_rows["type"]) & {"mutex", "mutex-spin", "rwlock:W", "rwlock:R"}
    text = klp("report", rec.path, "--stacks", "--limit", 10).stdout
    assert re.search(r"K (kvm_mmu_\w+|kvm_set_memslot|kvm_vcpu_ioctl|kvm_vm_ioctl)\+", text)


def test_recording_has_workload_counters_and_probes(churn_recording):
    rec, _, _ = churn_recording
    m = rec.manifest
    assert m["probes"]["contention"]["status"] == "attached"
    assert m["probes"]["contention"]["method"] == "raw_tracepoint"
    work = m["work"]
    assert work["pid"] == m["command_pid"]
    assert work["exits_total"] > 1000 and work["churn_ops"] > 100
    assert m["kernel_release"] == os.uname().release
    assert not rec.interrupted


def test_totals_agree_with_independent_counter(churn_recording):
    rec, ends, _ = churn_recording
    pid = rec.manifest["command_pid"]
    independent = ends.get(pid, 0)
    c = rec.manifest["counters"]
    lost = rec.manifest["losses"]
    assert independent > 1000, "the workload should contend"
    assert abs(c["end"] - independent) <= 0.01 * independent
    # Every paired wait is either a decoded sample or a counted loss.
    ours = len(rec.samples) + lost["lost_ringbuf_full"] + c["end_without_begin"]
    assert abs(ours - independent) <= 0.01 * independent, (ours, independent, c)
    assert rec.aggregates["count"].sum() + lost["lost_agg_full"] == \
        c["end"] - c["end_without_begin"]


def test_pid_filter_keeps_only_that_process(live, tmp_path):
    # long enough to outlive record's start-up (BPF compile, BTF: several seconds)
    target = subprocess.Popen(workload_argv("--duration", 60, "--churn"), cwd=ROOT,
                              stdout=subprocess.DEVNULL)
    other = subprocess.Popen(workload_argv("--duration", 60, "--churn"), cwd=ROOT,
                             stdout=subprocess.DEVNULL)
    try:
        time.sleep(1)
        out = tmp_path / "pid.parquet"
        klp("record", "--duration", 3, "--pid", target.pid, "-o", out, "-q")
    finally:
        for p in (target, other):
            p.terminate()           # the workload stops early on SIGTERM
            p.wait(30)
    rec = kvmlockprof.load(out)
    assert len(rec.samples) > 0
    assert set(rec.samples["tgid"]) == {target.pid}
    assert set(rec.aggregates["tgid"]) == {target.pid}


@pytest.mark.parametrize("sig", [None, signal.SIGINT, signal.SIGTERM])
def test_every_exit_path_detaches(live, tmp_path, sig):
    before = kernel_objects()
    out = tmp_path / "x.parquet"
    p = subprocess.Popen([sys.executable, "-m", "kvmlockprof", "record", "-q", "-o", str(out),
                          "--duration", "30" if sig else "2", "--",
                          *workload_argv("--duration", 30, "--churn")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not os.path.exists(f"{out}.partial/manifest.json") and time.time() < deadline:
        time.sleep(0.1)
    assert kernel_objects() - before, "record should have programs loaded while it runs"
    if sig:
        time.sleep(1.5)
        p.send_signal(sig)
    p.communicate(timeout=60)
    assert_none_left(before)
    rec = kvmlockprof.load(out)            # finished and readable after the signal too
    assert not rec.interrupted
    if sig:
        assert rec.manifest["stopped_by"] == signal.Signals(sig).name


def test_kill_9_leaves_flushed_data_readable(live, tmp_path):
    """...and nothing outside it: the workload's report goes in its .partial directory."""
    before = kernel_objects()
    temp_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "kvmlockprof*")))
    out = tmp_path / "k.parquet"
    p = subprocess.Popen([sys.executable, "-m", "kvmlockprof", "record", "-q", "-o", str(out),
                          "--", *workload_argv("--duration", 30, "--churn")], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        m = os.path.join(f"{out}.partial", "manifest.json")
        if os.path.exists(m) and json.load(open(m)).get("samples", 0) > 0:
            break
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    # the kernel drops the programs with the last file descriptor: none of ours stays
    assert_none_left(before)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "kvmlockprof*"))) == temp_before
    rec = kvmlockprof.load(out)
    assert rec.interrupted and len(rec.samples) > 0
    r = klp("report", out)
    assert "INTERRUPTED" in r.stdout


def test_manifest_says_how_or_why_not_for_every_probe(churn_recording):
    """record ran what can run here and says why the rest could not attach."""
    from kvmlockprof import catalog
    rec, _, _ = churn_recording
    probes = rec.manifest["probes"]
    assert set(probes) == {p.name for p in catalog.CATALOG}
    for name, st in probes.items():
        assert st["status"] in ("attached", "unavailable", "failed") or \
            st["status"] == "not requested" and catalog.BY_NAME[name].opt_in, (name, st)
        if st["status"] != "attached":
            assert st["reason"], name
    text = klp("report", "-v", rec.path).stdout
    for name, st in probes.items():
        assert f"probe {name}: {st['status']}" in text
    short = klp("report", rec.path).stdout.split("\n\n")[0]       # the summary
    for name, st in probes.items():     # each named once, in the attached or the not line
        if st["status"] != "not requested":
            line = "probes attached:" if st["status"] == "attached" else "not attached:"
            assert any(x.startswith(line) and name in x for x in short.splitlines()), name


def test_live_breakdowns(churn_recording):
    """Per-thread, timeline and per-unit-of-work views of a real recording."""
    rec, _, _ = churn_recording
    threads = analysis.per_thread(rec)
    assert threads["comm"].str.startswith("kvmlp-").any()          # the workload's threads
    assert set(threads["tgid"]) == {rec.manifest["command_pid"]}
    tl = analysis.timeline(rec, bin_ms=100)
    assert tl["t_s"].max() >= 2.0 and (tl["waits"] > 0).all()     # spans the run
    r = analysis.rates(rec)
    assert (r["waits_per_exit"] > 0).all() and (r["waits_per_memslot_op"] > 0).all()


@pytest.mark.parametrize("kept", [True, False], ids=["positions-kept", "positions-again"])
@pytest.mark.parametrize("by", analysis.GROUPS)
def test_streamed_report_is_the_loaded_one(churn_recording, by, kept, monkeypatch):
    """A recording too big to load is reported from its samples read chunk by chunk
    (two passes, the rows' positions kept from the first, or worked out again when
    they would not fit): the same table, and every exact percentile numpy's over
    the row's samples."""
    rec, _, _ = churn_recording
    loaded = analysis.top(rec, by=by)
    monkeypatch.setattr(analysis, "STREAM_SAMPLES", 0)
    monkeypatch.setattr(analysis, "POSITIONS_BYTES", analysis.POSITIONS_BYTES if kept else 0)
    again = kvmlockprof.load(rec.path)
    streamed = analysis.top(again, by=by)
    # never loaded whole (a row per thread is from every sample: it loads them)
    assert again.in_memory("contention") == (by == "thread")
    pd.testing.assert_frame_equal(loaded, streamed)
    pid = [rec.manifest["work"]["pid"]]             # --pid: the other rows left out
    pd.testing.assert_frame_equal(analysis.top(rec, by=by, pids=pid),
                                  analysis.top(kvmlockprof.load(rec.path), by=by, pids=pid))
    key = analysis.GROUP_COLUMN[by]
    _, samples = analysis.annotate(rec)
    exact = streamed[streamed["pct_exact"]]
    # by caller a row is exact only if its lock had every wait walked, which a storm
    # under the stack budget may leave no lock with (a fresh clone's CI saw none)
    assert len(exact) or by == "caller"
    for _, row in exact.iterrows():
        sel = samples[key] == row[key]
        if by in ("lock", "address"):       # (a mutex's waits: two types)
            sel &= samples["type"] == row["type"]
        w = samples.loc[sel, "wait_ns"].to_numpy()
        assert len(w) == row["contended"]
        assert list(row[list(analysis.QUANTILES)]) == \
            list(np.quantile(w, list(analysis.QUANTILES.values()), method="inverted_cdf"))


def test_vm_named_from_its_command_line(churn_recording):
    """A VMM started with -name/--name is reported by that name, its vCPU threads by theirs."""
    rec, _, _ = churn_recording
    pid = rec.manifest["command_pid"]
    vms = analysis.per_vm(rec).set_index("tgid")
    assert vms.loc[pid, "vm"] == "churnvm"
    by_process = analysis.top(rec, by="process").set_index("tgid")
    assert vms.loc[pid, "waits"] == by_process.loc[pid, "contended"]
    threads = analysis.per_thread(rec)
    mine = threads[threads["tgid"] == pid]
    assert set(mine["vm"]) == {"churnvm"}
    assert mine["comm"].str.match(r"kvmlp-(vcpu|churn)\d").any()
    text = klp("report", rec.path, "--by", "process").stdout
    assert f"churnvm ({pid})" in text


def test_kvm_locks_named_by_vm_and_field(churn_recording):
    """The churn workload's top locks are named kvm(<its pid>)->field, the VM base
    inferred from the mmu_lock rwlock (no kprobes/fentry here), with how it was derived."""
    rec, _, _ = churn_recording
    pid = rec.manifest["command_pid"]
    top = analysis.top(rec, by="lock", limit=5)
    assert top.iloc[0]["lock"] in (f"kvm({pid})->slots_lock", f"kvm({pid})->mmu_lock"), \
        top[["lock", "type", "caller"]]
    locks = set(top["lock"])
    assert {f"kvm({pid})->mmu_lock", f"kvm({pid})->slots_lock"} <= locks, locks
    mmu = top[top["lock"] == f"kvm({pid})->mmu_lock"].iloc[0]
    assert mmu["type"].startswith("rwlock") and mmu["caller"].startswith("kvm_mmu_")
    vms = rec.manifest["kvm_objects"]["vms"]
    assert [v["tgid"] for v in vms.values()] == [pid]
    assert all("inferred" in v["how"] for v in vms.values())
    aggs, _ = analysis.annotate(rec)          # the DataFrames: lock_name beside the address
    named = aggs[aggs["lock_name"].notna()]
    kvm = named[named["lock_name"].str.startswith("kvm(")]    # (the kernel's are named too)
    assert len(kvm) and (kvm["lock_name"].str.startswith(f"kvm({pid})->")).all()
    assert f"kvm({pid})->mmu_lock" in klp("report", rec.path).stdout


# (the budget off with --stack-every: both apply, and over 8 x 250 waits/s a CPU the
# default budget, not 1 in 8, decides how many are walked)
@pytest.mark.parametrize("args, says", [(("--stack-every", 8, "--stack-budget", 0),
                                          "1 wait in 8"),
                                         ((), f"at most {STACK_BUDGET} waits/s per CPU"),
                                         (("--stack-budget", 50), "at most 50 waits/s per CPU")],
                         ids=["stack-every-8", "default-budget", "budget-50"])
def test_stack_sampling_keeps_lock_totals(live, tmp_path, args, says):
    """Stacks for 1 wait in 8, or at most N walks/s per CPU (the default, and a
    budget under 100/s): every wait still counts under its lock (the in-kernel
    counter agrees); by caller, the unwalked waits are spread over their lock's
    walked callers, marked as estimates."""
    out = tmp_path / "s.parquet"
    klp("record", "-q", *args, "-o", out, "--", *workload_argv("--duration", 2, "--churn"))
    rec = kvmlockprof.load(out)
    by_lock = analysis.top(rec, by="lock", limit=None)
    c = rec.manifest["counters"]
    assert by_lock["contended"].sum() == c["end"] - c["end_without_begin"] - \
        rec.manifest["losses"]["lost_agg_full"]
    aggs = rec.aggregates
    unwalked = aggs.loc[aggs["stack_id"] == analysis.NO_STACK, "count"].sum()
    walked = aggs["count"].sum() - unwalked
    if args[:1] == ("--stack-every",):
        assert 0.75 < unwalked / aggs["count"].sum() < 0.99         # about 7 in 8
    else:        # the storm waits far more often than the budget lets walk
        budget = args[1] if args else STACK_BUDGET
        assert 0 < walked <= budget * os.cpu_count() * (rec.manifest["duration_s"] + 0.1) \
            + c["first_walks"]                          # and one per lock that had none
        assert unwalked > walked
    callers = analysis.top(rec, by="caller", limit=None)
    assert callers["estimated"].any()
    # the estimates add up to the exact total, to within rounding per row
    assert abs(callers["contended"].sum() - by_lock["contended"].sum()) <= len(callers)
    assert (by_lock["caller"] != "[stack not sampled]").any()
    report = klp("report", out, "--by", "caller").stdout
    assert says in report and "~ : an estimate" in report


@pytest.mark.parametrize("args", [(), ("--stack-budget", 50)], ids=["default", "budget-50"])
def test_budget_draws_walked_waits_from_the_whole_window(live, tmp_path, args):
    """Past the budget, the waits to walk are drawn at random from each ~10 ms
    window, not taken first come: where in its window a walked wait began is spread
    like it is for every wait (first come, the walked ones began near the start;
    with a count of walks reset every window, before the credit, at 0.40 of it,
    against 0.50). Within 5 standard errors of a uniform position's mean."""
    out = tmp_path / "w.parquet"
    klp("record", "-q", *args, "-o", out, "--", *workload_argv("--duration", 3, "--churn"))
    rec = kvmlockprof.load(out)
    _, window = stack_window(rec.manifest["probes"]["contention"]["stack_budget"])
    s = rec.samples
    began = ((s["ts_ns"] - s["wait_ns"]) % window / window).to_numpy()
    walked = (s["stack_id"] >= 0).to_numpy()
    assert 100 < walked.sum() < (~walked).sum()          # the budget was binding
    bound = 5 * (1 / 12) ** 0.5 / walked.sum() ** 0.5         # 0.05 at 750 walks
    assert abs(began[walked].mean() - began.mean()) < bound, \
        (began[walked].mean(), began.mean(), bound)


def test_every_lock_gets_a_caller_under_the_budget(live, tmp_path):
    """Amid a storm the budget walks a few percent of the waits, so a lock that
    contends a handful of times would most often keep no caller (half the locks
    of a 10 s storm did). A lock (per process and flags) whose wait ends without
    a stack and that has none yet gets one walk, once: every lock has a caller,
    and the extra walks are at most one per lock."""
    out = tmp_path / "c.parquet"
    klp("record", "-q", "--sample-every", 0, "-o", out, "--",
        *workload_argv("--duration", 3, "--vcpus", 2, "--churn"))
    rec = kvmlockprof.load(out)
    a, c = rec.aggregates, rec.manifest["counters"]
    assert (a["stack_id"] == analysis.NO_STACK).any()             # the budget was binding
    walked = (a["stack_id"] != analysis.NO_STACK).groupby(
        [a["lock_addr"], a["tgid"], a["flags"]]).any()
    assert len(walked) >= 5
    assert (~walked).sum() <= c["stack_failures"], walked[~walked]
    assert 0 < c["first_walks"] <= len(walked)
    by_lock = analysis.top(rec, by="caller")
    assert "[stack not sampled]" not in set(by_lock["caller"])

@pytest.mark.parametrize("pending", ["task storage", "hash"])
def test_waits_pair_with_either_pending_store(live, pending):
    """A wait in progress is kept in task-local storage, or in a hash on kernels
    before 5.12: both pair every begin with its end (nothing lost, every end
    aggregated), and the nesting of waits in a task fits its slots. A begin is
    left without its end only when the kernel skipped our end handler (its
    recursion_misses: a lock contended inside the handler, as the hash's bucket
    lock can be, nests a wait whose end comes while the handler runs)."""
    from kvmlockprof.kernel import bpfstats
    from kvmlockprof.probes.contention import ContentionOptions, ContentionProbe
    probe = ContentionProbe(ContentionOptions(pending=pending, sample_every=0, stack_budget=1000))
    try:
        assert probe.pending == pending
        subprocess.run(workload_argv("--duration", 2, "--vcpus", 2, "--churn"), check=True,
                       capture_output=True, timeout=60)
        probe.detach()
        c = probe.counters()
        skipped = {tp: bpfstats.recursion_misses(fd) for tp, fd in probe.prog_fds().items()}
        aggs = probe.snapshots()["aggregates"]
    finally:
        probe.close()
    assert c["end"] > 1000, c
    assert c["lost_pending_full"] == 0 and c["lost_agg_full"] == 0, c
    assert c["begin_without_end"] <= skipped["contention_end"], (c, skipped)  # none left behind
    assert c["end_without_begin"] <= 0.01 * c["end"], c       # begun before attach
    assert sum(aggs.column("count").to_pylist()) == c["end"] - c["end_without_begin"]


def begins_without_ends(probe):
    """The built-in workload's storm (still running: the caller kills it), seen by
    a detached probe's contention_begin alone, armed, for a second: every wait
    begun then stays in its task's slots, since no end comes."""
    wl = subprocess.Popen(workload_argv("--duration", 30, "--vcpus", 2, "--churn"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    probe.bpf.attach_raw_tracepoint(tp="contention_begin",
                                    fn_name="raw_tracepoint__contention_begin")
    probe._arm(True)
    time.sleep(1)
    probe.detach()
    return wl


@pytest.mark.parametrize("pending", ["task storage", "hash"])
def test_waits_in_progress_are_named(live, tmp_path, pending):
    """A wait that never ends (a deadlock) is named with its thread, lock and stack.
    Forced here: contention_begin alone for a second under the storm, so that no
    end comes; the workload's threads then have waits in progress, read back from
    the kernel's per-thread store (task storage through pidfds, or the hash)."""
    from kvmlockprof.probes.contention import ContentionOptions, ContentionProbe
    probe = ContentionProbe(ContentionOptions(pending=pending, sample_every=0, stack_budget=0))
    probe.detach()
    wl = None
    try:
        wl = begins_without_ends(probe)
        time.sleep(0.6)
        tids = [int(t) for t in os.listdir(f"/proc/{wl.pid}/task")]
        stuck = probe.waits_in_progress(tids, min_age_ns=500_000_000).to_pandas()
        begun = probe.counters()["begin"]
    finally:
        if wl:
            wl.kill()
            wl.wait()
        probe.close()
    assert len(stuck) > 0 and begun > 0
    assert set(stuck["tid"]) <= set(tids) and set(stuck["tgid"]) == {wl.pid}
    assert (stuck["age_ns"] >= 500_000_000).all() and (stuck["age_ns"] < 5e9).all()
    assert (stuck["stack_id"] >= 0).any()       # walked at their begin (no budget)
    # at most one wait in progress per thread and lock (task storage: 8 slots a thread)
    assert not stuck.duplicated(["tid", "lock_addr"]).any()
    assert pending == "hash" or \
        stuck.groupby("tid").size().max() <= cdefs.define("contention.bpf.c", "KVMLP_NEST")


@pytest.mark.parametrize("pending", ["task storage", "hash"])
def test_a_missed_end_does_not_stretch_the_next_wait(live, pending):
    """A begin whose end was missed stays in its task's slots. `record` never
    leaves one (contention_begin takes waits only once contention_end is attached
    too), so here it is forced: contention_begin alone, armed, for a second under
    the storm, then nothing for a second, then both, as a re-attach does. Each
    attach starts a new epoch, and a wait begun in an earlier one never pairs: its
    lock's next begin starts a new wait, its next end counts as end_without_begin.
    Paired, it would be measured from the old begin, over a second."""
    from kvmlockprof.probes.contention import ContentionOptions, ContentionProbe
    from tests_support import EVENT
    probe = ContentionProbe(ContentionOptions(pending=pending, sample_every=1, stack_budget=1000))
    # the test recordings' layout, read from the C, is bcc's
    ring = probe.ring.dtype
    assert [(n, ring.fields[n][1]) for n in ring.names] == \
        [(n, EVENT.fields[n][1]) for n in EVENT.names] and ring.itemsize == EVENT.itemsize
    probe.detach()
    wl = None
    try:
        wl = begins_without_ends(probe)
        left = probe.counters()["begin"]
        time.sleep(1)
        probe.attach()
        time.sleep(2)
        probe.detach()
        samples = probe.poll()["contention"]
        c = probe.counters()
    finally:
        if wl:
            wl.kill()
            wl.wait()
        probe.close()
    assert left > 1000 and len(samples) > 1000, (left, len(samples))
    assert c["begin_without_end"] > 0, c             # phase 1: no end ever came
    assert samples["wait_ns"].max() < 1e9, np.sort(samples["wait_ns"])[-5:]


def test_exited_threads_leave_the_pid_filter(live, tmp_path):
    """Following a command, each thread it forks joins the pid filter; a thread that
    exits leaves it, so a long-running VMM that starts and ends threads never fills
    it (it held 4096 entries, never removed: later threads were silently not
    followed). 6000 threads, each started and joined in turn."""
    out = tmp_path / "t.parquet"
    code = ("import threading\n"
            "for _ in range(6000):\n"
            "    t = threading.Thread(target=int); t.start(); t.join()\n")
    klp("record", "-q", "-o", out, "--", sys.executable, "-c", code)
    c = kvmlockprof.load(out).manifest["counters"]
    assert c["filter_exits"] >= 6000, c
    assert c["lost_filter_full"] == 0, c


def test_max_stack_stops_the_walk_as_perfs_does(live, tmp_path):
    """--max-stack 8 (perf lock contention's default depth): every stack the kernel
    walked has at most 8 frames, and the deep KVM stacks (20+ frames) reach 8."""
    out = tmp_path / "m.parquet"
    klp("record", "-q", "--sample-every", 0, "--stack-budget", 0, "--max-stack", 8,
        "-o", out, "--", *workload_argv("--duration", 2, "--vcpus", 2, "--churn"))
    rec = kvmlockprof.load(out)
    depth = rec.stacks["frames"].map(len)
    assert rec.manifest["probes"]["contention"]["max_stack"] == 8
    assert depth.max() == 8, depth.value_counts()


def test_a_taken_stack_bucket_keeps_the_walk_less_its_first_frame(live, tmp_path):
    """A stack map's bucket keeps one stack (the hash of its frames): the kernel refuses
    a walk whose bucket another stack holds (-EEXIST), and the probe takes it again
    less its innermost frame (the BPF program's own). With 16 buckets (-M 16) and the
    churn workload's dozens of stacks, some are kept so: their first frame is the
    kernel's bpf_trace_run*, not our program, and each still has its lock's caller."""
    out = tmp_path / "b.parquet"
    klp("record", "-q", "-M", 16, "--sample-every", 0, "--stack-budget", 0, "-o", out,
        "--", *workload_argv("--duration", 2, "--vcpus", 2, "--churn"))
    rec = kvmlockprof.load(out)
    st = rec.stacks[rec.stacks["source"] == "contention"]
    first = st["frames"].map(lambda f: f[0] if len(f) else "")
    again = st[first.str.startswith("bpf_trace_run")]
    print(first.str.split("+").str[0].value_counts().to_string())
    assert first.str.startswith("bpf_prog_").any() and len(again), first.tolist()
    for _, r in again.iterrows():
        assert not all(r["lock_frame"]), list(r["frames"])      # a caller outside locking
