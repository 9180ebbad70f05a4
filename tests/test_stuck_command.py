"""A recorded command that never ends (a thread blocked in the kernel for good:
seed 000's deadlock, tests/test_lab_seeds.py) does not keep `record` from ending."""
import subprocess

from kvmlockprof.recording import processes
from kvmlockprof.recording.recorder import Recorder
from conftest import klp


def _task(proc, tgid, tid, comm, state, wchan="", stack=""):
    d = proc / str(tgid) / "task" / str(tid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{tid} ({comm}) {state} 1 {tgid} 0 0 -1 4194560 0 0\n")
    (d / "wchan").write_text(wchan)
    (d / "stack").write_text(stack)


def test_stuck_threads_are_those_in_d_state(tmp_path):
    """/proc's view (stat's state, wchan, the kernel stack as root reads it): only the
    threads in uninterruptible sleep, their frames' function names; a comm with spaces
    and parentheses is read whole."""
    _task(tmp_path, 100, 100, "python3", "S", "do_wait")
    _task(tmp_path, 100, 101, "kvmlp-vcpu0 (x)", "D", "__mutex_lock.constprop.0",
          "[<0>] __mutex_lock.constprop.0+0x5f2/0xa80\n[<0>] kvm_xen_set_evtchn+0x7b/0x1a0\n"
          "[<0>] kvm_xen_vcpu_set_attr+0x2d3/0x6e0\n")
    stuck = processes.stuck_threads(100, proc=tmp_path)
    assert stuck == [{"tid": 101, "comm": "kvmlp-vcpu0 (x)", "wchan": "__mutex_lock.constprop.0",
                      "stack": ["__mutex_lock.constprop.0", "kvm_xen_set_evtchn",
                                "kvm_xen_vcpu_set_attr"]}]
    line = processes.describe_stuck({"pid": 100, "threads": stuck})
    assert line == ("the command (pid 100) did not end on SIGKILL: kvmlp-vcpu0 (x) (101) "
                    "blocked in __mutex_lock.constprop.0 <- kvm_xen_set_evtchn <- "
                    "kvm_xen_vcpu_set_attr")
    assert processes.stuck_threads(999, proc=tmp_path) == []


class _Unkillable:
    """A child as the kernel keeps one whose thread sleeps uninterruptibly: signals
    are taken, the process is never reaped."""
    pid, returncode = 4242, None

    def __init__(self):
        self.signals = []

    def poll(self):
        return None

    def terminate(self):
        self.signals.append("TERM")

    def kill(self):
        self.signals.append("KILL")

    def wait(self, timeout=None):
        assert timeout is not None, "an unbounded wait on a child that never ends"
        raise subprocess.TimeoutExpired("workload", timeout)


def test_record_leaves_an_unkillable_command_behind(monkeypatch):
    monkeypatch.setattr("kvmlockprof.recording.recorder.REAP_S", 0.01)
    r = Recorder.__new__(Recorder)
    r.manifest = {}
    child = _Unkillable()
    r._reap(child)
    assert child.signals == ["TERM", "KILL"]
    assert r.manifest["command_stuck"] == {"pid": 4242, "threads": []}


def test_xen_timer_needs_xen(live):
    p = klp("workload", "--xen-timer-every", 5, "-d", 0.1, check=False)
    assert p.returncode != 0 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "--xen-timer-every needs --xen" in p.stderr
