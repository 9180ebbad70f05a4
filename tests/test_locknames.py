"""KVM-aware lock names: BTF field paths checked against pahole's offsets, and
the VM-base inference on aggregates built here."""
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from kvmlockprof import btf, locknames

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
