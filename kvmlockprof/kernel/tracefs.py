"""tracefs: where it is (mounting it if need be) and which tracepoints it has."""
import ctypes
import ctypes.util
import os

CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def tracefs_path():
    """The mounted tracefs, or None."""
    for p in CANDIDATES:
        if os.path.exists(os.path.join(p, "events")):
            return p
    return None


def mount_tracefs():
    """Mount tracefs at /sys/kernel/tracing if no tracefs is mounted.

    Returns (path or None, what was done)."""
    p = tracefs_path()
    if p:
        return p, "mounted"
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    target = CANDIDATES[0]
    if libc.mount(b"nodev", target.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        return None, f"mount tracefs on {target} failed: {os.strerror(err)}"
    return target, f"was not mounted: mounted it on {target}"


def tracepoint_exists(category, event):
    p = tracefs_path()
    return bool(p) and os.path.isdir(os.path.join(p, "events", category, event))


def tracepoint_events(category):
    p = tracefs_path()
    d = os.path.join(p, "events", category) if p else None
    if not d or not os.path.isdir(d):
        return []
    return sorted(e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e)))
