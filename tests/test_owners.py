"""--lock-owner's views over a made-up recording whose answers the test sets: who the
waits were behind (report --by owner), each lock's heaviest owner, the owner classes
the exporter labels by."""
import json

import numpy as np
import pandas as pd
import pytest

from kvmlockprof.analysis import owners
from kvmlockprof.recording.store import Recording
from kvmlockprof.views import report

SLOTS, MMAP, OTHER = 0xffff888100001000, 0xffff888100002000, 0xffff888100003000
MUTEX, RWSEM_W = 32, 16 | 4


def recording(lock_owner=True, owner_stacks=None):
    aggs = pd.DataFrame({
        "lock_addr": [SLOTS, SLOTS, MMAP, OTHER], "tgid": [100, 100, 100, 300],
        "flags": [MUTEX, MUTEX, RWSEM_W, MUTEX], "stack_id": [-1000] * 4,
        "count": np.array([4, 1, 4, 7], np.uint64),
        "total_ns": np.array([800, 200, 100, 70], np.uint64),
        "max_ns": np.array([300, 200, 40, 10], np.uint64),
        "min_ns": np.array([100, 200, 10, 10], np.uint64),
        "hist": [np.zeros(64, np.uint32)] * 4})
    # slots_lock: 1000 ns of waits, 600 behind churn1, 200 behind churn2, 200 owner-less;
    # mmap_lock: 100 ns, 50 behind churn1
    own = pd.DataFrame({"lock_addr": [SLOTS, SLOTS, MMAP],
                        "owner": np.array([201, 202, 201], np.uint32),
                        "count": np.array([3, 1, 2], np.uint64),
                        "total_ns": np.array([600, 200, 50], np.uint64),
                        "owner_tgid": np.array([100, 100, 100], np.uint32),
                        "owner_comm": ["kvmlp-churn1", "kvmlp-churn2", "kvmlp-churn1"]})
    manifest = {"probes": {"contention": {"lock_owner": lock_owner, "status": "attached"}},
                "lock_names": {f"{SLOTS:#x}": {"name": "kvm(100)->slots_lock"},
                               f"{MMAP:#x}": {"name": "mm(100)->mmap_lock"}},
                "processes": {"100": {"comm": "qemu", "vm_name": "web1"},
                              "300": {"comm": "other"}}}
    return Recording.from_frames("<test>", manifest, {
        "aggregates": aggs, "lock_owners": own if lock_owner else own.iloc[:0],
        **({"owner_stacks": owner_stacks} if owner_stacks is not None else {}),
        "stacks": pd.DataFrame({"source": [], "stack_id": [], "frames": [],
                                "lock_frame": []}),
        "contention": pd.DataFrame()})


def test_by_owner_sums_each_owner_over_its_locks():
    df = owners.by_owner(recording())
    assert df["owner"].tolist() == ["kvmlp-churn1 (201)", "kvmlp-churn2 (202)"]
    assert df["vm"].tolist() == ["web1", "web1"]
    assert df["waits"].tolist() == [5, 1] and df["wait_ns"].tolist() == [650, 200]
    assert df["locks"].tolist() == [2, 1]
    assert df["lock"].tolist() == ["kvm(100)->slots_lock"] * 2
    assert df["lock_share"].tolist() == pytest.approx([0.6, 0.2])
    assert owners.by_owner(recording(), owner_pids=[300]).empty


def test_each_lock_names_its_heaviest_owner():
    top = owners.heaviest(recording())
    assert top == {"kvm(100)->slots_lock": ("kvmlp-churn1 (201)", pytest.approx(0.6)),
                   "mm(100)->mmap_lock": ("kvmlp-churn1 (201)", pytest.approx(0.5))}


