"""Who a tgid is: its comm and, for a VMM started with QEMU's `-name`, the VM name.

Read from /proc while the process lives (at each flush of `record`), kept in
the recording's manifest so that reports name VMs after the process is gone."""
import os

NAME_FLAGS = ("-name", "--name")


def vm_name(argv):
    """The VM name in a command line: QEMU's `-name guest=NAME,...` or `-name NAME`
    (also `--name NAME` / `--name=NAME`, as the built-in workload takes it)."""
    for i, arg in enumerate(argv):
        value = None
        if arg in NAME_FLAGS and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(tuple(f + "=" for f in NAME_FLAGS)):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        parts = value.split(",")
        for p in parts:
            if p.startswith("guest="):
                return p[len("guest="):] or None
        return parts[0] if parts[0] and "=" not in parts[0] else None
    return None


def process_info(tgid, proc="/proc"):
    """{comm, vm_name, cmdline} of a live process, or None when it is gone."""
    try:
        with open(os.path.join(proc, str(tgid), "comm")) as f:
            comm = f.read().strip()
        with open(os.path.join(proc, str(tgid), "cmdline"), "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    return {"comm": comm, "vm_name": vm_name(argv), "cmdline": " ".join(argv)[:512]}


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
