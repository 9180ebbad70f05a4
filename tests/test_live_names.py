"""Kernel locks named beyond kallsyms (KernelNamer), checked against what the kernel
says elsewhere: the run queues against BTF's per-CPU data section (bpftool's view of
`runqueues`), the mmap locks against the kernel stacks of their waits."""
import re
import subprocess
import sys
from collections import Counter

import pytest

import kvmlockprof
from conftest import ROOT, klp
from kvmlockprof.locktypes import LCB_F_SPIN

# The mm code's callers of down_read/down_write on mmap_lock (x86 and arm64 alike): the
# syscalls that change a process's mappings, its page faults, exit and remote access
MMAP_LOCK_PATHS = re.compile(r"^(__vm_munmap|vm_mmap_pgoff|lock_mm_and_find_vma|"
                             r"do_user_addr_fault|do_page_fault|mmap_(read|write)_lock|"
                             r"__do_sys_brk|do_vmi_munmap|do_mprotect_pkey|do_madvise|"
                             r"madvise_lock|madvise_do_behavior|__do_sys_mremap|do_mlock|__do_sys_mlockall|"
                             r"__do_sys_munlock|exit_mmap|__access_remote_vm|"
                             r"get_user_pages|__get_user_pages|"
                             # exit_mm's mmap_read_lock, inlined into do_exit on 6.18: a
                             # storm thread exiting while the others still map
                             r"exit_mm|do_exit)\w*\+")
RWSEM_ENTRY = re.compile(r"^(down_read|down_write)(_killable)?\+")


@pytest.fixture(scope="module")
def storm(live, tmp_path_factory):
    """Four threads of one process mapping and unmapping (tests/mmap_storm.py), every
    wait's stack walked."""
    out = tmp_path_factory.mktemp("names") / "storm.parquet"
    klp("record", "-q", "--duration", 8, "--stack-budget", 0, "-o", out, "--",
        sys.executable, f"{ROOT}/tests/mmap_storm.py", 6, 4, timeout=120)
    return kvmlockprof.load(out)


def _bpftool_btf():
    return subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                          capture_output=True, text=True, check=True).stdout


def _runqueues_offset():
    """`runqueues`' offset in the per-CPU section, from BTF (bpftool)."""
    dump = _bpftool_btf()
    m = re.search(r"offset=(\d+) size=\d+ \(VAR 'runqueues'\)", dump)
    assert m, "no runqueues in the kernel's per-CPU data section (BTF)"
    return int(m.group(1))


def test_run_queue_locks_are_each_cpus_runqueues(storm):
    """Every rq(cpu N) address, less rq.__lock's offset, is a per-CPU copy of
    `runqueues`: at BTF's offset of it from a page-aligned per-CPU base, one base per
    CPU. Found by running on each CPU (se.cfs_rq->rq), this checks against the
    kernel's own layout."""
    from kvmlockprof.kernel import btf
    kb = btf.Btf()
    off = kb.offset("rq", "__lock")
    if off is None:
        off = kb.offset("rq", "lock")
    rqs = {int(a, 16): v["name"] for a, v in storm.manifest["lock_names"].items()
           if v["name"].startswith("rq(")}
    assert rqs, "no run-queue lock contended while the storm ran"
    runqueues = _runqueues_offset()
    bases = {}
    for addr, name in rqs.items():
        cpu = int(re.match(r"rq\(cpu (\d+)\)", name).group(1))
        base = addr - off - runqueues
        assert base % 4096 == 0, (name, hex(addr), hex(runqueues))
        bases[cpu] = base
    assert len(set(bases.values())) == len(bases), bases
    # and a lock named inside another per-CPU variable lies inside that CPU's copy of
    # it (bpftool's offset and size of the variable)
    dump = _bpftool_btf()
    var = {v: (int(o), int(n)) for o, n, v in
           re.findall(r"offset=(\d+) size=(\d+) \(VAR '(\w+)'\)", dump)}
    for a, v in storm.manifest["lock_names"].items():
        m = re.match(r"(\w+)\(cpu (\d+)\)[\[.]", v["name"])
        if m and int(m.group(2)) in bases:
            o, n = var[m.group(1)]
            assert 0 <= int(a, 16) - bases[int(m.group(2))] - o < n, (a, v["name"])


