"""Who a tgid is: its comm and, for a VMM started with QEMU's `-name`, the VM name.

Read from /proc while the process lives (at each flush of `record`), kept in
the recording's manifest so that reports name VMs after the process is gone."""
import os
import re

from kvmlockprof.kernel.host import read_text

NAME_FLAGS = ("-name", "--name")
# libvirt's systemd scope of a QEMU domain: machine-qemu\x2d<id>\x2d<name>.scope, with
# systemd's escapes (\x2d is "-")
LIBVIRT_SCOPE = re.compile(r"machine-qemu\\x2d\d+\\x2d(.+?)\.scope")
# Kernel helpers working for one VM, named after its VMM's pid
HELPER_COMM = re.compile(r"^(?:vhost|kvm-nx-lpage-recovery|kvm-pit)[-/](\d+)$")


def _name_value(value):
    parts = value.split(",")
    for p in parts:
        if p.startswith("guest="):
            return p[len("guest="):] or None
    return parts[0] if parts[0] and "=" not in parts[0] else None


def vm_name(argv):
    """The VM name in a command line: QEMU's `-name guest=NAME,...` or `-name NAME`
    (also `--name NAME` / `--name=NAME`, as the built-in workload takes it); the last
    one given wins, as QEMU's option parsing does. Nothing after a bare `--`: those are
    another program's arguments (`kvmlockprof record -- workload --name X` is not X)."""
    name = None
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        value = None
        if arg in NAME_FLAGS and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(tuple(f + "=" for f in NAME_FLAGS)):
            value = arg.split("=", 1)[1]
        if value is not None:
            name = _name_value(value)
    return name


def cgroup_vm_name(cgroup_text):
    """The VM name of a process in libvirt's machine scope (/proc/PID/cgroup), or None."""
    m = LIBVIRT_SCOPE.search(cgroup_text or "")
    return m.group(1).replace("\\x2d", "-") if m else None


def helper_owner(comm):
    """The VMM pid a KVM helper thread works for (vhost-<pid>, kvm-nx-lpage-recovery-
    <pid>, kvm-pit/<pid>), or None."""
    m = HELPER_COMM.match(comm or "")
    return int(m.group(1)) if m else None


def process_info(tgid, proc="/proc"):
    """{comm, vm_name, cmdline} of a live process, or None when it is gone."""
    try:
        with open(os.path.join(proc, str(tgid), "comm")) as f:
            comm = f.read().strip()
        with open(os.path.join(proc, str(tgid), "cmdline"), "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    cgroup = read_text(os.path.join(proc, str(tgid), "cgroup"))
    info = {"comm": comm, "vm_name": vm_name(argv) or cgroup_vm_name(cgroup),
            "cmdline": " ".join(argv)[:512]}
    owner = helper_owner(comm)
    if owner:
        info["vm_tgid"] = owner             # a helper: its VM's waits
    return info


def find_vm(name, proc="/proc"):
    """tgids of the VM the operator calls `name` (its -name, or libvirt's scope), with
    the helpers working for it; [] if none runs."""
    vmms, helpers = [], {}
    for d in os.listdir(proc):
        if not d.isdigit():
            continue
        info = process_info(int(d), proc)
        if not info:
            continue
        if info["vm_name"] == name:
            vmms.append(int(d))
        elif info.get("vm_tgid"):
            helpers.setdefault(info["vm_tgid"], []).append(int(d))
    return sorted(vmms + [h for v in vmms for h in helpers.get(v, [])])


def learn(known, tgids):
    """Add process_info() of the tgids not in `known` ({str(tgid): info}); tgid 0
    is the idle task. Returns `known`."""
    for t in tgids:
        key = str(int(t))
        if key not in known and int(t) != 0:
            info = process_info(int(t))
            if info:
                known[key] = info
    return known


def stuck_threads(tgid, proc="/proc"):
    """The threads of tgid in uninterruptible sleep (D), which no signal ends: [{tid,
    comm, wchan, stack}] (stack: the kernel's frames, function names only; empty
    without CONFIG_STACKTRACE or root). A process killed with one of these is never
    reaped: a thread blocked on a lock nobody will release (a deadlock) is one."""
    out = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"{proc}/{tgid}/task"))
    except (OSError, ValueError):
        return out
    for tid in tids:
        base = f"{proc}/{tgid}/task/{tid}"
        stat = read_text(f"{base}/stat")          # "" once the thread is gone
        try:
            if stat[stat.rindex(")") + 2:].split()[0] != "D":
                continue
        except (ValueError, IndexError):
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        out.append({"tid": tid, "comm": comm, "wchan": read_text(f"{base}/wchan"),
                    "stack": [line.split("] ", 1)[-1].split("+")[0]
                              for line in read_text(f"{base}/stack").splitlines()]})
    return out


def describe_stuck(stuck):
    """A manifest's command_stuck, in one line."""
    threads = "; ".join(f"{t['comm']} ({t['tid']}) blocked in " +
                        (" <- ".join(t["stack"][:4]) or t["wchan"] or "?")
                        for t in stuck["threads"]) or "no thread in D state any more"
    return f"the command (pid {stuck['pid']}) did not end on SIGKILL: {threads}"
