"""The slice of the KVM ioctl ABI the built-in workload needs (linux/kvm.h).

Only stable UAPI is used: these numbers and layouts have not changed since
KVM's API version 12, so they are safe to state here.
"""
import ctypes
import fcntl
import mmap
import os

KVMIO = 0xAE


def _ioc(direction, nr, size):
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr):
    return _ioc(0, nr, 0)


def _iow(nr, struct):
    return _ioc(1, nr, ctypes.sizeof(struct))


def _ior(nr, struct):
    return _ioc(2, nr, ctypes.sizeof(struct))


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class Segment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16), ("type", ctypes.c_uint8),
                ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8), ("db", ctypes.c_uint8),
                ("s", ctypes.c_uint8), ("l", ctypes.c_uint8), ("g", ctypes.c_uint8),
                ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
                ("padding", ctypes.c_uint8)]


class DTable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [(n, Segment) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")] + \
               [("gdt", DTable), ("idt", DTable)] + \
               [(n, ctypes.c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                                               "apic_base")] + \
               [("interrupt_bitmap", ctypes.c_uint64 * 4)]


class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
        "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class XenHvmConfig(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("msr", ctypes.c_uint32),
                ("blob_addr_32", ctypes.c_uint64), ("blob_addr_64", ctypes.c_uint64),
                ("blob_size_32", ctypes.c_uint8), ("blob_size_64", ctypes.c_uint8),
                ("pad2", ctypes.c_uint8 * 30)]


class XenAttr(ctypes.Structure):
    """struct kvm_xen_hvm_attr and struct kvm_xen_vcpu_attr share this shape:
    a u16 type, padding, then a 64-byte union whose first u64 we set."""
    _fields_ = [("type", ctypes.c_uint16), ("pad", ctypes.c_uint16 * 3),
                ("u64", ctypes.c_uint64), ("rest", ctypes.c_uint64 * 7)]


class XenEvtchn(ctypes.Structure):          # struct kvm_irq_routing_xen_evtchn
    _fields_ = [("port", ctypes.c_uint32), ("vcpu", ctypes.c_uint32),
                ("priority", ctypes.c_uint32)]


class MsrsHeader(ctypes.Structure):
    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


GET_API_VERSION = _io(0x00)
CREATE_VM = _io(0x01)
GET_VCPU_MMAP_SIZE = _io(0x04)
CREATE_VCPU = _io(0x41)
SET_USER_MEMORY_REGION = _iow(0x46, UserspaceMemoryRegion)
SET_TSS_ADDR = _io(0x47)
CREATE_IRQCHIP = _io(0x60)
SET_MP_STATE = _ioc(1, 0x99, 4)      # struct kvm_mp_state: one u32
MP_STATE_RUNNABLE = 0
RUN = _io(0x80)
CHECK_EXTENSION = _io(0x03)
XEN_HVM_CONFIG = _iow(0x7A, XenHvmConfig)
XEN_HVM_SET_ATTR = _iow(0xC9, XenAttr)
XEN_VCPU_SET_ATTR = _iow(0xCB, XenAttr)
XEN_HVM_EVTCHN_SEND = _iow(0xD0, XenEvtchn)
CAP_XEN_HVM = 38
XEN_HVM_CONFIG_EVTCHN_SEND = 1 << 5
XEN_ATTR_TYPE_SHARED_INFO = 1
XEN_VCPU_ATTR_TYPE_VCPU_INFO = 0
XEN_VCPU_ATTR_TYPE_TIMER = 7
XEN_EVTCHN_PRIO_2LEVEL = 0xFFFFFFFF
SET_REGS = _iow(0x82, Regs)
GET_SREGS = _ior(0x83, Sregs)
SET_SREGS = _iow(0x84, Sregs)

# struct kvm_run: exit_reason at offset 8, the exit union at 32.
RUN_EXIT_REASON = 8
EXIT_IO = 2
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_NAMES = {0: "unknown", 1: "exception", 2: "io", 3: "hypercall", 4: "debug", 5: "hlt",
              6: "mmio", 7: "irq_window_open", 8: "shutdown", 9: "fail_entry", 10: "intr",
              17: "internal_error"}

MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
MSR_IA32_APICBASE = 0x1B
APICBASE_ENABLE = 1 << 11

# --- arm64 (linux/kvm.h, arch/arm64/include/uapi/asm/kvm.h) ---------------------------