def test_mmap_lock_named_with_its_process(storm):
    """The storm's contended rwsem is its own mm's mmap_lock: named mm(PID) with the
    storm's pid, and the kernel stacks of the waits on it all pass the mm code's
    mmap_lock paths; every other rwsem wait of the storm on such a path is on it."""
    pid = storm.manifest["pid_filter"][0]
    names = {int(a, 16): v["name"] for a, v in storm.manifest["lock_names"].items()}
    mm = [a for a, n in names.items() if n == f"mm({pid})->mmap_lock"]
    assert len(mm) == 1, names
    # the spinlock its waiters queue under, where contended: at rw_semaphore.wait_lock
    # (bpftool's layout) inside it
    m = re.search(r"STRUCT 'rw_semaphore' size=\d+ vlen=\d+\n((?:\t.*\n)+)", _bpftool_btf())
    wait_lock = int(re.search(r"'wait_lock' type_id=\d+ bits_offset=(\d+)", m.group(1))
                    .group(1)) // 8
    for a, n in names.items():
        if n == f"mm({pid})->mmap_lock.wait_lock":
            assert a == mm[0] + wait_lock, (hex(a), hex(mm[0]), wait_lock)
    frames = {int(s): list(f) for s, f in zip(storm.table("stacks")["stack_id"],
                                              storm.table("stacks")["frames"])}
    c = storm.table("contention")
    on_path = on_lock = 0
    for addr, sid, tgid, flags in zip(c["lock_addr"], c["stack_id"], c["tgid"], c["flags"]):
        f = frames.get(int(sid))
        if f is None or int(flags) & LCB_F_SPIN:      # (a spinlock inside an rwsem's wait)
            continue
        rwsem = [i for i, x in enumerate(f) if RWSEM_ENTRY.match(x)]
        path = bool(rwsem) and bool(MMAP_LOCK_PATHS.match(f[rwsem[0] + 1]))
        if int(addr) == mm[0]:
            on_lock += 1
            assert path and int(tgid) == pid, f
        elif path and int(tgid) == pid:
            on_path += 1
    assert on_lock > 50 and on_path == 0, (on_lock, on_path)


def test_lock_owners_are_the_threads_that_take_the_lock(live, tmp_path):
    """--lock-owner on the churn workload: only its churn threads change memslots, so
    only they ever hold kvm->slots_lock (the truth the workload sets); every owner the
    recording names for it is one of them, and nearly every wait has one (a mutex
    released just before the waiter's begin has none)."""
    from conftest import workload_argv
    out = tmp_path / "owners.parquet"
    klp("record", "-q", "--lock-owner", "-o", out, "--",
        *workload_argv("--duration", 4, "--vcpus", 2, "--churn", "--churn-threads", 2),
        timeout=120)
    rec = kvmlockprof.load(out)
    pid = rec.manifest["pid_filter"][0]
    from kvmlockprof.analysis import owners
    df = owners.lock_owners(rec)
    slots = df[df["lock"] == f"kvm({pid})->slots_lock"]
    assert len(slots) >= 1, df
    assert slots["owner"].str.match(r"kvmlp-churn\d \(\d+\)$").all(), slots
    assert (slots["vm"] != "?").all(), slots          # the owners' process is known
    assert slots["share"].sum() > 0.95, slots


# The page allocator's functions that take a zone's lock (mm/page_alloc.c; inlined
# ones show as their callers)
ZONE_LOCK_PATHS = re.compile(r"^(free_pcppages_bulk|free_one_page|rmqueue_bulk|"
                             r"__rmqueue_pcplist|rmqueue_buddy|__free_pages_ok|"
                             r"split_free_page)\+")


