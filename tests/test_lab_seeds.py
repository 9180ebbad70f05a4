"""Lab (make lab-lockdep-test): the seeds' bugs put back, caught where lockdep
catches them.

The lab kernels carry kvmlockprof/labpatches/6.12-kvm-seeds.patch: seed 000 (an
expired Xen timer injected under xen_lock, whose slow path takes xen_lock again) and
seed 002 (the shared_info and vcpu_info caches' locks taken in both orders), each off
until its bit of kvm.kvmlp_seeds is set. Per seed, one boot of each kernel runs the
built-in workload under `record --probes lockorder`: lockdep's report (the lockdep
kernel's log) is the truth; kvmlockprof must report the same bug on the lockdep
kernel and on the production-config one, and nothing on Debian's 6.12 (no patch)."""
import re

import pytest

import kvmlockprof
from kvmlockprof.probes import lockorder as lo
from lockdep import reports
from test_lab import LAB_TIMEOUT, lab_run
from test_lab_lockdep import TCG_THREAD, lab_kernel

pytestmark = [pytest.mark.lab, pytest.mark.lockdep]

SEEDS = {
    # seed: (kvm.kvmlp_seeds bit, the workload's arguments)
    "000": (1, "--xen --xen-timer-every 200 --vcpus 1 -d 8"),
    "002": (2, "--xen --vcpus 2 -d 5"),
}
# record outlives a workload that hangs (000): it stops at -d (the workload, 8 s, starts
# in ~30 s under the emulator) and leaves it behind
SCRIPT = (
    "p=/sys/module/kvm/parameters/kvmlp_seeds; [ -e $p ] && echo {bit} > $p; "
    "kvmlockprof record -q -o seed.parquet --probes contention,lockorder -d 100 -- "
    "kvmlockprof workload {workload} > workload.txt 2> record.txt; echo $? > rc.txt; "
    "dmesg > dmesg.txt; kvmlockprof report --order seed.parquet > order.txt 2>&1; "
    "bpftool prog show > progs.txt; cat /sys/kernel/tracing/kprobe_events > kprobes.txt")


@pytest.fixture(scope="module", params=sorted(SEEDS))
def seed_runs(request, tmp_path_factory):
    """(seed, {flavour: its run's directory})"""
    seed = request.param
    bit, workload = SEEDS[seed]
    out = {}
    for flavour in ("lockdep", "prod", "stock"):
        image, _ = lab_kernel(flavour)
        d = tmp_path_factory.mktemp(f"seed{seed}-{flavour}")
        out[flavour] = lab_run(d, SCRIPT.format(bit=bit, workload=workload), image,
                               LAB_TIMEOUT, tcg_thread=TCG_THREAD)
    return seed, out


def _findings(d):
    rec = kvmlockprof.load(d / "seed.parquet")
    assert rec.manifest["probes"]["lockorder"]["status"] == "attached", \
        rec.manifest["probes"]["lockorder"]
    return rec, lo.findings(rec)


def _cls(name):
    """lockdep's class name as lockorder spells it (no leading &)."""
    return name.lstrip("&")


def test_seed_caught_as_lockdep_catches_it(seed_runs):
    seed, runs = seed_runs
    truth = [r for r in reports((runs["lockdep"] / "dmesg.txt").read_text()) if r["kind"]]
    print(f"seed {seed}: lockdep says {truth}")
    for flavour, d in runs.items():
        rec, f = _findings(d)
        print(f"seed {seed} on {rec.manifest['kernel_release']}:\n{f.to_string()}\n"
              f"record: {(d / 'record.txt').read_text()}")
        assert (d / "progs.txt").read_text().strip() == ""
        assert (d / "kprobes.txt").read_text().strip() == ""
        if flavour == "stock":          # Debian's 6.12: no patch, no bug
            assert f[f["finding"] != "incomplete"].empty, f.to_string()
            assert (d / "rc.txt").read_text().strip() == "0"
            continue
        if seed == "000":
            _check_000(truth, rec, f, d)
        else:
            _check_002(truth, f)


