"""Lab helper for tests/test_lab.py (run inside the lab, under `kvmlockprof record`):
create and destroy VMs, each with one vCPU and in a process of its own, until the
kernel gives a new VM the struct kvm address of an earlier one, or MAX_VMS VMs, or
MAX_S seconds, holding one more VM (the anchor) all along. Writes what it did to
OUT (JSON): per VM its pid and its struct kvm address as /proc/vmallocinfo shows
it (x86 vmallocs the VM in kvm_create_vm): an oracle independent of the vms probe.

vfree() releases address space lazily, for reuse once ~64 MB of frees have piled
up (thousands of VMs). Loading a module purges them at once (set_memory_* calls
vm_unmap_aliases()), so between VMs this loads and unloads a small module, the
first of NUDGE_MODULES that loads.

    python lab_vm_reuse.py OUT MAX_VMS MAX_S
"""
import json
import os
import re
import subprocess
import sys
import time

from kvmlockprof.workload import kvmapi as k

NUDGE_MODULES = ("crc_itu_t", "crc7", "crc8", "dummy")
# The caller vmallocinfo names: kvm_create_vm, or on 6.12 kvm_dev_ioctl (inlined into it)
KVM_AREA = re.compile(r"^0x([0-9a-f]+)-0x[0-9a-f]+\s+\d+\s+"
                      r"(kvm_create_vm|kvm_arch_alloc_vm|kvm_dev_ioctl)\+")
KERNEL_HALF = 1 << 63


def kvm_areas():
    """Start addresses of the struct kvm vmalloc areas, or None if unreadable or
    hidden (zeros, or hashed: kptr_restrict 0 prints %pK hashed, not in the kernel's
    half of the address space)."""
    try:
        with open("/proc/vmallocinfo") as f:
            found = {int(m.group(1), 16) for m in map(KVM_AREA.match, f) if m}
    except OSError:
        return None
    return None if any(a < KERNEL_HALF for a in found) else found


def one_vm(w):
    """In a child: a VM with one vCPU, then exit (which destroys them)."""
    kvm = k.open_kvm()
    before = kvm_areas()
    vm = k.ioctl(kvm, k.CREATE_VM, 0)
    after = kvm_areas()
    vcpu = k.ioctl(vm, k.CREATE_VCPU, 0)
    k.ioctl(vcpu, k.GET_SREGS, k.Sregs())                 # a vCPU ioctl too
    new = sorted(after - before) if before is not None and after is not None else []
    os.write(w, json.dumps({"pid": os.getpid(), "kvm": new}).encode())


def nudge(module):
    """Purge lazily freed vmalloc space: the module that does it, "" if none can
    (then nothing is tried again), None before the first try."""
    for m in ([module] if module else () if module == "" else NUDGE_MODULES):
        if subprocess.run(["modprobe", m], capture_output=True).returncode == 0:
            subprocess.run(["modprobe", "-r", m], capture_output=True)
            return m
    return ""


def main(out, max_vms, max_s):
    vms, owner, module = [], {}, None
    try:            # 1: real addresses for root (0, the lab's, hashes them)
        with open("/proc/sys/kernel/kptr_restrict", "w") as f:
            f.write("1")
    except OSError:
        pass
    # KVM turns its preempt-notifier static key on with the first VM and off with the
    # last, rewriting a jump in __schedule each time; under QEMU's TCG that rewrite
    # panicked the lab guest (Oops: int3 at that very jump). A VM held for the whole
    # run keeps the key on, so the VMs below come and go without patching the kernel.
    anchor = k.ioctl(k.open_kvm(), k.CREATE_VM, 0)
    t0 = time.monotonic()
    while len(vms) < max_vms and time.monotonic() - t0 < max_s:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                one_vm(w)
            except Exception as e:      # noqa: BLE001 (told to the parent)
                os.write(w, json.dumps({"pid": os.getpid(), "error": str(e)}).encode())
            finally:
                os._exit(0)
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)          # its exit closed the fds: the VM is destroyed
        vm = json.loads(data or b'{"error": "the child died"}')
        if "error" in vm:
            sys.exit(f"VM {len(vms) + 1}: {vm['error']}")
        vms.append(vm)
        addr = vm["kvm"][0] if len(vm["kvm"]) == 1 else None
        if addr in owner:
            vm["reuses"] = owner[addr]              # the address's earlier owner
            break
        if addr is not None:
            owner[addr] = vm["pid"]
        module = nudge(module)
    with open(out, "w") as f:
        json.dump({"vms": vms, "anchor": os.getpid(), "nudge": module or None,
                   "vmallocinfo": kvm_areas() is not None}, f)
    os.close(anchor)
    print(f"{len(vms)} VMs, address reused: {'reuses' in vms[-1] if vms else False}, "
          f"nudge module: {module or None}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
