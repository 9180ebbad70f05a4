"""KVM-aware lock names: BTF field paths checked against pahole's offsets, and
the VM-base inference on aggregates built here."""
import os
import re
import shutil
import subprocess

import pandas as pd
import pyarrow as pa
import pytest

from kvmlockprof.kernel import btf
from kvmlockprof.recording import locknames

VMLINUX = "/sys/kernel/btf/vmlinux"
LOCK_MEMBER = re.compile(r"^\t(struct mutex|spinlock_t|rwlock_t|struct rw_semaphore|"
                         r"struct xarray|raw_spinlock_t)\s+(\w+);\s+/\*\s+(\d+)\s+(\d+)")


@pytest.fixture(scope="module")
def kbtf():
    if not os.path.exists(VMLINUX) or not shutil.which("pahole"):
        if os.environ.get("CI"):
            pytest.fail("CI needs kernel BTF and pahole (make setup installs dwarves)")
        pytest.skip("no kernel BTF or no pahole")
    return btf.Btf()


def pahole_locks(struct):
    """(type, member, offset) of struct's top-level lock members, as pahole prints them."""
    out = subprocess.run(["pahole", "-C", struct, VMLINUX], capture_output=True, text=True,
                         check=True).stdout
    return [(m.group(1), m.group(2), int(m.group(3)))
            for m in map(LOCK_MEMBER.match, out.splitlines()) if m]


def test_lock_paths_match_pahole_offsets(kbtf):
    locks = pahole_locks("kvm")
    names = {name for _, name, _ in locks}
    assert {"mmu_lock", "slots_lock", "lock", "slots_arch_lock", "irq_lock",
            "vcpu_array"} <= names, locks
    for typ, name, off in locks:
        want = f"{name}.xa_lock" if typ == "struct xarray" else name
        assert kbtf.lock_path("kvm", off) == want, (typ, name, off)
        assert kbtf.lock_path("kvm", off + 1) is None          # inside, not at the start


def test_vcpu_mutex_path(kbtf):
    off = dict((n, o) for _, n, o in pahole_locks("kvm_vcpu"))["mutex"]
    assert kbtf.lock_path("kvm_vcpu", off) == "mutex"


def _aggs(rows):
    return pd.DataFrame(rows, columns=["lock_addr", "flags", "stack_id", "tgid", "count"])


def test_vm_base_inferred_from_an_mmu_rwlock(kbtf):
    namer = locknames.LockNamer(kbtf)
    base = 0xffff888100000000
    mmu, slots = base + kbtf.offset("kvm", "mmu_lock"), base + kbtf.offset("kvm", "slots_lock")
    SPIN_W, SPIN_R, MUTEX = 1 | 4, 1 | 2, 32
    aggs = _aggs([(mmu, SPIN_W, 1, 4242, 10),          # write side under kvm_mmu_*
                  (slots, MUTEX, 2, 4242, 5),
                  (0xffff888200000000, SPIN_R, 3, 77, 9)])    # an rwlock elsewhere
    namer.infer(aggs, {1: "kvm_mmu_free_roots+0x1cc", 2: "kvm_vm_ioctl+0xb19",
                       3: "ep_poll+0x10"})
    assert list(namer.vms) == [base]
    assert "inferred" in namer.vms[base]["how"]
    names = namer.names([mmu, slots, 0xffff888200000000, base + 100_000])
    assert names[f"{mmu:#x}"]["name"] == "kvm(4242)->mmu_lock"
    assert names[f"{slots:#x}"]["name"] == "kvm(4242)->slots_lock"
    assert len(names) == 2                     # the others are not inside this VM


def test_observed_vm_wins_over_inference(kbtf):
    namer = locknames.LockNamer(kbtf)
    base = 0xffff888100000000
    namer.observe(vms=pd.DataFrame({"kvm": [base], "tgid": [99], "first_ns": [0]}))
    namer.infer(_aggs([(base, 1 | 4, 1, 5, 1)]), {1: "kvm_mmu_load+0x1"})
    assert namer.vms[base]["tgid"] == 99 and "observed" in namer.vms[base]["how"]