def test_report_by_owner_and_the_owner_column():
    rec = recording()
    text = report.render(rec, by="owner")
    assert "kvmlp-churn1 (201)" in text and "60% of its wait time" in text
    rows = json.loads(report.render(rec, by="owner", fmt="json"))["rows"]
    assert [r["wait_ns"] for r in rows] == [650, 200]
    rows = json.loads(report.render(rec, fmt="json"))["rows"]
    by_lock = {r["lock"]: r for r in rows}
    assert by_lock["kvm(100)->slots_lock"]["owner"] == "kvmlp-churn1 (201)"
    assert by_lock["kvm(100)->slots_lock"]["owner_share"] == pytest.approx(0.6)
    assert by_lock["mm(100)->mmap_lock"]["owner_share"] == pytest.approx(0.5)
    assert by_lock[f"{OTHER:#x}"]["owner"] == ""                 # no owner recorded
    assert "[60% behind kvmlp-churn1 (201)]" in report.render(rec)


def test_by_owner_of_a_recording_without_owners_says_what_to_do():
    with pytest.raises(report.NoOwners, match="record with --lock-owner"):
        report.render(recording(lock_owner=False), by="owner")
    assert "owner" not in json.loads(report.render(recording(lock_owner=False),
                                                   fmt="json"))["rows"][0]


@pytest.mark.parametrize("comm,vcpu,cls", [
    ("kvmlp-churn1", False, "kvmlp-churn1"), ("worker-12", False, "worker"),
    ("kworker/u8:3", False, "kworker"),
    ("CPU 3/KVM", True, "vcpu"), ("qemu-system-x86", False, "qemu-system-x86"),
    ("rcu_preempt", False, "rcu_preempt"), ("ksoftirqd/0", False, "ksoftirqd"),
    ("1234", False, "1234"), ("", False, "?")])
def test_owner_classes(comm, vcpu, cls):
    assert owners.owner_class(comm, vcpu) == cls


def test_html_has_the_owner_column_and_section():
    from kvmlockprof.views import html
    page = html.render(recording())
    assert "owner_share" in page and "kvmlp-churn1 (201)" in page and "60.0%" in page
    assert "Who held the sleeping locks" in page


CHURN_SLEEP = ["__schedule+0x2e1/0x7a0", "schedule+0x27/0xa0", "schedule_timeout+0x9c/0x110",
               "__wait_for_common+0x96/0x1b0", "__synchronize_srcu+0xc4/0x100",
               "kvm_swap_active_memslots+0x111/0x190", "kvm_set_memslot+0x1b2/0x4a0",
               "kvm_set_memory_region+0x2a3/0x3e0", "kvm_vm_ioctl+0x3c8/0x1450"]


def test_where_an_owner_slept_is_below_the_sleeping_primitives():
    """The scheduler's and the sleeping primitives' frames are dropped; the next four,
    outermost first."""
    assert owners.where(CHURN_SLEEP) == ("kvm_set_memory_region -> kvm_set_memslot -> "
                                         "kvm_swap_active_memslots -> __synchronize_srcu")
    assert owners.where(["schedule+0x1", "do_nanosleep+0x2"]) == "do_nanosleep -> schedule"
    assert owners.where([]) == ""


def test_owner_stacks_per_lock_and_owner_share_their_samples():
    """Each owner's samples on a lock split by where it slept, shares of that owner's
    samples on that lock; owners labelled as the lock_owners table labels them."""
    other = CHURN_SLEEP[:4] + ["msleep+0x1", "worker_fn+0x10"]
    rec = recording(owner_stacks=pd.DataFrame({
        "lock_addr": np.array([SLOTS, SLOTS, SLOTS], np.uint64),
        "owner": np.array([201, 201, 202], np.uint32),
        "count": np.array([3, 1, 5], np.uint64),
        "frames": [CHURN_SLEEP, other, CHURN_SLEEP]}))
    df = owners.owner_stacks(rec)
    assert df["owner"].tolist() == ["kvmlp-churn2 (202)", "kvmlp-churn1 (201)",
                                    "kvmlp-churn1 (201)"]
    assert df["samples"].tolist() == [5, 3, 1]
    assert df["share"].tolist() == pytest.approx([1.0, 0.75, 0.25])
    assert df["where"].iloc[2] == "worker_fn"
    assert set(df["lock"]) == {"kvm(100)->slots_lock"}
    assert owners.slept_at(rec)[("kvm(100)->slots_lock", "kvmlp-churn1 (201)")] == \
        owners.where(CHURN_SLEEP)
    assert owners.owner_stacks(recording(lock_owner=False)).empty