def test_zone_locks_are_the_kernels_zones(live, tmp_path):
    """Pages allocated and freed in bulk on both CPUs (tests/mmap_storm.py), per-CPU
    page lists made small (vm.percpu_pagelist_high_fraction) so that most of them take
    their zone's lock: every lock named zone(Node N, TYPE)->lock has its walked waits
    in the page allocator's zone functions only (the kernel's stacks) and is a zone
    /proc/zoneinfo lists; every lock waited on from those functions is named so."""
    knob = "/proc/sys/vm/percpu_pagelist_high_fraction"
    with open(knob) as f:
        before = f.read().strip()
    out = tmp_path / "zones.parquet"
    try:
        with open(knob, "w") as f:
            f.write("100000000")
        klp("record", "-q", "-a", "--stack-budget", 0, "-o", out, "--",
            sys.executable, f"{ROOT}/tests/mmap_storm.py", 4, 1, "--processes", 2,
            "--mb", 64, timeout=120)
    finally:
        with open(knob, "w") as f:
            f.write(before)
    rec = kvmlockprof.load(out)
    names = {int(a, 16): v["name"] for a, v in rec.manifest["lock_names"].items()}
    frames = dict(zip(rec.table("stacks")["stack_id"], rec.table("stacks")["frames"]))
    callers = {}
    for a, sid in zip(rec.aggregates["lock_addr"], rec.aggregates["stack_id"]):
        f = frames.get(int(sid))
        if f is not None:
            callers.setdefault(int(a), set()).update(
                x.split("+")[0] for x in f[:8] if ZONE_LOCK_PATHS.match(x))
    with open("/proc/zoneinfo") as f:
        zones = set(re.findall(r"^Node (\d+), zone\s+(\S+)$", f.read(), re.M))
    named = {a: n for a, n in names.items() if n.startswith("zone(")}
    print({f"{a:#x}": (n, sorted(callers.get(a, ()))) for a, n in named.items()})
    assert named, "no zone lock contended while the storm ran"
    for a, n in named.items():
        node, typ = re.match(r"zone\(Node (\d+), (\w+)\)->lock$", n).groups()
        assert (node, typ) in zones, (n, zones)
        assert callers.get(a), (hex(a), n, "no wait of it from the zone functions")
    waited = {a for a, c in callers.items() if c}
    assert waited <= set(named), {hex(a): names.get(a) for a in waited - set(named)}


_SPIN_ENTRY = re.compile(r"^(bpf_|_raw_spin_lock|__pv_queued_spin_lock_slowpath|"
                         r"queued_spin_lock_slowpath|native_queued_spin_lock_slowpath|"
                         r"do_raw_spin_lock)")


def _spin_caller(frames):
    """The function that took the spinlock: the first frame past the tracer's and the
    spinlock's own (the kernel's stack, read as text)."""
    return next((f for f in frames if not _SPIN_ENTRY.match(f)), "")


def test_private_futex_buckets_named_with_their_process(live, tmp_path):
    """Two processes of threads waking each other (tests/futex_storm.py), the whole
    host recorded: on a kernel with private futex hashes (mm_struct.futex_phash), the
    bucket locks each waits on are named futex_hash_bucket(PID)->lock@ADDR with its own
    pid; every wait on such an address is of that process (the kernel's tgid of each
    wait), never of the other, and from the futex code (its stacks)."""
    from kvmlockprof.kernel import btf
    if btf.Btf(modules=[]).offset("mm_struct", "futex_phash") is None:
        pytest.skip("no private futex hash in this kernel (6.16+)")
    out = tmp_path / "futex.parquet"
    storm = f"{sys.executable} {ROOT}/tests/futex_storm.py 5 16"
    klp("record", "-q", "-a", "--stack-budget", 0, "-o", out, "--", "sh", "-c",
        f"{storm} & {storm} & wait", timeout=120)
    rec = kvmlockprof.load(out)
    names = {int(a, 16): v["name"] for a, v in rec.manifest["lock_names"].items()}
    futex = {a: n for a, n in names.items() if n.startswith("futex_hash_bucket(")}
    comm = {int(t): p.get("cmdline", "") for t, p in rec.manifest["processes"].items()}
    storms = {t for t, c in comm.items() if c.split()[1:2] == [f"{ROOT}/tests/futex_storm.py"]}
    assert len(storms) == 2, comm
    named = {int(re.match(r"futex_hash_bucket\((\d+)\)", n).group(1)) for n in futex.values()}
    frames = dict(zip(rec.table("stacks")["stack_id"], rec.table("stacks")["frames"]))
    # the storms whose spinlock waits came from the futex code: each has its buckets
    a = rec.aggregates
    hashed = {int(t) for t, sid, fl in zip(a["tgid"], a["stack_id"], a["flags"])
              if int(t) in storms and fl == LCB_F_SPIN and
              _spin_caller(frames.get(int(sid), [])).startswith(
                  ("futex_wake+", "futex_wait_setup+", "futex_q_lock+"))}
    callers = Counter(_spin_caller(frames.get(int(sid), [])).split("+")[0] or "(no stack)"
                      for t, sid, fl in zip(a["tgid"], a["stack_id"], a["flags"])
                      if int(t) in storms and fl == LCB_F_SPIN)
    assert hashed, f"no futex bucket contended by the storms; their spin waits' callers: " \
                   f"{callers.most_common(8)}"
    assert hashed <= named, (hashed, futex)
    aggs = a[a["lock_addr"].isin(list(futex))]
    for addr, tgid, sid in zip(aggs["lock_addr"], aggs["tgid"], aggs["stack_id"]):
        assert futex[int(addr)] == f"futex_hash_bucket({int(tgid)})->lock@{int(addr):x}"
        f = frames.get(int(sid))
        if f is not None:
            assert any(x.startswith("futex_") for x in f[:8]), list(f[:8])