def test_lock_offsets_table_agrees_with_lock_path(kbtf):
    table = kbtf.lock_offsets("kvm")
    assert table[kbtf.offset("kvm", "mmu_lock")] == "mmu_lock"
    for off, path in table.items():
        assert kbtf.lock_path("kvm", off) == path


def test_locks_inside_locks_are_named(kbtf):
    """A mutex's own spinlock contends too (kvm_vm_ioctl under memslot churn):
    kvm->slots_lock.wait_lock, at the offsets pahole gives."""
    kvm = dict((n, o) for _, n, o in pahole_locks("kvm"))
    mutex = dict((n, o) for _, n, o in pahole_locks("mutex"))
    assert "wait_lock" in mutex
    assert kbtf.lock_path("kvm", kvm["slots_lock"] + mutex["wait_lock"]) == \
        "slots_lock.wait_lock"


def test_locks_inside_the_vendor_container_drop_its_member(kbtf):
    """struct kvm sits in kvm_svm/kvm_vmx/kvm_pvm as member `kvm`, but struct kvm_vcpu in
    vcpu_svm/... as member `vcpu`: either way the name is the embedded struct's path
    (kvm(PID)->vcpu0->mutex, not ->vcpu.mutex)."""
    namer = locknames.LockNamer(kbtf)
    vcpu = dict((n, o) for _, n, o in pahole_locks("kvm_vcpu"))
    kvm = dict((n, o) for _, n, o in pahole_locks("kvm"))
    assert namer.locks["kvm_vcpu"][vcpu["mutex"]] == "mutex"
    assert namer.locks["kvm"][kvm["slots_lock"]] == "slots_lock"
    base = 0xffff888104560000
    namer.vcpus[base] = {"tgid": 7, "kvm": 1, "vcpu_idx": 0, "how": "test"}
    assert namer.name(base + vcpu["mutex"])[0] == "kvm(7)->vcpu0->mutex"


# --- lifetimes: an address the kernel reuses for another VM ------------------------------

BASE = 0xffffc90001230000
VCPU = 0xffff888104560000


def vm_rows(*rows):
    return pd.DataFrame(rows, columns=["kvm", "tgid", "first_ns"])


def vm_ends(*rows):
    return pd.DataFrame(rows, columns=["kvm", "first_ns", "tgid", "end_ns"])


def vcpu_rows(*rows):
    return pd.DataFrame(rows, columns=["vcpu", "kvm", "tid", "tgid", "vcpu_idx", "vcpu_id",
                                       "first_ns"])


def vcpu_ends(*rows):
    return pd.DataFrame(rows, columns=["vcpu", "first_ns", "kvm", "tid", "tgid", "vcpu_idx",
                                       "vcpu_id", "end_ns"])


def test_registry_keeps_every_owner_of_an_address():
    reg = locknames.Registry()
    reg.observe(vms=vm_rows((BASE, 100, 10)), now_ns=50)
    reg.observe(vms=vm_rows((BASE, 100, 10)), now_ns=60)
    assert reg.lifetimes("vms")[BASE][0]["last_ns"] == 60
    v0 = reg.version
    # VM 100 destroyed at 70 (the ended map), pid 200's VM got the address at 80
    reg.observe(vms=vm_rows((BASE, 200, 80)), vm_ends=vm_ends((BASE, 10, 100, 70)), now_ns=90)
    assert reg.version > v0
    lives = reg.lifetimes("vms")[BASE]
    assert [(r["tgid"], r["first_ns"], r["last_ns"], r["end_ns"]) for r in lives] == \
        [(100, 10, 70, 70), (200, 80, 90, 0)]
    v1 = reg.version
    # the ended map is read again at every flush (LRU): nothing new
    reg.observe(vms=vm_rows((BASE, 200, 80)), vm_ends=vm_ends((BASE, 10, 100, 70)), now_ns=95)
    assert reg.version == v1
    t = reg.tables()["vms"]
    assert t.column_names == ["kvm", "tgid", "first_ns", "last_ns", "end_ns"]
    assert t.column("tgid").to_pylist() == [100, 200]
    assert t.schema.field("kvm").type == pa.uint64()


