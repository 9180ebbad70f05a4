"""Shared fixtures. Live tests need root, BPF and /dev/kvm: outside CI they skip
with the reason; in CI (CI=true) a missing live environment fails them."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bpf_problem():
    if os.geteuid() != 0:
        return "not root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc Python bindings missing (python3-bpfcc)"
    from kvmlockprof import host
    host.mount_tracefs()
    if not host.tracepoint_exists("lock", "contention_end"):
        return "no lock:contention_* tracepoints in this kernel"
    if host.find_headers().status == "missing":
        return "no kernel headers for bcc"
    return None


def _live_problem():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm missing or not permitted"
    return _bpf_problem()


def _require(problem):
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"live environment missing in CI: {problem}")
        pytest.skip(f"live environment missing: {problem}")


@pytest.fixture(scope="session")
def bpf_host():
    """Root, bcc and kernel headers: BPF programs can be compiled and loaded."""
    _require(_bpf_problem())


@pytest.fixture(scope="session")
def live():
    """bpf_host plus a usable /dev/kvm: the built-in workload runs."""
    _require(_live_problem())


def klp(*args, check=True, timeout=120, **kw):
    """Run the kvmlockprof CLI as a user would."""
    p = subprocess.run([sys.executable, "-m", "kvmlockprof", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=kw.pop("cwd", ROOT),
                       **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"kvmlockprof {' '.join(map(str, args))} exited "
                             f"{p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def workload_argv(*args):
    return [sys.executable, "-m", "kvmlockprof", "workload", *map(str, args)]
