"""arm64: a vGICv3 with an ITS whose LPIs the VMM creates, injects and tears down.

The ITS's tables are written by the VMM in KVM's save format (ABI rev 0,
Documentation/virt/kvm/devices/arm-vgic-its.rst) and loaded with
KVM_DEV_ARM_ITS_RESTORE_TABLES, as a migration's destination would, so that no
guest driver is needed: that creates the LPIs (`lpi_xa` inserts). KVM_SIGNAL_MSI
injects them (vgic_put_irq from the ioctl, IRQs on); the guest acknowledges them
(vgic_put_irq when the vCPU's ap_list is pruned, IRQs off); an ITS reset frees
the translations (vgic_put_irq from its_free_ite, IRQs on), releasing each LPI
whose last reference it was (the `lpi_xa` erase).
"""
import os
import struct

from kvmlockprof.workload import kvmapi

# Guest physical layout (QEMU virt's GIC addresses; our RAM below them).
DIST_GPA = 0x08000000
ITS_GPA = 0x08080000
REDIST_GPA = 0x080A0000           # 128 KiB (two frames) a vCPU
ITS_TRANSLATER = 0x10040          # the doorbell, from the ITS's base
TABLES_GPA = 0x00200000           # a memslot of its own: property, pending, ITS tables
TABLES_SLOT = 100                 # above the churn threads' slots (1 + index)
MMIO_EXIT_GPA = 0x10000000        # no memslot: the guest's store there exits to us

MIN_LPI = 8192                    # the GIC architecture's first LPI INTID
ID_BITS = 14                      # INTIDs below 2^14: up to 8192 LPIs
EVENT_BITS = 5                    # 32 events (LPIs) a device
PAGE = 0x1000
PEND_ALIGN = 0x10000              # GICR_PENDBASER and the ITS tables: 64 KiB aligned

GICD_CTLR, GICD_CTLR_ENABLE_G1A, GICD_CTLR_ARE = 0x0000, 1 << 1, 1 << 4
GICR_CTLR, GICR_PROPBASER, GICR_PENDBASER = 0x0000, 0x0070, 0x0078
GITS_CTLR, GITS_CBASER, GITS_BASER0, GITS_BASER1 = 0x0000, 0x0080, 0x0100, 0x0108
VALID = 1 << 63


def _sysreg(read, op0, op1, crn, crm, op2, rt):
    """MRS/MSR Xt, <system register>."""
    return (0xD5000000 | read << 21 | op0 << 19 | op1 << 16 | crn << 12 | crm << 8 |
            op2 << 5 | rt)


ICC_PMR_EL1 = (3, 0, 4, 6, 0)
ICC_IGRPEN1_EL1 = (3, 0, 12, 12, 7)
ICC_IAR1_EL1 = (3, 0, 12, 12, 0)
ICC_EOIR1_EL1 = (3, 0, 12, 12, 1)


def guest_code():
    """Unmask group 1 at every priority, then forever: acknowledge the highest pending
    interrupt, end it (a spurious 1023 is ignored) and store to MMIO_EXIT_GPA
    (x1), which exits to the VMM. PSTATE.I stays set: nothing is taken as an
    exception, the interrupt is read from ICC_IAR1_EL1."""
    words = [0xD2801FE0,                                  # movz x0, #0xff
             _sysreg(0, *ICC_PMR_EL1, 0),                 # msr icc_pmr_el1, x0
             0xD2800020,                                  # movz x0, #1
             _sysreg(0, *ICC_IGRPEN1_EL1, 0),             # msr icc_igrpen1_el1, x0
             0xD5033FDF,                                  # isb
             _sysreg(1, *ICC_IAR1_EL1, 2),                # loop: mrs x2, icc_iar1_el1
             _sysreg(0, *ICC_EOIR1_EL1, 2),               # msr icc_eoir1_el1, x2
             0xF9000020,                                  # str x0, [x1]
             0x17FFFFFD]                                  # b loop
    return struct.pack(f"<{len(words)}I", *words)