def test_registry_sees_a_lifetime_that_began_and_ended_between_snapshots():
    reg = locknames.Registry()
    reg.observe(vcpu_ends=vcpu_ends((VCPU, 5, BASE, 11, 100, 0, 0, 9)), now_ns=20)
    (row,) = reg.lifetimes("vcpus")[VCPU]
    assert (row["first_ns"], row["last_ns"], row["end_ns"], row["tid"]) == (5, 9, 9, 11)
    # a vCPU thread moving (KVM_RUN from another thread): the same lifetime
    reg.observe(vcpus=vcpu_rows((VCPU, BASE, 12, 200, 0, 0, 30)), now_ns=31)
    reg.observe(vcpus=vcpu_rows((VCPU, BASE, 13, 200, 0, 0, 30)), now_ns=32)
    assert [r["tid"] for r in reg.lifetimes("vcpus")[VCPU]] == [11, 13]
    assert reg.tables()["vcpus"].num_rows == 2


def test_reused_vm_address_is_named_by_its_latest_owner(kbtf):
    namer = locknames.LockNamer(kbtf)
    slots = BASE + kbtf.offset("kvm", "slots_lock")
    namer.observe(vms=vm_rows((BASE, 100, 10)), now_ns=20)
    assert namer.names([slots])[f"{slots:#x}"]["name"] == "kvm(100)->slots_lock"
    namer.observe(vms=vm_rows((BASE, 200, 80)), vm_ends=vm_ends((BASE, 10, 100, 70)), now_ns=90)
    named = namer.names([slots])[f"{slots:#x}"]
    assert named["name"] == "kvm(200)->slots_lock"
    assert "observed" in named["how"] and "2 owners" in named["how"] and "100, 200" in named["how"]
    vms = namer.manifest()["vms"]
    assert vms[f"{BASE:#x}"]["tgid"] == 200
    assert [o["tgid"] for o in vms[f"{BASE:#x}"]["owners"]] == [100, 200]


def test_overlapping_vms_name_by_the_newer(kbtf):
    """A destroyed VM's memory may hold part of a newer one at another base: an
    address inside both is the newer VM's."""
    namer = locknames.LockNamer(kbtf)
    old, new = BASE, BASE - 0x1000
    slots = new + kbtf.offset("kvm", "slots_lock")
    assert slots - old < namer.layout["kvm"][1]          # inside the old one's extent too
    namer.observe(vms=vm_rows((new, 200, 80)), vm_ends=vm_ends((old, 10, 100, 70)), now_ns=90)
    assert namer.names([slots])[f"{slots:#x}"]["name"] == "kvm(200)->slots_lock"


def test_reused_vcpu_address_is_named_by_its_new_vm(kbtf):
    namer = locknames.LockNamer(kbtf)
    other = BASE + 0x100000
    mutex = VCPU + dict((n, o) for _, n, o in pahole_locks("kvm_vcpu"))["mutex"]
    namer.observe(vms=vm_rows((other, 200, 80)),
                  vcpus=vcpu_rows((VCPU, other, 201, 200, 1, 1, 85)),
                  vm_ends=vm_ends((BASE, 10, 100, 70)),
                  vcpu_ends=vcpu_ends((VCPU, 12, BASE, 101, 100, 0, 0, 69)), now_ns=90)
    assert namer.names([mutex])[f"{mutex:#x}"]["name"] == "kvm(200)->vcpu1->mutex"


def test_session_learns_the_registry_without_contention(kbtf):
    """The registry is learnt (and its manifest written) even when no lock has
    contended yet: record calls observe at every flush."""
    names = locknames.SessionNames(ksyms=None, kbtf=kbtf)
    names.update(pd.DataFrame(), vms=vm_rows((BASE, 100, 10)))
    assert names.manifest()["kvm_objects"]["vms"][f"{BASE:#x}"]["tgid"] == 100
    assert names.registry.tables()["vms"].num_rows == 1


