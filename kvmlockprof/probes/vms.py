"""vms: the VMs (struct kvm) and vCPUs the function probes name locks by, with
their owners and lifetimes (bpf/vms.bpf.c, the registry in bpf/common.h)."""
from kvmlockprof.probe import FENTRY, KPROBE, Probe, Target

_FILP = {"kvm_vm_ioctl": ("filp", "ioctl", "arg"), "kvm_vcpu_ioctl": ("filp", "ioctl", "arg")}

PROBE = Probe(
    name="vms",
    fires="per VM and vCPU ioctl (KVM_RUN: per exit to user space), per VM or vCPU "
          "made or destroyed",
    summary="learn VMs (struct kvm) and vCPUs with their owning process and thread, "
            "and when each is destroyed",
    targets=(Target("VM_IOCTL", ("kvm_vm_ioctl",), (FENTRY, KPROBE), ("filp",), _FILP),
             Target("VCPU_IOCTL", ("kvm_vcpu_ioctl",), (FENTRY, KPROBE), ("filp", "ioctl"),
                    _FILP),
             # Lifetimes: without these the first owner seen keeps an address for
             # the whole session, even once the kernel reuses it for another VM.
             Target("VM_CREATE", ("kvm_arch_init_vm",), (FENTRY, KPROBE), ("kvm",),
                    {"kvm_arch_init_vm": ("kvm", "type")}, optional=True),
             Target("VM_DESTROY", ("kvm_destroy_vm", "kvm_arch_destroy_vm"),
                    (FENTRY, KPROBE), ("kvm",),
                    {"kvm_destroy_vm": ("kvm",), "kvm_arch_destroy_vm": ("kvm",)},
                    ret=True, optional=True),
             Target("VCPU_CREATE", ("kvm_arch_vcpu_postcreate",), (FENTRY, KPROBE),
                    ("vcpu",), {"kvm_arch_vcpu_postcreate": ("vcpu",)}, optional=True),
             Target("VCPU_TEARDOWN", ("kvm_arch_vcpu_destroy",), (FENTRY, KPROBE),
                    ("vcpu",), {"kvm_arch_vcpu_destroy": ("vcpu",)}, optional=True)),
    bpf="vms.bpf.c",
    tables=("vms", "vcpus"),
    # the shared registry's tables (functions.SHARED_TABLES), whichever probe filled them
    columns={"vms": {"kvm": "n", "tgid": "n"},
             "vcpus": {"vcpu": "n", "kvm": "n", "tgid": "n", "vcpu_idx": "n"}},
    fields={"FILE_PRIVATE_DATA": ("file", "private_data"),
            "VCPU_KVM": ("kvm_vcpu", "kvm"), "VCPU_IDX": ("kvm_vcpu", "vcpu_idx"),
            "VCPU_ID": ("kvm_vcpu", "vcpu_id")},
)
