"""perf's filters (-L/-Y/-S) on a live recording of the built-in workload, against an
independent BPF program (bcc, written here) that counts each contention_begin of the
workload's process by lock address and flags. Mutex waits begin again at every spin
and sleep, so the counts compared are of the other types (one begin a wait); the
filters are applied by report/top to the recording (not in the kernel)."""
import subprocess
import sys

import pytest

import kvmlockprof
from kvmlockprof.analysis import locks as analysis
from conftest import ROOT, workload_argv

pytestmark = pytest.mark.live

LCB_F_SPIN, LCB_F_WRITE = analysis.LCB_F_SPIN, analysis.LCB_F_WRITE


@pytest.fixture(scope="module")
def filtered_run(live, tmp_path_factory):
    from kvmlockprof.kernel.bpfload import compile_bpf
    counter = compile_bpf(text="""
        struct key { u64 addr; u32 tgid; u32 flags; };
        BPF_HASH(begins, struct key, u64, 65536);
        TRACEPOINT_PROBE(lock, contention_begin) {
            struct key k = {};
            k.addr = (u64)args->lock_addr;
            k.tgid = bpf_get_current_pid_tgid() >> 32;
            k.flags = args->flags;
            u64 zero = 0, *n = begins.lookup_or_try_init(&k, &zero);
            if (n) __sync_fetch_and_add(n, 1);
            return 1;       /* 0 would drop the event for other listeners */
        }""")
    out = tmp_path_factory.mktemp("filters") / "f.parquet"
    try:
        # every stack walked: -S then counts exactly (else unwalked waits are spread)
        subprocess.run([sys.executable, "-m", "kvmlockprof", "record", "-q", "-o", str(out),
                        "--stack-budget", "0",
                        "--", *workload_argv("--duration", 4, "--vcpus", 2, "--churn")],
                       check=True, cwd=ROOT, timeout=300)
        begins = {(k.addr, k.tgid, k.flags): v.value for k, v in counter["begins"].items()}
    finally:
        counter.cleanup()
    return kvmlockprof.load(out), begins


def _oracle(begins, pid, addr=None, flags=None):
    return sum(n for (a, t, f), n in begins.items() if t == pid and
               (addr is None or a == addr) and (flags is None or f in flags))


def test_type_filter_counts_what_the_kernel_flagged(filtered_run):
    rec, begins = filtered_run
    pid = rec.manifest["command_pid"]
    spin = analysis.top(rec, pids=[pid], filters={"types": ("spinlock",)})
    rw = analysis.top(rec, pids=[pid], filters={"types": ("rwlock:W",)})
    assert set(spin["type"]) <= {"spinlock"} and set(rw["type"]) <= {"rwlock:W"}
    for df, flags in ((spin, {LCB_F_SPIN}), (rw, {LCB_F_SPIN | LCB_F_WRITE})):
        want = _oracle(begins, pid, flags=flags)
        got = int(df["contended"].sum())
        print(f"-Y {flags}: kvmlockprof {got}, the kernel's begins {want}")
        assert want > 0 and abs(got - want) <= max(2, 0.01 * want), (got, want)


def test_lock_filter_by_kvm_name_counts_that_lock(filtered_run):
    rec, begins = filtered_run
    pid = rec.manifest["command_pid"]
    names = analysis.lock_names(rec)
    mmu = next(int(a, 16) for a, n in names.items() if n == f"kvm({pid})->mmu_lock")
    df = analysis.top(rec, pids=[pid], filters={"locks": ("kvm->mmu_lock",)})
    assert set(df["lock"]) == {f"kvm({pid})->mmu_lock"}, df
    want = _oracle(begins, pid, addr=mmu)
    got = int(df["contended"].sum())
    print(f"-L kvm->mmu_lock: kvmlockprof {got}, the kernel's begins {want}")
    assert want > 0 and abs(got - want) <= max(2, 0.01 * want), (got, want)
    by_addr = analysis.top(rec, pids=[pid], filters={"locks": (f"{mmu:#x}",)})
    assert int(by_addr["contended"].sum()) == got