def test_the_demos_top_locks_are_named(live, tmp_path):
    """`make demo`'s recording (the built-in workload churning memslots): of the top 25
    rows of `report --format json`, at most 2 are bare addresses."""
    import json
    from conftest import workload_argv
    out = tmp_path / "demo.parquet"
    klp("record", "-q", "-o", out, "--",       # (record ends with its command, as the demo)
        *workload_argv("--duration", 6, "--vcpus", 2, "--churn"), timeout=120)
    rows = json.loads(klp("report", out, "--format", "json", "--limit", 25).stdout)["rows"]
    bare = [(r["lock"], r["caller"]) for r in rows if str(r["lock"]).startswith("0x")]
    print(f"{len(rows)} rows, {len(bare)} bare: {bare}")
    assert len(bare) <= 2, bare


_ALLOC = re.compile(r" (kmem_cache_alloc|kmalloc): call_site=\S+ ptr=([0-9a-f]+) "
                    r"(?:name=(\S+) )?bytes_req=\d+ bytes_alloc=(\d+) .* accounted=(\w+)$")


def test_slab_objects_named_by_their_cache(live, tmp_path):
    """Threads contending a pipe's mutex and a shared file offset's (tests/slab_storm.py:
    both objects allocated as it starts), the kernel's allocation events traced
    meanwhile (an ftrace instance: kmem:kmem_cache_alloc names the cache, kmem:kmalloc
    gives the size and whether it is accounted). Every lock named `&CACHE@ADDR` whose
    object's allocation the tracer saw is in that object (the latest allocation
    covering the address) and that cache: kmem_cache_alloc's name, or for kmalloc
    the size class /proc/slabinfo lists with that object size, `cg-` where accounted.
    The pipe's and the file's locks are among them."""
    from ftrace import Ftrace
    from kvmlockprof.kernel import btf
    if btf.kfunc_id(btf.Btf(modules=[]), "bpf_get_kmem_cache") is None:
        pytest.skip("this kernel has no bpf_get_kmem_cache (6.13+): slab objects stay "
                    "unnamed, as doctor says")
    out = tmp_path / "slab.parquet"
    tr = Ftrace("kvmlp_test_slab", {"kmem/kmem_cache_alloc": None, "kmem/kmalloc": None})
    try:
        klp("record", "-q", "--duration", 6, "-o", out, "--",
            sys.executable, f"{ROOT}/tests/slab_storm.py", 4, timeout=120)
        tr.stop()
        assert tr.overruns() == 0
        allocs = [m.groups() for m in map(_ALLOC.search, tr._read("trace").splitlines()) if m]
    finally:
        tr.remove()
    with open("/proc/slabinfo") as f:
        objsize = {ln.split()[0]: int(ln.split()[3]) for ln in f.readlines()[2:]}
    rec = kvmlockprof.load(out)
    named = {int(a, 16): v["name"].split("@")[0][1:]
             for a, v in rec.manifest["lock_names"].items() if v["name"].startswith("&")}
    covering = {}                   # lock address -> the latest allocation around it
    for ev, ptr, cache, size, accounted in allocs:
        p = int(ptr, 16)
        for a in named:
            if p <= a < p + int(size):
                covering[a] = (ev, cache, int(size), accounted == "true")
    checked = {}
    for a, cache in named.items():
        if a not in covering:
            continue                # allocated before the tracer started
        ev, traced, size, accounted = covering[a]
        if ev == "kmem_cache_alloc":
            assert cache == traced, (hex(a), cache, covering[a])
        else:
            assert cache.split("kmalloc-")[0] in ("", "dma-"), (hex(a), cache, covering[a])
            assert objsize.get(cache) == size, (hex(a), cache, covering[a])
            assert ("-cg-" in cache) == accounted, (hex(a), cache, covering[a])
        checked[hex(a)] = cache
    print(f"{len(named)} slab names, {len(checked)} checked against the allocations: "
          f"{checked}")
    callers = {}
    frames = dict(zip(rec.table("stacks")["stack_id"], rec.table("stacks")["frames"]))
    for a, sid in zip(rec.aggregates["lock_addr"], rec.aggregates["stack_id"]):
        callers.setdefault(hex(int(a)), set()).update(
            x.split("+")[0] for x in frames.get(int(sid), [])[:10])
    pipe = [a for a in checked if callers.get(a, set()) & {"anon_pipe_write", "pipe_write"}]
    file = [a for a in checked if "fdget_pos" in callers.get(a, set())]
    assert pipe and file, (checked, {a: sorted(callers.get(a, ())) for a in checked})
    assert checked[file[0]] == "filp"


