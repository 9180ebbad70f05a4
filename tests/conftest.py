"""Shared fixtures. Live tests need root, BPF and /dev/kvm: outside CI they skip
with the reason; in CI (CI=true) a missing live environment fails them."""
import json
import os
import subprocess
import sys

import pytest

import kvmlockprof

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bpf_problem():
    if os.geteuid() != 0:
        return "not root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc Python bindings missing (python3-bpfcc)"
    from kvmlockprof.kernel import headers, tracefs
    tracefs.mount_tracefs()
    if not tracefs.tracepoint_exists("lock", "contention_end"):
        return "no lock:contention_* tracepoints in this kernel"
    if headers.find_headers().status == "missing":
        return "no kernel headers for bcc"
    return None


def _live_problem():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm missing or not permitted"
    return _bpf_problem()


def require(problem):
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"live environment missing in CI: {problem}")
        pytest.skip(f"live environment missing: {problem}")


def pytest_terminal_summary(terminalreporter):
    """Lab runs retried after an emulator fault (test_lab.RETRIES): counted, never
    silent."""
    lab = sys.modules.get("test_lab")
    retries = getattr(lab, "RETRIES", [])
    if retries:
        terminalreporter.section(f"lab runs retried after an emulator fault: {len(retries)}")
        for test, kernel, fault in retries:
            terminalreporter.write_line(f"{test} ({kernel}): {fault}")


def pytest_collection_modifyitems(config, items):
    """A test that needs root (the bpf_host or live fixture, its own or a fixture's it
    uses) is marked live: `-m "not live"` is what runs unprivileged (make test's first
    stage)."""
    for item in items:
        if {"bpf_host", "live"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.live)


@pytest.fixture(scope="session")
def bpf_host():
    """Root, bcc and kernel headers: BPF programs can be compiled and loaded."""
    require(_bpf_problem())


@pytest.fixture(scope="session")
def live():
    """bpf_host plus a usable /dev/kvm: the built-in workload runs."""
    require(_live_problem())


def klp(*args, check=True, timeout=120, **kw):
    """Run the kvmlockprof CLI as a user would."""
    p = subprocess.run([sys.executable, "-m", "kvmlockprof", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=kw.pop("cwd", ROOT),
                       **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"kvmlockprof {' '.join(map(str, args))} exited "
                             f"{p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def kernel_objects():
    """Every BPF program, map and link in the kernel (bpftool: the kernel's own view)
    and every kprobe/uprobe event (tracefs), whoever made them. Compare as sets:
    "none left" is `not after - before` (see assert_none_left)."""
    objs = set()
    for kind in ("prog", "map", "link"):
        out = subprocess.run(["bpftool", "-j", kind, "show"], capture_output=True, text=True,
                             check=True).stdout
        objs |= {(kind, o["id"]) for o in json.loads(out or "[]")}
    from kvmlockprof.kernel import tracefs
    for events in ("kprobe_events", "uprobe_events"):
        try:
            with open(os.path.join(tracefs.tracefs_path() or "/nonexistent", events)) as f:
                objs |= {(events, line.strip()) for line in f if line.strip()}
        except OSError:
            pass
    return objs


def assert_none_left(before, timeout=60):
    """No program, map, link or probe event made since `before` is left: the kernel
    frees a map some time after its last fd closes (task storage maps wait for RCU
    tasks-trace grace periods, which take seconds on a busy host), so wait for it."""
    import time
    deadline = time.time() + timeout
    while (left := kernel_objects() - before) and time.time() < deadline:
        time.sleep(0.2)
    assert not left, f"left in the kernel: {sorted(left)}"


def workload_argv(*args):
    return [sys.executable, "-m", "kvmlockprof", "workload", *map(str, args)]


def ends_counter():
    """An independent BPF program (bcc, ours only in name) counting contention_end
    per process in its map `ends`: {tgid: count} once read."""
    from kvmlockprof.kernel.bpfload import compile_bpf
    return compile_bpf(text="""
        BPF_HASH(ends, u32, u64, 65536);
        TRACEPOINT_PROBE(lock, contention_end) {
            u32 tgid = bpf_get_current_pid_tgid() >> 32;
            u64 zero = 0, *n = ends.lookup_or_try_init(&tgid, &zero);
            if (n) __sync_fetch_and_add(n, 1);
            return 1;       /* 0 would drop the event for perf's listeners */
        }""")


@pytest.fixture(scope="session")
def churn_recording(live, tmp_path_factory):
    """One memslot-churn recording (VM named churnvm) shared by the live tests, made while an
    independent BPF program counts contention_end per process."""
    counter = ends_counter()
    out = tmp_path_factory.mktemp("rec") / "churn.parquet"
    try:
        p = klp("record", "-o", out, "--", *workload_argv("--duration", 4, "--vcpus", 2,
                                                           "--churn", "--name", "churnvm"))
        ends = {k.value: v.value for k, v in counter["ends"].items()}
    finally:
        counter.cleanup()
    rec = kvmlockprof.load(out)
    return rec, ends, p
