"""Live: `kvmlockprof top` in a real terminal (tmux), read back with capture-pane."""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_none_left, kernel_objects, workload_argv

pytestmark = pytest.mark.live
# a row of the table: a KVM caller first, its lock type, the K mark, then numbers
KVM_ROW = re.compile(r"^kvm_\w+\+0x[0-9a-f]+ +\S+ K +[\d,]+ ", re.M)


class Tmux:
    """A private tmux server (own socket) with one 160x50 window running `argv`."""

    def __init__(self, argv, tmp_path):
        if not shutil.which("tmux"):
            if os.environ.get("CI"):
                pytest.fail("tmux missing in CI (make setup installs it)")
            pytest.skip("tmux is not installed")
        self.sock = f"kvmlp-test-{os.getpid()}"
        self.status = tmp_path / "exit-status"
        # bash goes on after a child that handled Ctrl-C itself (dash dies with it)
        cmd = f"cd {shlex.quote(ROOT)} && {shlex.join(argv)}; echo $? > {self.status}"
        self.tmux("new-session", "-d", "-x", "160", "-y", "50", "bash", "-c", cmd)
        self.tmux("resize-window", "-x", "160", "-y", "50")

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True,
                              text=True, timeout=30)

    def screen(self):
        return self.tmux("capture-pane", "-p").stdout

    def wait_for(self, predicate, timeout=90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.5)
        raise AssertionError(f"screen never matched; last screen:\n{self.screen()}")

    def exit_status(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.status.exists() and self.status.read_text().strip():
                return int(self.status.read_text())
            time.sleep(0.2)
        raise AssertionError(f"top did not exit; screen:\n{self.screen()}")

    def close(self):
        self.tmux("kill-server")


@pytest.fixture
def churn(live):
    p = subprocess.Popen(workload_argv("--duration", 60, "--churn", "--name", "topvm"),
                         stdout=subprocess.DEVNULL, cwd=ROOT)
    yield p
    p.send_signal(signal.SIGINT)
    p.wait(30)


@pytest.mark.parametrize("how", ["q", "C-c"])
def test_top_shows_kvm_contention_and_exits_clean(churn, tmp_path, how):
    before = kernel_objects()
    t = Tmux([sys.executable, "-m", "kvmlockprof", "top", "-p", str(churn.pid),
              "--by", "caller", "--interval", "1"], tmp_path)
    try:
        screen = t.wait_for(lambda s: re.search(KVM_ROW, s))
        assert kernel_objects() - before, "top should have its probes loaded"
        assert "waits/s" in screen and "mutex" in screen     # memslot churn: slots_lock
        assert "not attached:" in screen or "attached: contention" in screen
        head = screen.split("waits/s")[0].strip("\n").splitlines()
        assert len(head) <= 6, head          # title, probes, blank, then the table
        # the grouping key cycles: b -> process, the VM named by its -name
        t.tmux("send-keys", "b")
        t.wait_for(lambda s: f"topvm ({churn.pid})" in s)
        t.tmux("send-keys", how)
        assert t.exit_status() == 0
    finally:
        t.close()
    assert_none_left(before)  # every probe detached


def test_top_batch_frames(churn):
    """Not a terminal: plain text frames, and --iterations ends it."""
    p = subprocess.run([sys.executable, "-m", "kvmlockprof", "top", "--batch", "--by", "caller",
                        "-p", str(churn.pid), "--iterations", "2", "--interval", "1"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("kvmlockprof top") == 2
    assert re.search(KVM_ROW, p.stdout), p.stdout
    assert f"kvm({churn.pid})->slots_lock" in p.stdout      # KVM-aware lock names


def test_record_progress_line_only_on_a_terminal(live, tmp_path):
    out = tmp_path / "p.parquet"
    argv = [sys.executable, "-m", "kvmlockprof", "record", "-o", str(out), "--",
            *workload_argv("--duration", 6, "--churn")]
    t = Tmux(argv, tmp_path)
    try:
        line = t.wait_for(lambda s: re.search(r"\d+\.\d s +\d+ waits +\d+ samples +\d+ lost +"
                                              r"top \S+ \([\d.]+ [mun]?s waited\)", s))
        assert t.exit_status(60) == 0
    finally:
        t.close()
    assert "waits" in line
    # not a terminal: no progress line, just the closing summary
    p = subprocess.run(argv[:5] + [str(tmp_path / "q.parquet")] + argv[6:], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0 and "\r" not in p.stderr and "samples" in p.stderr