def _inside(frames, stacks, n=6):
    """Whether a stack's first n frames (innermost first) are a run of one of these
    stacks: the kernel leaves the scheduler's own functions (.sched.text) out of another
    task's stack, which its tracer's shows."""
    want = tuple(frames[:n])
    return bool(want) and any(want == s[j:j + len(want)] for s in stacks
                              for j in range(len(s)))


def test_owner_stacks_are_where_the_kernel_switched_them_out(live, tmp_path):
    """--lock-owner on the churn workload, the kernel's tracer recording the kernel
    stack of each churn thread as it is switched out (an ftrace instance: sched_switch
    with a stacktrace trigger on prev_comm): every owner stack the recording keeps for
    kvm->slots_lock (taken while its owner slept) is a run of one of the stacks the
    tracer saw that very thread switched out with (the kernel leaves the scheduler's
    own frames out of another task's stack; a stack read while its task ran again
    would not be); and each is inside the VM ioctl."""
    from conftest import workload_argv
    from ftrace import Ftrace
    from kvmlockprof.kernel import btf
    kb = btf.Btf(modules=[])
    if btf.kfunc_id(kb, "bpf_task_from_pid") is None:
        pytest.skip("this kernel has no bpf_task_from_pid: owner stacks are not taken, "
                    "as the manifest says")
    out = tmp_path / "owners.parquet"
    tr = Ftrace("kvmlp_test_owner_stacks", {"sched/sched_switch": 'prev_comm ~ "kvmlp-churn*"'})
    trig = f"{tr.dir}/events/sched/sched_switch/trigger"
    with open(trig, "w") as f:
        f.write('stacktrace if prev_comm ~ "kvmlp-churn*"')
    try:
        klp("record", "-q", "--lock-owner", "-o", out, "--",
            *workload_argv("--duration", 4, "--vcpus", 2, "--churn", "--churn-threads", 2),
            timeout=120)
        tr.stop()
        text = tr._read("trace")
    finally:
        with open(trig, "w") as f:
            f.write('!stacktrace if prev_comm ~ "kvmlp-churn*"')
        tr.remove()
    seen, tid, frames = {}, None, []        # tid -> the stacks it was switched out with
    for line in text.splitlines() + [""]:
        if line.startswith(" => "):
            frames.append(line[4:].split("+")[0].strip())
            continue
        if "<stack trace>" in line:         # (the trigger's entry, after its event's)
            continue
        if tid is not None and frames:
            seen.setdefault(tid, set()).add(tuple(frames))
        tid, frames = None, []
        m = re.search(r"sched_switch: prev_comm=\S+ prev_pid=(\d+)", line)
        if m:
            tid = int(m.group(1))
    assert seen, "the tracer saw no churn thread switched out"
    rec = kvmlockprof.load(out)
    status = rec.manifest["probes"]["contention"]
    assert status.get("owner_stacks") is True, status.get("owner_stacks")
    pid = rec.manifest["pid_filter"][0]
    names = {int(a, 16): v["name"] for a, v in rec.manifest["lock_names"].items()}
    t = rec.table("owner_stacks")
    slots = t[[names.get(int(a)) == f"kvm({pid})->slots_lock" for a in t["lock_addr"]]]
    assert len(slots), t
    for o, fr in zip(slots["owner"], slots["frames"]):
        ours = [str(f).split("+")[0] for f in fr]
        assert _inside(ours, seen.get(int(o), ())), (int(o), ours[:10],
                                                     sorted(seen.get(int(o), ()))[:5])
    # the lock is only ever held inside the VM ioctl (kvm_set_memory_region's)
    assert all(any(str(f).startswith("kvm_vm_ioctl") for f in fr)
               for fr in slots["frames"]), list(slots["frames"])
    print(f"{len(slots)} owner stacks of slots_lock, all among the tracer's "
          f"{sum(map(len, seen.values()))} switch-out stacks of those threads")