class FakeSource:
    """What Recorder._flush reads of a BPF source, from canned snapshots."""

    def __init__(self, snaps, counters=None, waits=False):
        self.snaps, self._counters = snaps, counters or {}
        self.role = "waits" if waits else "functions"

    def poll(self):
        return {}

    def lock_kinds(self):
        return {}

    def prog_fds(self):
        return {}                   # no programs whose cost to measure

    def event_dtypes(self):
        return {}

    def snapshots(self):
        return self.snaps

    def counters(self):
        return self._counters


class NoSymbols:
    def data_symbols(self, addrs):
        return [None] * len(addrs)


def test_record_keeps_every_owner_and_names_the_latest(kbtf, tmp_path):
    """Recorder's flushes (no BPF: canned map snapshots): VM 100 at an address,
    then destroyed, and VM 200 there; the recording's vms table keeps both
    lifetimes, its lock there is named after 200, and the vms probe's counters
    reach probe_counters."""
    import kvmlockprof
    from kvmlockprof.recording import recorder as record
    from kvmlockprof.recording.store import Writer
    slots = BASE + kbtf.offset("kvm", "slots_lock")
    aggs = pd.DataFrame({"lock_addr": [slots], "tgid": [200], "flags": [32],
                         "stack_id": [-1], "count": [5], "total_ns": [500], "max_ns": [200],
                         "min_ns": [50]}).astype("uint64")
    aggs["hist"] = [[0] * 64]
    rec = record.Recorder(tmp_path / "r.parquet")
    rec.manifest = rec._manifest_head()
    rec.manifest["start_monotonic_ns"] = 0
    rec.names = locknames.SessionNames(NoSymbols(), kbtf)
    rec.writer = Writer(rec.out)
    rec.snapshots = record.Snapshots(rec.writer)
    rec.seen_stacks = {"contention": set(), "functions": set()}
    rec.named_for, rec.pending = None, {}
    contention = FakeSource({"aggregates": pa.Table.from_pandas(aggs, preserve_index=False)},
                            {"end": 5}, waits=True)
    counters = {"vms": {"vms_created": 2, "vms_destroyed": 1, "vcpus_created": 2,
                        "vcpus_destroyed": 1}}
    for snaps in ({"vms": vm_rows((BASE, 100, 10))},
                  {"vms": vm_rows((BASE, 200, 80)), "vm_ends": vm_ends((BASE, 10, 100, 70))}):
        functions = FakeSource({t: pa.Table.from_pandas(df.astype("uint64"), preserve_index=False)
                                for t, df in snaps.items()}, counters)
        rec.sources = {"contention": contention, "functions": functions}
        rec._flush()
    rec.writer.finalize(rec.manifest)
    out = kvmlockprof.load(rec.out)
    vms = out.table("vms")
    assert list(zip(vms["kvm"], vms["tgid"], vms["end_ns"])) == [(BASE, 100, 70), (BASE, 200, 0)]
    assert out.manifest["lock_names"][f"{slots:#x}"]["name"] == "kvm(200)->slots_lock"
    assert out.manifest["kvm_objects"]["vms"][f"{BASE:#x}"]["owners"][0]["tgid"] == 100
    assert out.manifest["probe_counters"]["vms"]["vcpus_destroyed"] == 1
    assert "vm_ends" not in out.table_names                  # only as lifetimes