def _check_000(truth, rec, f, d):
    """A recursive deadlock: lockdep reports xen_lock taken again; lockorder the same,
    with where it was first taken and where again; record still ends (the vCPU
    thread never will) and says which thread is stuck where."""
    assert truth and truth[0]["kind"] == "recursion", truth
    assert [_cls(c) for c in truth[0]["classes"]] == ["kvm->arch.xen.xen_lock"], truth
    rec_rows = f[(f["finding"] == "recursion") & (f["locks"] == "kvm->arch.xen.xen_lock")]
    assert len(rec_rows), f.to_string()
    seen = rec_rows["seen"].iloc[0]
    assert re.search(r"taken again at .*kvm_xen_set_evtchn", seen) and \
        "held since kvm_xen_vcpu_set_attr" in seen, seen
    stuck = {t["comm"]: t for t in rec.manifest["command_stuck"]["threads"]}
    # the vCPU on itself; the sender (kvmlp-xen), if its slow path came next, on the vCPU
    assert "kvmlp-vcpu0" in stuck and set(stuck) <= {"kvmlp-vcpu0", "kvmlp-xen"}, stuck
    assert "kvm_xen_vcpu_set_attr" in stuck["kvmlp-vcpu0"]["stack"], stuck
    err = (d / "record.txt").read_text()
    assert "did not end on SIGKILL" in err and "kvmlp-vcpu0" in err, err
    assert (d / "rc.txt").read_text().strip() != "0"


def _check_002(truth, f):
    """The two caches' locks in both orders. lockdep puts every gfn_to_pfn_cache's
    lock in one class (&gpc->lock, from kvm_gpc_init's rwlock_init), so it reports
    the first nesting of the two as recursion on that class; lockorder tells the
    caches apart and reports the two orders as an inversion."""
    assert truth and [_cls(c) for c in truth[0]["classes"]] == ["gpc->lock"], truth
    pair = {"kvm->arch.xen.shinfo_cache.lock", "vcpu->arch.xen.vcpu_info_cache.lock"}
    inv = [r for r in f.itertuples() if r.finding == "inversion" and
           set(re.split(r"\s*<->\s*", r.locks)) == pair]
    assert inv, f.to_string()


# Everything the built-in workload drives on x86, in one VM: memslot churn (slots_lock,
# mmu_lock, SRCU grace periods), kvmclock's cache, Xen events through the fast path and
# the slow one, expired Xen timers, two vCPUs.
WHOLE_WORKLOAD = ("--vcpus 2 -d 8 --churn --kvmclock --xen --xen-slow-every 100 "
                  "--xen-timer-every 200")


def test_production_kernel_without_seeds_yields_no_finding(tmp_path):
    """The production-config kernel with every seed off (the code as released) under
    the whole workload: lockorder follows KVM's locks and finds nothing, as lockdep
    finds nothing on the lockdep kernel under the same workload."""
    out = {}
    for flavour in ("lockdep", "prod"):
        image, _ = lab_kernel(flavour)
        d = tmp_path / flavour
        d.mkdir()
        out[flavour] = lab_run(d, SCRIPT.format(bit=0, workload=WHOLE_WORKLOAD), image,
                               LAB_TIMEOUT, tcg_thread=TCG_THREAD)
    truth = [r for r in reports((out["lockdep"] / "dmesg.txt").read_text()) if r["header"]]
    assert not truth, truth
    for flavour, d in out.items():
        rec, f = _findings(d)
        print(f"{flavour}: {(d / 'workload.txt').read_text()}{f.to_string()}\n"
              f"counters {rec.manifest['probe_counters']['lockorder']}")
        assert (d / "rc.txt").read_text().strip() == "0"
        assert rec.manifest["probe_counters"]["lockorder"]["watched"] > 10000
        assert f[f["finding"] != "incomplete"].empty, f.to_string()
