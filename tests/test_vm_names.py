"""A VM is what its operator calls it: the naming rules on real processes, with
QEMU/libvirt-style command lines, a libvirt-style cgroup made here, and a helper
named after its VMM (as vhost-<pid> is)."""
import os
import subprocess
import sys
import time

import pytest

from kvmlockprof.recording import processes

SLEEPER = "import sys, time; time.sleep(60)"


def _spawn(*argv, comm=None):
    code = SLEEPER if not comm else \
        f"open('/proc/self/comm', 'w').write({comm!r}); " + SLEEPER
    p = subprocess.Popen([sys.executable, "-c", code, *argv])
    for _ in range(100):                    # until its comm is set
        info = processes.process_info(p.pid)
        if info and (not comm or info["comm"] == comm):
            break
        time.sleep(0.02)
    return p


def test_the_last_name_wins_as_in_qemu():
    assert processes.vm_name(["qemu-system-x86_64", "-name", "guest=first,debug-threads=on",
                              "-m", "1G", "-name", "guest=web01,process=qemu:web01"]) == "web01"
    assert processes.vm_name(["qemu", "-name", "plain"]) == "plain"
    # a wrapper's command (record -- workload --name X) is not the VM X
    assert processes.vm_name(["python3", "-m", "kvmlockprof", "record", "--", "python3",
                              "-m", "kvmlockprof", "workload", "--name", "x"]) is None
    assert processes.vm_name(["qemu", "-name", "process=x"]) is None


def test_named_vm_and_its_helper_are_found_running():
    vm = _spawn("-name", "guest=decoy", "-name", "guest=kvmlp-test-web01,debug-threads=on")
    helper = _spawn(comm=f"vhost-{vm.pid}")
    other = _spawn(comm="vhost-1")
    try:
        assert processes.process_info(vm.pid)["vm_name"] == "kvmlp-test-web01"
        assert processes.process_info(helper.pid)["vm_tgid"] == vm.pid
        assert processes.find_vm("kvmlp-test-web01") == sorted([vm.pid, helper.pid])
        assert processes.find_vm("decoy") == []
    finally:
        for p in (vm, helper, other):
            p.kill()
            p.wait()


def test_libvirt_scope_names_the_vm():
    # cgroup v2 (or, on a hybrid host, its unified mount or systemd's v1 hierarchy)
    root = next((r for r in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified",
                             "/sys/fs/cgroup/systemd")
                 if os.path.exists(os.path.join(r, "cgroup.procs"))), None)
    if os.geteuid() != 0 or not root:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root with a cgroup hierarchy under /sys/fs/cgroup")
        pytest.skip("needs root and a cgroup hierarchy")
    scope = os.path.join(root, r"machine-qemu\x2d7\x2dkvmlp\x2dtest\x2ddomain.scope")
    os.mkdir(scope)
    p = _spawn()
    try:
        with open(os.path.join(scope, "cgroup.procs"), "w") as f:
            f.write(str(p.pid))
        assert processes.process_info(p.pid)["vm_name"] == "kvmlp-test-domain"
        assert processes.find_vm("kvmlp-test-domain") == [p.pid]
    finally:
        p.kill()
        p.wait()
        with open(os.path.join(root, "cgroup.procs"), "w") as f:
            pass
        for _ in range(50):
            try:
                os.rmdir(scope)
                break
            except OSError:
                time.sleep(0.05)


def test_qemu_vcpu_threads_are_named_vm_slash_vcpu(tmp_path):
    """QEMU names its vCPU threads "CPU N/KVM": a view shows them as VM/vcpuN (here with
    no vms probe, so by the thread name alone); other threads keep their names."""
    import kvmlockprof
    from kvmlockprof.analysis import locks as analysis
    from kvmlockprof.recording.store import Writer
    w = Writer(tmp_path / "q.parquet")
    w.finalize({"format": "kvmlockprof-recording", "version": 1, "probes": {}})
    rec = kvmlockprof.load(tmp_path / "q.parquet")
    got = analysis.vcpu_labels(rec, {11: (10, "CPU 0/KVM"), 12: (10, "CPU 13/KVM"),
                                     13: (10, "IO mon_iothread"), 14: (10, "kvmlp-vcpu2")})
    assert got == {11: "10/vcpu0", 12: "10/vcpu13", 14: "10/vcpu2"}