def init_vcpu(vm_fd, vcpu_fd, code_gpa):
    target = kvmapi.VcpuInit()
    kvmapi.ioctl(vm_fd, kvmapi.ARM_PREFERRED_TARGET, target)
    kvmapi.ioctl(vcpu_fd, kvmapi.ARM_VCPU_INIT, target)
    for reg, value in ((kvmapi.ARM64_REG_PC, code_gpa), (kvmapi.ARM64_REG_X1, MMIO_EXIT_GPA)):
        v = kvmapi.ctypes.c_uint64(value)
        kvmapi.ioctl(vcpu_fd, kvmapi.SET_ONE_REG,
                     kvmapi.OneReg(id=reg, addr=kvmapi.ctypes.addressof(v)))


def _device(vm_fd, kind):
    d = kvmapi.CreateDevice(type=kind)
    try:
        kvmapi.ioctl(vm_fd, kvmapi.CREATE_DEVICE, d)
    except kvmapi.KvmError as e:
        what = "vGICv3" if kind == kvmapi.DEV_TYPE_ARM_VGIC_V3 else "vGIC ITS"
        raise kvmapi.KvmError(f"this KVM cannot create a {what} ({e}): the lab's arm64 machine "
                              "needs gic-version=3,its=on") from None
    return d.fd


def _set(fd, group, attr, value=None, width=8):
    buf = (kvmapi.ctypes.c_uint64 if width == 8 else kvmapi.ctypes.c_uint32)(value or 0)
    try:
        kvmapi.ioctl(fd, kvmapi.SET_DEVICE_ATTR,
                     kvmapi.DeviceAttr(group=group, attr=attr, addr=kvmapi.ctypes.addressof(buf)))
    except kvmapi.KvmError as e:
        raise kvmapi.KvmError(f"{e} (KVM_SET_DEVICE_ATTR group {group} attr {attr:#x} value "
                              f"{value or 0:#x})") from None


