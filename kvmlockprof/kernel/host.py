"""Facts about the running kernel that decide how (and whether) we can probe it."""
import json
import os
import platform
import socket

BTF_VMLINUX = "/sys/kernel/btf/vmlinux"


def kernel_release():
    return platform.release()


def hostname():
    return socket.gethostname()


# --- privileges --------------------------------------------------------------

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


def read_text(path):
    """A /proc or /sys file's text, stripped; "" where it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


# What a run learns about this boot and keeps for the next (the attach trials'
# verdicts, the kernel's struct offsets): gone at reboot, removed by the package's purge.
RUN_DIR = "/run/kvmlockprof"


def boot_id():
    return read_text("/proc/sys/kernel/random/boot_id")


def kept(path):
    """The dict a run kept in the JSON file `path` ({} when there is none, or it is
    damaged)."""
    try:
        with open(path) as f:
            got = json.load(f)
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def keep(path, key, value):
    """Keep key: value in `path` beside what is there, atomically (concurrent runs may
    each write theirs: the last one's file wins, the others are redone next time).
    Without root or on a read-only /run nothing is kept."""
    tmp = f"{path}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(dict(kept(path), **{key: value}), f)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)


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


# --- BTF, config ----------------------------------------------------------------

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


def cpu_ids(which="online"):
    """The ids of the possible or online CPUs (/sys/devices/system/cpu/<which>)."""
    try:
        with open(f"/sys/devices/system/cpu/{which}") as f:
            spans = f.read().strip().split(",")
    except OSError:
        return list(range(os.cpu_count()))
    out = []
    for sp in spans:
        a, _, b = sp.partition("-")
        out += range(int(a), int(b or a) + 1)
    return out


def possible_cpus():
    """CPUs the kernel sizes per-CPU data for (/sys/devices/system/cpu/possible)."""
    return len(cpu_ids("possible"))