def test_callstack_filter_keeps_stacks_through_the_frame(filtered_run):
    rec, _ = filtered_run
    df = analysis.top(rec, by="caller", filters={"callstacks": ("kvm_vm_ioctl",)})
    assert not df.empty
    st = analysis.stacks_of(rec)
    through = {int(s) for s, f in zip(st["stack_id"], st["frames"])
               if any("kvm_vm_ioctl" in x for x in f)}
    aggs = analysis.annotated_aggregates(rec)
    want = int(aggs[aggs["stack_id"].isin(through)]["count"].sum())
    assert int(df["contended"].sum()) == want and not df["estimated"].any()
    p = subprocess.run([sys.executable, "-m", "kvmlockprof", "report", rec.path, "-Y",
                        "mutex", "-L", "kvm->*", "-F", "csv"], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    assert p.stdout.count("\n") >= 2 and "mutex" in p.stdout


def test_record_a_vm_by_its_name(live, tmp_path):
    """record --vm NAME: the running VM whose -name is NAME, found in /proc and
    filtered in the kernel (its pid); nothing of another VM running beside it."""
    # long enough to outlive record's start-up (BPF compile, BTF: several seconds)
    vm = subprocess.Popen(workload_argv("--duration", 60, "--churn", "--name", "kvmlp-vm-a"),
                          cwd=ROOT, stdout=subprocess.DEVNULL)
    other = subprocess.Popen(workload_argv("--duration", 60, "--churn", "--name", "kvmlp-vm-b"),
                             cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        import time
        time.sleep(1)                       # both running, named
        out = tmp_path / "a.parquet"
        subprocess.run([sys.executable, "-m", "kvmlockprof", "record", "-q", "-o", str(out),
                        "--vm", "kvmlp-vm-a", "-d", "3"], check=True, cwd=ROOT, timeout=120)
    finally:
        for p in (vm, other):
            p.terminate()           # the workload stops early on SIGTERM
            p.wait(30)
    rec = kvmlockprof.load(out)
    assert rec.manifest["pid_filter"] == [vm.pid]
    tgids = set(rec.aggregates["tgid"])
    assert tgids == {vm.pid}, tgids
    assert set(analysis.per_vm(rec)["vm"]) == {"kvmlp-vm-a"}


def test_record_type_filter_in_the_kernel(live, tmp_path):
    """record -Y spinlock: the kernel drops every other wait of the workload at its
    begin (counted: `filtered` = the independent counter's other begins), so the
    ring buffer carries spin lock waits only, as many as the kernel flagged."""
    from kvmlockprof.kernel.bpfload import compile_bpf
    out = tmp_path / "y.parquet"
    # every begin by (process, flags): the command's pid is known only once it runs
    counter = compile_bpf(text="""
        struct key { u32 tgid; u32 flags; };
        BPF_HASH(begins, struct key, u64, 65536);
        TRACEPOINT_PROBE(lock, contention_begin) {
            struct key k = {};
            k.tgid = bpf_get_current_pid_tgid() >> 32;
            k.flags = args->flags;
            u64 zero = 0, *n = begins.lookup_or_try_init(&k, &zero);
            if (n) __sync_fetch_and_add(n, 1);
            return 1;
        }""")
    try:
        subprocess.run([sys.executable, "-m", "kvmlockprof", "record", "-q", "-o", str(out),
                        "-Y", "spinlock", "--",
                        *workload_argv("--duration", 3, "--vcpus", 2, "--churn")],
                       check=True, cwd=ROOT, timeout=300)
        begins = {(k.tgid, k.flags): v.value for k, v in counter["begins"].items()}
        counter_missed = counter_misses(counter)
    finally:
        counter.cleanup()
    rec = kvmlockprof.load(out)
    pid, c = rec.manifest["command_pid"], rec.manifest["counters"]
    assert rec.manifest["filters"]["type"]["where"] == "kernel"
    spin = sum(n for (t, f), n in begins.items() if t == pid and f == LCB_F_SPIN)
    other = sum(n for (t, f), n in begins.items() if t == pid and f != LCB_F_SPIN)
    samples = rec.table("contention")
    print(f"-Y spinlock in the kernel: {len(samples)} samples, {c['begin']} begins taken, "
          f"{c['filtered']} filtered; the kernel's spin begins {spin}, others {other}")
    assert set(analysis.lock_type(samples["flags"])) == {"spinlock"}
    assert spin > 0 and other > 0
    agree(c["begin"], spin, c["lost_recursion"], counter_missed)
    agree(c["filtered"], other, c["lost_recursion"], counter_missed)
    assert len(samples) == c["sampled"] and abs(len(samples) - spin) <= max(2, 0.01 * spin)


def thread_counter():
    """An independent BPF program (bcc, written here) counting every contention_begin
    and contention_end by (process, thread): {(tgid, tid): (begins, ends)} once read.
    Raw tracepoints, as kvmlockprof's: a perf-event tracepoint program is skipped
    while any other such BPF program runs on the CPU (the kernel's bpf_prog_active),
    so on a host with other BPF tools it would miss events the recorder sees."""
    from kvmlockprof.kernel.bpfload import compile_bpf
    return compile_bpf(text="""
        struct key { u32 tgid; u32 tid; };
        struct val { u64 begins; u64 ends; };
        BPF_HASH(counts, struct key, struct val, 65536);
        static inline struct val *slot(void) {
            u64 id = bpf_get_current_pid_tgid();
            struct key k = {.tgid = id >> 32, .tid = (u32)id};
            struct val zero = {};
            return counts.lookup_or_try_init(&k, &zero);
        }
        RAW_TRACEPOINT_PROBE(contention_begin) {
            struct val *v = slot();
            if (v) __sync_fetch_and_add(&v->begins, 1);
            return 0;
        }
        RAW_TRACEPOINT_PROBE(contention_end) {
            struct val *v = slot();
            if (v) __sync_fetch_and_add(&v->ends, 1);
            return 0;
        }""")


def agree(ours, theirs, ours_missed, theirs_missed):
    """Two counts of the same events agree but for the events the kernel skipped each
    side's program for (an event fired inside the handler, e.g. in an interrupt it
    took: lost_recursion, recursion_misses), each side's own count of those."""
    assert theirs - ours_missed <= ours <= theirs + theirs_missed, \
        (ours, theirs, ours_missed, theirs_missed)


def counter_misses(counter):
    """The events the kernel skipped the counter's programs for (recursion_misses)."""
    from kvmlockprof.kernel import bpfstats
    return sum(bpfstats.recursion_misses(f.fd) for f in counter.funcs.values())


def read_threads(counter):
    return {(k.tgid, k.tid): (v.begins, v.ends) for k, v in counter["counts"].items()}


def _report_rows(path, *args):
    import csv
    import io
    p = subprocess.run([sys.executable, "-m", "kvmlockprof", "report", str(path), *map(str, args),
                        "-F", "csv", "-n", "100000"], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    return list(csv.DictReader(io.StringIO(p.stdout)))


def test_report_tid_counts_that_threads_waits(live, tmp_path):
    """report --tid T selects T's waits from the samples: with every wait sampled and
    none lost, its waits are exactly the kernel's contention_end events of T (an
    independent counter); sampled 1 in 4, scaled and marked `~`, close to them."""
    from conftest import assert_none_left, kernel_objects
    before = kernel_objects()
    outs = {1: tmp_path / "all.parquet", 4: tmp_path / "every4.parquet"}
    counts = {}
    for every, out in outs.items():
        counter = thread_counter()
        try:
            subprocess.run([sys.executable, "-m", "kvmlockprof", "record", "-q", "-o", str(out),
                            "--sample-every", str(every), "--",
                            *workload_argv("--duration", 3, "--vcpus", 2, "--churn")],
                           check=True, cwd=ROOT, timeout=300)
            counts[every] = read_threads(counter)
        finally:
            counter.cleanup()
    assert_none_left(before)
    rec = kvmlockprof.load(outs[1])
    pid = rec.manifest["command_pid"]
    assert rec.manifest["losses"].get("lost_ringbuf_full", 0) == 0   # (else not exact)
    # waits whose end our handler never ran for: the kernel counts them (a lock contended
    # inside the handler nests an event the kernel does not give the running program)
    skipped = rec.manifest["losses"].get("lost_recursion", 0) + \
        rec.manifest["counters"].get("begin_without_end", 0)
    ends = {t: e for (g, t), (_, e) in counts[1].items() if g == pid and e}
    busiest = sorted(ends, key=ends.get, reverse=True)[:2]        # (vCPU threads, here)
    s = rec.table("contention", ["tid", "comm"])
    churn = sorted(set(s.loc[s["comm"].astype(str).str.startswith("kvmlp-churn"), "tid"]))
    for tids in ([busiest[0]], busiest, churn[:1]):
        rows = _report_rows(outs[1], "--tid", ",".join(map(str, tids)))
        got = sum(int(r["contended"]) for r in rows)
        want = sum(ends.get(t, 0) for t in tids)
        print(f"report --tid {tids}: {got} waits; the kernel's contention_end of those "
              f"threads {want} (our handlers skipped {skipped} on the whole host)")
        assert want > 0 and want - skipped <= got <= want, (got, want, skipped)
        assert {r["estimated"] for r in rows} == {"False"}
    p = subprocess.run([sys.executable, "-m", "kvmlockprof", "report", str(outs[1]), "--tid",
                        str(busiest[0])], capture_output=True, text=True, cwd=ROOT, check=True)
    assert f"threads {busiest[0]}: from the sampled waits (exact" in p.stdout
    # sampled 1 in 4: scaled to the process's in-kernel count, marked, near the kernel's
    # count for a busy thread
    rec4 = kvmlockprof.load(outs[4])
    ends4 = {t: e for (g, t), (_, e) in counts[4].items() if g == rec4.manifest["command_pid"]}
    t4 = max(ends4, key=ends4.get)
    rows = _report_rows(outs[4], "--tid", t4)
    got = sum(int(r["contended"]) for r in rows)
    print(f"report --tid {t4} of a 1-in-4 recording: ~{got}; the kernel's {ends4[t4]}")
    assert {r["estimated"] for r in rows} == {"True"}
    assert abs(got - ends4[t4]) <= 0.15 * ends4[t4], (got, ends4[t4])


def _threads(pid):
    """{tid: comm} of a running process."""
    import os
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                out[int(t)] = f.read().strip()
        except OSError:
            pass                        # (a thread that just exited)
    return out


def _all_stopped(pid):
    """Every thread of pid stopped by SIGSTOP (state T in /proc/PID/task/*/stat)."""
    import os
    states = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            pass
    return all(s in ("T", "t") for s in states)


def _until(cond, what, timeout=60):
    import time
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.05)


def test_record_tid_filter_in_the_kernel(live, tmp_path):
    """record -p PID --tid T: the kernel takes T's waits only, and counts every other
    begin of PID as filtered. The workload is stopped (SIGSTOP) outside the
    recording's window, so an independent counter of every contention_begin/end by
    thread sees exactly the window's events: T's begins = the recording's begins, T's
    ends = its waits, the other threads' begins = `filtered`."""
    import signal
    import time
    from conftest import assert_none_left, kernel_objects
    before = kernel_objects()
    out = tmp_path / "tid.parquet"
    work = subprocess.Popen(workload_argv("--duration", 120, "--vcpus", 2, "--churn"),
                            cwd=ROOT, stdout=subprocess.DEVNULL)
    rec_p = counter = None
    try:
        _until(lambda: any(c.startswith("kvmlp-churn") for c in _threads(work.pid).values()),
               "the workload's churn threads")
        tid = min(t for t, c in _threads(work.pid).items() if c.startswith("kvmlp-churn"))
        work.send_signal(signal.SIGSTOP)
        _until(lambda: _all_stopped(work.pid), "the workload stopped")
        counter = thread_counter()
        rec_p = subprocess.Popen([sys.executable, "-m", "kvmlockprof", "record", "-q", "-o",
                                  str(out), "-p", str(work.pid), "--tid", str(tid)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _until(lambda: (tmp_path / "tid.parquet.partial/manifest.json").exists() or
               rec_p.poll() is not None, "record armed")
        assert rec_p.poll() is None, rec_p.stderr.read()
        work.send_signal(signal.SIGCONT)
        time.sleep(3)
        work.send_signal(signal.SIGSTOP)
        _until(lambda: _all_stopped(work.pid), "the workload stopped")
        counts = read_threads(counter)
        counter_missed = counter_misses(counter)
        rec_p.send_signal(signal.SIGINT)
        assert rec_p.wait(120) == 0, rec_p.stderr.read()
    finally:
        for p in (rec_p, work):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        if counter:
            counter.cleanup()
    assert_none_left(before)
    rec = kvmlockprof.load(out)
    c = rec.manifest["counters"]
    assert rec.manifest["filters"]["tid"] == {"values": [tid], "where": "kernel"}
    mine = counts.get((work.pid, tid), (0, 0))
    others = sum(b for (g, t), (b, _) in counts.items() if g == work.pid and t != tid)
    waits = int(rec.aggregates["count"].sum())
    print(f"record -p {work.pid} --tid {tid} (a churn thread): {c['begin']} begins taken, "
          f"{waits} waits, {c['filtered']} other begins filtered; the kernel's: "
          f"{mine[0]} begins, {mine[1]} ends of that thread, {others} begins of the others; "
          f"lost_recursion {c['lost_recursion']}, the counter's {counter_missed}")
    assert mine[1] > 0 and others > 0
    # Either side's program is skipped for an event that fires inside it (an interrupt
    # taken in the handler): the kernel counts each side's (lost_recursion, and the
    # counter's recursion_misses), and nothing else may differ. A lost begin of T also
    # loses its wait (its end pairs with nothing).
    short = (mine[0] - c["begin"]) + (others - c["filtered"])
    assert -counter_missed <= short <= c["lost_recursion"], short
    assert -counter_missed <= mine[1] - waits <= c["lost_recursion"]
    for ours, theirs in ((c["begin"], mine[0]), (c["filtered"], others)):
        agree(ours, theirs, c["lost_recursion"], counter_missed)
    assert set(rec.aggregates["tgid"]) == {work.pid}
    assert set(rec.table("contention", ["tid"])["tid"]) == {tid}


def test_record_cgroup_filter_in_the_kernel(live, tmp_path):
    """record -a -G GROUP: a cgroup v2 group made here, the workload started inside it
    (its shell joins the group, then execs it). The recording holds that process
    only, and its begins and waits are those an independent counter saw in that
    group (by bpf_get_current_cgroup_id, not the filter's under-cgroup check); every
    other begin on the host in its window was counted as filtered."""
    import os
    import shlex
    import time
    from conftest import require, assert_none_left, kernel_objects
    from kvmlockprof.kernel.bpfload import compile_bpf
    from kvmlockprof.recording.filters import cgroup2_root
    root = cgroup2_root()
    require(None if root else "no cgroup v2 mounted (mount -t cgroup2 none "
             "/sys/fs/cgroup/unified)")
    name = f"kvmlp-test-{os.getpid()}"
    group = os.path.join(root, name)
    before = kernel_objects()
    out = tmp_path / "g.parquet"
    os.mkdir(group)
    counter = None
    try:
        cgid = os.stat(group).st_ino            # a cgroup v2 group's id: its inode
        # per-CPU counters (no map insert, no lock): begins and ends in the group, begins
        # elsewhere, the lowest and highest process seen in the group
        counter = compile_bpf(text="""
            BPF_PERCPU_ARRAY(counts, u64, 5);
            static inline void add(int i, u64 v, int how) {
                u64 *n = counts.lookup(&i);
                if (!n) return;
                if (how == 0) *n += v;
                else if (how < 0 ? (!*n || v < *n) : v > *n) *n = v;
            }
            static inline void seen(int begin) {
                u32 tgid = bpf_get_current_pid_tgid() >> 32;
                if (bpf_get_current_cgroup_id() != GROUP) {
                    if (begin) add(2, 1, 0);
                    return;
                }
                add(begin ? 0 : 1, 1, 0);
                add(3, tgid, -1);
                add(4, tgid, 1);
            }
            RAW_TRACEPOINT_PROBE(contention_begin) { seen(1); return 0; }
            RAW_TRACEPOINT_PROBE(contention_end) { seen(0); return 0; }
            """.replace("GROUP", f"{cgid}ULL"))
        work = shlex.join(workload_argv("--duration", 3, "--vcpus", 2, "--churn"))
        subprocess.run([sys.executable, "-m", "kvmlockprof", "record", "-q", "-o", str(out),
                        "-a", "-G", name, "--", "sh", "-c",
                        f"echo $$ > {group}/cgroup.procs && exec {work}"],
                       check=True, cwd=ROOT, timeout=300)
        per_cpu = [list(counter["counts"][i]) for i in range(5)]
        counter_missed = counter_misses(counter)
    finally:
        if counter:
            counter.cleanup()
        # the group is empty once its process is reaped; kill what may be left first
        deadline = time.time() + 30
        while os.path.isdir(group):
            try:
                with open(f"{group}/cgroup.procs") as f:
                    for pid in f.read().split():
                        os.kill(int(pid), 9)
                os.rmdir(group)
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
    assert_none_left(before)
    rec = kvmlockprof.load(out)
    c, pid = rec.manifest["counters"], rec.manifest["command_pid"]
    assert rec.manifest["filters"]["cgroup"]["where"] == "kernel"
    begins, ends, outside = (sum(per_cpu[i]) for i in range(3))
    lowest = min((x for x in per_cpu[3] if x), default=0)
    highest = max(per_cpu[4])
    waits = int(rec.aggregates["count"].sum())
    print(f"record -a -G {name}: {c['begin']} begins taken, {waits} waits, "
          f"{c['filtered']} begins filtered; the kernel's in the group: {begins} begins, "
          f"{ends} ends (processes {lowest}..{highest}), {outside} begins elsewhere on the "
          f"host (a longer window)")
    assert lowest == highest == pid and set(rec.aggregates["tgid"]) == {pid}
    assert ends > 0
    agree(c["begin"], begins, c["lost_recursion"], counter_missed)
    agree(waits, ends, c["lost_recursion"], counter_missed)
    assert 0 < c["filtered"] <= outside