class VcpuInit(ctypes.Structure):           # struct kvm_vcpu_init
    _fields_ = [("target", ctypes.c_uint32), ("features", ctypes.c_uint32 * 7)]


class OneReg(ctypes.Structure):             # struct kvm_one_reg
    _fields_ = [("id", ctypes.c_uint64), ("addr", ctypes.c_uint64)]


class CreateDevice(ctypes.Structure):       # struct kvm_create_device
    _fields_ = [("type", ctypes.c_uint32), ("fd", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class DeviceAttr(ctypes.Structure):         # struct kvm_device_attr
    _fields_ = [("flags", ctypes.c_uint32), ("group", ctypes.c_uint32),
                ("attr", ctypes.c_uint64), ("addr", ctypes.c_uint64)]


class Msi(ctypes.Structure):                # struct kvm_msi
    _fields_ = [("address_lo", ctypes.c_uint32), ("address_hi", ctypes.c_uint32),
                ("data", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("devid", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 12)]


def _iowr(nr, struct):
    return _ioc(3, nr, ctypes.sizeof(struct))


SIGNAL_MSI = _iow(0xA5, Msi)
SET_ONE_REG = _iow(0xAC, OneReg)
ARM_VCPU_INIT = _iow(0xAE, VcpuInit)
ARM_PREFERRED_TARGET = _ior(0xAF, VcpuInit)
CREATE_DEVICE = _iowr(0xE0, CreateDevice)
SET_DEVICE_ATTR = _iow(0xE1, DeviceAttr)
MSI_VALID_DEVID = 1
DEV_TYPE_ARM_VGIC_V3 = 7
DEV_TYPE_ARM_VGIC_ITS = 8
VGIC_GRP_ADDR = 0
VGIC_GRP_DIST_REGS = 1
VGIC_GRP_CTRL = 4
VGIC_GRP_REDIST_REGS = 5
VGIC_GRP_ITS_REGS = 8
VGIC_V3_ADDR_TYPE_DIST = 2
VGIC_V3_ADDR_TYPE_REDIST = 3
VGIC_ITS_ADDR_TYPE = 4
VGIC_CTRL_INIT = 0
ITS_RESTORE_TABLES = 2
ITS_CTRL_RESET = 4
# KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset in struct kvm_regs) / 4
ARM64_CORE_REG = 0x6030000000100000


def arm64_core_reg(offset):
    return ARM64_CORE_REG | (offset // 4)


ARM64_REG_X1 = arm64_core_reg(8)
ARM64_REG_PC = arm64_core_reg(32 * 8)           # after x0..x30 and sp


class KvmError(RuntimeError):
    """/dev/kvm is missing, not permitted, or refused a request."""


def open_kvm(path="/dev/kvm"):
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmError(f"{path} does not exist: load kvm (modprobe kvm_intel or kvm_amd) "
                       "or run on a host with hardware virtualisation") from None
    except PermissionError:
        raise KvmError(f"{path} is not permitted for this user: run as root or join "
                       "the 'kvm' group") from None
    version = fcntl.ioctl(fd, GET_API_VERSION)
    if version != 12:
        os.close(fd)
        raise KvmError(f"{path} speaks KVM API {version}, expected 12")
    return fd


def ioctl(fd, request, arg=0):
    try:
        return fcntl.ioctl(fd, request, arg)
    except InterruptedError:    # a signal: KVM_RUN's caller tells a kick from a failure
        raise
    except OSError as e:
        raise KvmError(f"KVM ioctl {request:#x} failed: {e.strerror}") from None


def guest_memory(size):
    """Anonymous shared memory for a memslot, with its host virtual address."""
    mem = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    return mem, addr


def set_memslot(vm_fd, slot, gpa, size, hva):
    region = UserspaceMemoryRegion(slot=slot, flags=0, guest_phys_addr=gpa,
                                   memory_size=size, userspace_addr=hva)
    ioctl(vm_fd, SET_USER_MEMORY_REGION, region)


def set_msr(vcpu_fd, index, value):
    class Msrs(ctypes.Structure):
        _fields_ = [("hdr", MsrsHeader), ("index", ctypes.c_uint32),
                    ("reserved", ctypes.c_uint32), ("data", ctypes.c_uint64)]
    msrs = Msrs(hdr=MsrsHeader(nmsrs=1), index=index, data=value)
    # KVM_SET_MSRS is sized by its header; it returns how many MSRs it set.
    return ioctl(vcpu_fd, _ioc(1, 0x89, ctypes.sizeof(MsrsHeader)), msrs)
