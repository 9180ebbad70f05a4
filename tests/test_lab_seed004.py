"""Lab: seed 004, kvm_vcpu_update_apicv() "called from kvm_lapic_set_base(), which may
or may not hold SRCU", seen by `--srcu-at` on the stock Debian kernels.

The workload turns each vCPU's local APIC off and on again, by KVM_SET_SREGS and by
KVM_SET_MSRS (--apic-toggle-every): on 6.1 (before the thread's fix) each change
calls kvm_vcpu_update_apicv() from kvm_lapic_set_base(), with kvm->srcu not held
(the sregs ioctl) and held (the MSR ioctl); on 6.12 kvm_lapic_set_base() raises
KVM_REQ_APICV_UPDATE instead and kvm_vcpu_update_apicv() runs only from the vCPU's
run loop, SRCU held (there it is inlined: --srcu-at probes its body,
__kvm_vcpu_update_apicv). The oracles: the workload's count of toggles (two changes
each way) and an ftrace instance's count of calls of the probed function."""
import pytest

import kvmlockprof
from kvmlockprof import lab
from kvmlockprof.probes import lockorder as lo
from test_lab import LAB_TIMEOUT, ftrace_count, ftrace_counting, lab_problem, lab_run

pytestmark = pytest.mark.lab

FN = "kvm_vcpu_update_apicv"
SCRIPT = (f"kvmlockprof record -q -o seed.parquet --probes vms,lockorder --srcu-at "
          f"{FN},kvm_lapic_set_base -- kvmlockprof workload --vcpus 1 -d 4 "
          f"--apic-toggle-every 100 > workload.txt")
# the function the kernel runs for FN: 6.12 inlines it into its one caller
TRACED = {"6.1.": FN, "6.12.": f"__{FN}"}


@pytest.fixture(scope="module", params=sorted(TRACED))
def run(request, tmp_path_factory):
    problem = lab_problem()
    if problem:
        pytest.skip(f"no lab: {problem}")
    kernel = lab.find_kernel(request.param)
    if not kernel:
        pytest.skip(f"no {request.param} lab kernel (make lab installs it)")
    d = tmp_path_factory.mktemp("seed004")
    lab_run(d, ftrace_counting(TRACED[request.param], "ftrace.txt", SCRIPT), kernel,
            LAB_TIMEOUT)
    rec = kvmlockprof.load(d / "seed.parquet")
    assert rec.manifest["probes"]["lockorder"]["status"] == "attached", \
        rec.manifest["probes"]["lockorder"]
    at = lo.srcu_at(rec)
    print(f"\n{request.param}: {rec.manifest['work']['apic_toggles']} toggles\n"
          f"{at.to_string()}")
    return request.param, rec, at, ftrace_count(d / "ftrace.txt")


def _calls(at, fn, held):
    rows = at[(at["function"] == fn) & (at["srcu_held"] == held)]
    return int(rows["calls"].sum()), " | ".join(rows["called_from"])


def test_update_apicv_with_and_without_srcu(run):
    release, rec, at, traced = run
    toggles = rec.manifest["work"]["apic_toggles"]
    assert toggles > 0
    none, none_from = _calls(at, FN, "none")
    held, held_from = _calls(at, FN, "kvm->srcu")
    assert none + held == traced, (none, held, traced)
    if release == "6.1.":
        # both contexts, and the ioctl each came from
        assert none == 2 * toggles and "set_sregs" in none_from, (none, none_from)
        assert held >= 2 * toggles and "msr" in held_from, (held, held_from)
    else:
        # the fix: only the run loop calls it, SRCU held
        assert none == 0, (none, none_from)
        # (vcpu_enter_guest inlined)
        assert held > 0 and held_from.startswith("vcpu_run"), held_from


def test_lapic_set_base_callers(run):
    """kvm_lapic_set_base() itself is called both ways on both kernels (the thread's
    point: its callers decide, so it cannot drop SRCU itself)."""
    _, rec, at, _ = run
    toggles = rec.manifest["work"]["apic_toggles"]
    none, none_from = _calls(at, "kvm_lapic_set_base", "none")
    held, held_from = _calls(at, "kvm_lapic_set_base", "kvm->srcu")
    # (+ the vCPU's reset at its creation, no SRCU)
    assert none >= 2 * toggles and held == 2 * toggles, (none, held, toggles)
    assert "msr" in held_from, held_from