def test_kernel_namer_names_run_queues_and_mmap_locks():
    """rq(cpu N) at rq's lock offset (BTF), mm(PID) as told; only the addresses asked
    about; an mm address a newer process took named by the newer one."""

    class Layout:
        enums = {}

        def offset(self, struct, field):
            return {("rq", "__lock"): 0}.get((struct, field))

        def size(self, struct):
            return None
    k = locknames.KernelNamer(Layout())
    k.run_queues({0: 0xffff888627c2fb80, 1: 0xffff888627d2fb80})
    k.lock_kinds({0xffff888161fa64b8: ("mm", 100, -1)})
    k.lock_kinds({0xffff888161fa64b8: ("mm", 200, -1), 0x1234: ("unknown kind", 1, -1)})
    names = k.names([0xffff888627d2fb80, 0xffff888161fa64b8, 0x1234, 0xffff888627c2fb80 + 8])
    assert {a: v["name"] for a, v in names.items()} == {
        "0xffff888627d2fb80": "rq(cpu 1)->__lock", "0xffff888161fa64b8": "mm(200)->mmap_lock"}
    assert locknames.KernelNamer(None).names([0xffff888627c2fb80]) == {}


def test_kernel_namer_classes_by_caller_and_on_stack():
    """A lock whose walked callers all take one kind of lock gets that class; callers
    that disagree, or unknown ones, or a sleeping wait on it leave it unnamed; a lock on
    its waiter's stack is named by the caller of the wait that told it;
    try_to_wake_up's pi_lock only once the run queues are known (its other lock is a
    run queue's)."""

    class Layout:
        enums = {}

        def offset(self, struct, field):
            return {("rq", "__lock"): 0}.get((struct, field))

        def size(self, struct):
            return None
    k = locknames.KernelNamer(Layout())
    callers = {1: {"futex_wake+0x102", "futex_q_lock+0x2a"}, 2: {"futex_wake+0x10", "foo+0x1"},
               3: {"free_pcppages_bulk+0x5d"}, 4: {"try_to_wake_up+0x4e"},
               5: {"complete+0x1c", "__synchronize_srcu+0xd7"}, 6: {"bar+0x3"},
               7: {"free_one_page+0x40"}}
    k.lock_kinds({5: ("stack", 77, 12)})
    got = {a: v["name"] for a, v in k.names(range(1, 9), callers,
                                             {12: "__synchronize_srcu+0xd7"}, {7}).items()}
    assert got == {"0x1": "futex_hash_bucket->lock@1", "0x3": "zone->lock@3",
                   "0x5": "on-stack(__synchronize_srcu)@5"}
    k.run_queues({0: 0x1000})
    assert k.names([4], callers)["0x4"]["name"] == "task->pi_lock@4"
    from kvmlockprof.locktypes import lock_class
    assert lock_class("zone->lock@ffff888100055800") == "zone->lock"
    assert lock_class("zone(Node 1, DMA32)->lock") == "zone->lock"


def test_kernel_namer_names_slab_objects_by_their_cache():
    """A lock the kernel placed in a slab object (bpf_get_kmem_cache) is named by its
    cache and address where no other rule names it, sleeping locks too; a caller class
    keeps its name and says the cache; try_to_wake_up's lock found in a task_struct is
    its pi_lock before the run queues are known; "" (no slab object) names nothing."""

    class Layout:
        enums = {}

        def offset(self, struct, field):
            return None

        def size(self, struct):
            return None
    k = locknames.KernelNamer(Layout())
    k.slab_caches({1: "filp", 2: "kmalloc-cg-192", 3: "", 4: "task_struct",
                   5: "task_struct"})
    got = k.names(range(1, 7), {2: {"anon_pipe_write+0x53"}, 4: {"try_to_wake_up+0x4e"},
                                5: {"futex_wake+0x10"}}, {}, {1})
    assert {a: v["name"] for a, v in got.items()} == {
        "0x1": "&filp@1", "0x2": "&kmalloc-cg-192@2", "0x4": "task->pi_lock@4",
        "0x5": "futex_hash_bucket->lock@5"}
    assert "task_struct" in got["0x4"]["how"]
    from kvmlockprof.locktypes import lock_class
    assert lock_class("&kmalloc-cg-192@ffff8881053c1900") == "&kmalloc-cg-192"
    k.retain({1})
    assert k.slabs == {1: "filp"}


