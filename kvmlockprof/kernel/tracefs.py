"""tracefs: where it is (mounting it if need be) and which tracepoints it has."""
import ctypes
import ctypes.util
import os
import re

from kvmlockprof import cdefs

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


def event_format(category, event):
    """The tracepoint's format file (its fields and print fmt), or "" if it has none."""
    p = tracefs_path()
    try:
        with open(os.path.join(p or "/nonexistent", "events", category, event, "format")) as f:
            return f.read()
    except OSError:
        return ""


_FIELD = re.compile(r"^\s*field:[^;]*?(\w+)(?:\[[^;]*\])?;", re.M)
_ENTRY = re.compile(r'\{\s*([^{},]+?)\s*,\s*((?:"[^"]*"\s*)+)\}')     # "A" "B": C's "AB"


def event_fields(category, event):
    """The names of the tracepoint's fields (its format file), in order."""
    return _FIELD.findall(event_format(category, event))


def print_symbolic(category, event):
    """[(expression, {value: name})] of each __print_symbolic() in the tracepoint's
    print fmt, in order: the kernel's own names of its codes (exit reasons)."""
    fmt = event_format(category, event).partition("print fmt:")[2]
    out, start = [], 0
    while (i := fmt.find("__print_symbolic(", start)) >= 0:
        depth, j = 0, i + len("__print_symbolic")
        for j in range(j, len(fmt)):
            depth += {"(": 1, ")": -1}.get(fmt[j], 0)
            if depth == 0:
                break
        body = fmt[i + len("__print_symbolic("):j]
        names = {}
        for value, name in _ENTRY.findall(body):
            try:
                names[cdefs.value(value)] = "".join(re.findall(r'"([^"]*)"', name))
            except ValueError:
                pass
        out.append((body.partition(",")[0].strip(), names))
        start = j
    return out