class Lpis:
    """A vGICv3 + ITS for `vcpus` vCPUs (create before the vCPUs, then
    start() once they exist) with `n` LPIs: device d, event e is LPI
    MIN_LPI + 32 d + e, its collection that of vCPU (32 d + e) % vcpus."""

    def __init__(self, vm_fd, vcpus, n):
        if not 0 < n <= (1 << ID_BITS) - MIN_LPI:
            raise kvmapi.KvmError(f"--lpis takes 1..{(1 << ID_BITS) - MIN_LPI}")
        self.vm_fd, self.vcpus, self.n = vm_fd, vcpus, n
        self.devices = -(-n // (1 << EVENT_BITS))
        self.gic = _device(vm_fd, kvmapi.DEV_TYPE_ARM_VGIC_V3)
        _set(self.gic, kvmapi.VGIC_GRP_ADDR, kvmapi.VGIC_V3_ADDR_TYPE_DIST, DIST_GPA)
        _set(self.gic, kvmapi.VGIC_GRP_ADDR, kvmapi.VGIC_V3_ADDR_TYPE_REDIST, REDIST_GPA)
        self.its = _device(vm_fd, kvmapi.DEV_TYPE_ARM_VGIC_ITS)
        _set(self.its, kvmapi.VGIC_GRP_ADDR, kvmapi.VGIC_ITS_ADDR_TYPE, ITS_GPA)
        _set(self.its, kvmapi.VGIC_GRP_CTRL, kvmapi.VGIC_CTRL_INIT)
        # Property table, one pending table a vCPU, then the ITS's tables: KVM reads a
        # GITS_BASER's address as 64 KiB pages' (bits 47:16) and scans 64 KiB a page.
        self.prop = 0
        self.pend = PEND_ALIGN
        self.dev_table = self.pend + PEND_ALIGN * vcpus
        self.coll_table = self.dev_table + PEND_ALIGN
        self.cmd_queue = self.coll_table + PEND_ALIGN
        self.itts = self.cmd_queue + PAGE
        self.size = -(-(self.itts + self.devices * 256) // PEND_ALIGN) * PEND_ALIGN
        self.mem, hva = kvmapi.guest_memory(self.size)
        kvmapi.set_memslot(vm_fd, TABLES_SLOT, TABLES_GPA, self.size, hva)
        self.mem[self.prop:self.prop + n] = bytes([0xA1]) * n      # priority 0xa0, enabled
        self.restores = 0
        self.doorbell = ITS_GPA + ITS_TRANSLATER

    def start(self):
        """After the vCPUs exist: initialise the vGIC, enable LPIs on every
        redistributor and load the ITS's tables (the LPIs are created)."""
        _set(self.gic, kvmapi.VGIC_GRP_CTRL, kvmapi.VGIC_CTRL_INIT)
        # No guest driver: the VMM enables the distributor's group 1, as one would.
        _set(self.gic, kvmapi.VGIC_GRP_DIST_REGS, GICD_CTLR,
             GICD_CTLR_ENABLE_G1A | GICD_CTLR_ARE, 4)
        for i in range(self.vcpus):
            mpidr = ((i >> 4) << 8 | (i & 15)) << 32      # KVM's default MPIDR: 16 a cluster
            prop = TABLES_GPA + self.prop | (ID_BITS - 1)
            pend = TABLES_GPA + self.pend + PEND_ALIGN * i
            for off, value in ((GICR_PROPBASER, prop), (GICR_PENDBASER, pend)):
                _set(self.gic, kvmapi.VGIC_GRP_REDIST_REGS, mpidr | off, value & 0xFFFFFFFF, 4)
                _set(self.gic, kvmapi.VGIC_GRP_REDIST_REGS, mpidr | off + 4, value >> 32, 4)
            _set(self.gic, kvmapi.VGIC_GRP_REDIST_REGS, mpidr | GICR_CTLR, 1, 4)  # EnableLPIs
        self._write_tables()
        self.restore()

    def _write_tables(self):
        coll = b"".join(struct.pack("<Q", VALID | c << 16 | c) for c in range(self.vcpus))
        self.mem[self.coll_table:self.coll_table + len(coll)] = coll
        for d in range(self.devices):
            itt = self.itts + 256 * d
            last_dev = d == self.devices - 1
            dte = VALID | (0 if last_dev else 1) << 49 | ((TABLES_GPA + itt) >> 8) << 5 | \
                (EVENT_BITS - 1)
            self.mem[self.dev_table + 8 * d:self.dev_table + 8 * d + 8] = struct.pack("<Q", dte)
            events = min(1 << EVENT_BITS, self.n - (d << EVENT_BITS))
            for e in range(events):
                lpi = (d << EVENT_BITS) + e
                ite = (0 if e == events - 1 else 1) << 48 | (MIN_LPI + lpi) << 16 | \
                    lpi % self.vcpus
                self.mem[itt + 8 * e:itt + 8 * e + 8] = struct.pack("<Q", ite)

    def restore(self):
        """Point the ITS at the tables, load them and enable it. All vCPUs must be out
        of KVM_RUN (KVM takes every vCPU's mutex, or refuses with EBUSY)."""
        for off, table in ((GITS_BASER0, self.dev_table), (GITS_BASER1, self.coll_table),
                           (GITS_CBASER, self.cmd_queue)):
            _set(self.its, kvmapi.VGIC_GRP_ITS_REGS, off, VALID | (TABLES_GPA + table))
        _set(self.its, kvmapi.VGIC_GRP_CTRL, kvmapi.ITS_RESTORE_TABLES)
        _set(self.its, kvmapi.VGIC_GRP_ITS_REGS, GITS_CTLR, 1)
        self.restores += 1

    def reset(self):
        """Free every translation (and so the LPIs no vCPU still holds), then load the
        tables again: each LPI is released and created anew. vCPUs out of KVM_RUN."""
        _set(self.its, kvmapi.VGIC_GRP_CTRL, kvmapi.ITS_CTRL_RESET)
        self.restore()

    def msi(self, lpi):
        """Inject LPI number `lpi` (0-based) through the ITS; True if delivered."""
        m = kvmapi.Msi(address_lo=self.doorbell & 0xFFFFFFFF, address_hi=self.doorbell >> 32,
                       data=lpi & ((1 << EVENT_BITS) - 1), flags=kvmapi.MSI_VALID_DEVID,
                       devid=lpi >> EVENT_BITS)
        return kvmapi.ioctl(self.vm_fd, kvmapi.SIGNAL_MSI, m) > 0

    def close(self):
        for fd in (self.its, self.gic):
            os.close(fd)