def test_session_names_ask_the_kernel_once_per_address():
    """SessionNames asks its slab lookup about each unnamed address once (kallsyms'
    data symbols are not asked about); a lookup that fails stops the asking and the
    manifest says why."""
    import numpy as np

    class Syms:
        def data_symbols(self, addrs):
            return ["jiffies_lock" if a == 9 else "" for a in addrs]
    asked = []

    def lookup(addrs):
        asked.append(sorted(addrs))
        return {a: "filp" for a in addrs if a == 1}
    s = locknames.SessionNames(Syms(), namers=locknames.Namers(locknames.KernelNamer(None)))
    s.slab_lookup = lookup
    aggs = {"lock_addr": np.array([1, 2, 9], dtype=np.uint64),
            "stack_id": np.array([-1, -1, -1]), "flags": np.array([2, 2, 2])}
    s.update(aggs)
    s.update(aggs)
    assert asked == [[1, 2]]
    assert s.display() == {"0x9": "jiffies_lock", "0x1": "&filp@1"}

    def broken(addrs):
        raise OSError(1, "running a BPF program (BPF_PROG_TEST_RUN): Operation not permitted")
    s.slab_lookup = broken
    s.update({k: np.append(v, v[:1]) if k != "lock_addr" else np.array([1, 2, 9, 5],
                                                                         dtype=np.uint64)
              for k, v in aggs.items()})
    assert s.slab_lookup is None and "not permitted" in s.manifest()["slab_names_error"]


def test_kernel_namer_names_zones_as_zoneinfo_does(kbtf):
    """A zone lock told by its waiter (node, the zone's offset in node_zones) is named
    with the zone's type as /proc/zoneinfo prints it; an offset that is not a whole
    zone names nothing."""
    import re
    import subprocess
    dump = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                          capture_output=True, text=True, check=True).stdout
    size = int(re.search(r"STRUCT 'zone' size=(\d+)", dump).group(1))
    normal = int(re.search(r"'ZONE_NORMAL' val=(\d+)", dump).group(1))
    k = locknames.KernelNamer(kbtf)
    k.lock_kinds({0x10: ("zone", normal * size, -1), 0x20: ("zone", (1 << 16) | 8, -1)})
    got = {a: v["name"] for a, v in k.names([0x10, 0x20]).items()}
    assert got == {"0x10": "zone(Node 0, Normal)->lock"}
    with open("/proc/zoneinfo") as f:
        zones = re.findall(r"^Node (\d+), zone\s+(\S+)$", f.read(), re.M)
    assert ("0", "Normal") in zones         # the name is one of the kernel's own


def test_kernel_namer_names_locks_in_per_cpu_variables(kbtf):
    """Each CPU's copy of the per-CPU section starts at its run queue less runqueues'
    offset: a lock inside a per-CPU variable is named by the variable, the CPU and
    its place in it. The layout expected is bpftool's text (not this project's BTF
    reader): timer_bases, an array of struct timer_base whose first member is lock."""
    import re
    import subprocess
    dump = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                          capture_output=True, text=True, check=True).stdout
    off = {v: int(o) for o, v in re.findall(r"offset=(\d+) size=\d+ \(VAR '(\w+)'\)", dump)}
    m = re.search(r"STRUCT 'timer_base' size=(\d+) vlen=\d+\n\t'lock' type_id=\d+ "
                  r"bits_offset=0\n", dump)
    if "timer_bases" not in off or not m:
        pytest.skip("no per-CPU timer_bases with lock first in this kernel")
    base = {0: 0xffff888627c00000, 1: 0xffff888627d00000}
    k = locknames.KernelNamer(kbtf)
    k.run_queues({cpu: b + off["runqueues"] for cpu, b in base.items()})
    a = base[1] + off["timer_bases"] + int(m.group(1))          # timer_bases[1].lock
    got = k.names([a, a + 8, base[0] + off["timer_bases"]])
    assert {x: v["name"] for x, v in got.items()} == {
        f"{a:#x}": "timer_bases(cpu 1)[1].lock",
        f"{base[0] + off['timer_bases']:#x}": "timer_bases(cpu 0)[0].lock"}
