"""Facts about the running kernel that decide how (and whether) we can probe it."""
import ctypes
import ctypes.util
import errno
import glob
import os
import platform
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"


def kernel_release():
    return platform.release()


def hostname():
    return socket.gethostname()


# --- tracefs -----------------------------------------------------------------

def tracefs_path():
    """The mounted tracefs, or None."""
    for p in TRACEFS_CANDIDATES:
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
    target = TRACEFS_CANDIDATES[0]
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


# --- privileges --------------------------------------------------------------

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


def effective_caps():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def can_bpf():
    caps = effective_caps()
    has = lambda c: bool(caps & (1 << c))  # noqa: E731
    return has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))


# --- kernel headers for bcc --------------------------------------------------

@dataclass
class Headers:
    """Where bcc finds kernel headers, and whether they match the kernel."""
    status: str                 # "matching", "fallback" or "missing"
    build: str = ""             # kbuild output dir (generated headers, .config)
    source: str = ""            # source dir (include/linux/...); == build if not split
    release: str = ""           # the release the headers are for
    env: dict = field(default_factory=dict)
    cflags: list = field(default_factory=list)

    def describe(self):
        if self.status == "matching":
            return f"matching ({self.build})"
        if self.status == "fallback":
            return (f"fallback: {self.release} headers for a {kernel_release()} kernel "
                    f"({self.build}); field offsets must come from BTF, not these headers")
        return "missing"


def _debian_source_dir(build):
    """Debian splits headers into linux-headers-X-<flavour> (build) and -common."""
    mk = Path(build, "Makefile")
    if mk.exists():
        m = re.search(r"include\s+(\S+)/Makefile", mk.read_text(errors="replace"))
        if m and Path(m.group(1), "include/linux/kconfig.h").exists():
            return m.group(1)
    return build


def _version_key(path):
    return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", os.path.basename(path))]


def find_headers(release=None):
    release = release or kernel_release()
    build = f"/lib/modules/{release}/build"
    if os.path.isdir(build):
        source = f"/lib/modules/{release}/source"
        source = source if os.path.isdir(source) else _debian_source_dir(build)
        return Headers("matching", os.path.realpath(build), os.path.realpath(source), release)
    candidates = [d for d in glob.glob("/usr/src/linux-headers-*")
                  if os.path.exists(os.path.join(d, ".config"))]
    if not candidates:
        return Headers("missing")
    build = max(candidates, key=_version_key)
    source = _debian_source_dir(build)
    rel = os.path.basename(build)[len("linux-headers-"):]
    h = Headers("fallback", build, source, rel)
    # bcc takes one directory (BCC_KERNEL_SOURCE) and resolves its include paths
    # relative to it: point it at the source half and add the generated half.
    h.env = {"BCC_KERNEL_SOURCE": source}
    if source != build:
        arch = "x86" if platform.machine() == "x86_64" else \
               "arm64" if platform.machine() == "aarch64" else platform.machine()
        h.cflags = [f"-I{build}/arch/{arch}/include/generated",
                    f"-I{build}/arch/{arch}/include/generated/uapi",
                    f"-I{build}/include", f"-I{build}/include/generated/uapi"]
    return h


def link_fallback_headers(headers):
    """doctor --fix: make /lib/modules/$(uname -r)/build point at the fallback."""
    release = kernel_release()
    d = f"/lib/modules/{release}"
    os.makedirs(d, exist_ok=True)
    os.symlink(headers.build, f"{d}/build")
    if headers.source != headers.build:
        os.symlink(headers.source, f"{d}/source")
    return f"{d}/build -> {headers.build}"


# --- kallsyms / BTF ------------------------------------------------------------

def kallsyms_names(path="/proc/kallsyms"):
    """The kernel's text symbols: {name: module}, module "" for vmlinux."""
    names = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwW":
                names.setdefault(parts[2], parts[3].strip("[]") if len(parts) > 3 else "")
    return names


def has_btf():
    return os.path.exists(BTF_VMLINUX)


def config_option(name):
    """A kernel config value from /boot/config-* or /proc/config.gz, or None."""
    import gzip
    paths = [f"/boot/config-{kernel_release()}"]
    for p in paths + ["/proc/config.gz"]:
        try:
            opener = gzip.open if p.endswith(".gz") else open
            with opener(p, "rt") as f:
                for line in f:
                    if line.startswith(name + "="):
                        return line.strip().split("=", 1)[1]
                    if line.startswith(f"# {name} is not set"):
                        return "n"
        except OSError:
            continue
    return None


def errno_name(e):
    return errno.errorcode.get(e, str(e))


def release_memory():
    """Give freed heap back to the system: after bcc's compile and the BTF dump
    (hundreds of MB of transient objects), a long `record` should not keep them."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass                    # not glibc
