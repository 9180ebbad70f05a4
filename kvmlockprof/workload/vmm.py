"""A tiny VMM over raw /dev/kvm ioctls: real vCPUs running real-mode guest code.

Each vCPU loops over a few instructions that read a page of the spare memslot
(a shadow-MMU or TDP fault when the slot was just recreated), optionally write
MSR_KVM_SYSTEM_TIME_NEW (kvmclock: activates and refreshes the vCPU's
gfn_to_pfn_cache `vcpu->arch.pv_time`), and exit to this process on port I/O.
Churn threads create and delete spare memslots, which takes `kvm->slots_lock`,
waits in `synchronize_srcu_expedited(&kvm->srcu)` and zaps SPTEs under
`kvm->mmu_lock`: the contention a memslot-update patch is reviewed for.
On arm64 the vCPUs run AArch64 code instead, with a vGICv3 and its ITS's LPIs
(gicv3.py) when asked.
"""
import ctypes
import mmap
import os
import platform
import signal
import threading
import time
from dataclasses import dataclass, field

from kvmlockprof.workload import gicv3, kvmapi

ARM64 = platform.machine() == "aarch64"

CODE_GPA = 0x1000
PVCLOCK_GPA = 0x2000
XEN_SHINFO_GPA = 0x3000           # Xen shared_info page (evtchn_pending at +2048)
XEN_VCPU_INFO_GPA = 0x4000        # one 64-byte vcpu_info per vCPU
XEN_PENDING_OFF = 2048
XEN_PORT = 3
XEN_TIMER_PORT = 4
MAIN_SLOT_SIZE = 0x10000          # 64 KiB at GPA 0: code and the pvclock page
SPARE_GPA = 0x80000               # real mode reaches it as DS=0x8000
SPARE_SIZE = 0x10000              # 16 pages, one touched per loop
PORT = 0x10

# mov si,[bx]; add bx,0x1000; [wrmsr;] out 0x10,al; jmp loop
# (the touch loads SI: EAX/ECX/EDX hold the MSR value and index for wrmsr)
_TOUCH = bytes([0x8B, 0x37, 0x81, 0xC3, 0x00, 0x10])
_WRMSR = bytes([0x0F, 0x30])
_OUT = bytes([0xE6, PORT])


def guest_code(kvmclock):
    body = _TOUCH + (_WRMSR if kvmclock else b"") + _OUT
    return body + bytes([0xEB, (-(len(body) + 2)) & 0xFF])


@dataclass
class WorkloadConfig:
    vcpus: int = 2
    duration: float = 10.0
    churn: bool = False            # memslot create/delete loop(s)
    churn_threads: int = 2
    churn_rate: float = 0.0        # ops/s per churn thread, 0 = as fast as possible
    kvmclock: bool = False         # guest writes MSR_KVM_SYSTEM_TIME_NEW every loop
    xen: bool = False              # KVM_XEN_HVM_EVTCHN_SEND in a loop (kvm_xen_set_evtchn_fast)
    xen_slow_every: int = 0        # drop the shared_info page every N sends: forces fallback
    xen_vcpu_info: bool = True     # an explicit vcpu_info per vCPU (its own gfn_to_pfn_cache)
    xen_timer_every: int = 0       # every N exits a vCPU sets its Xen timer already expired,
                                   # its shared_info page dropped: the slow path (seed 000's)
    apic_toggle_every: int = 0     # every N exits a vCPU turns its local APIC off and on,
                                   # by KVM_SET_SREGS and by KVM_SET_MSRS (seed 004's callers)
    lpis: int = 0                  # arm64: a vGICv3 + ITS with this many LPIs (gicv3.Lpis)
    msi_threads: int = 2           # threads injecting the LPIs (KVM_SIGNAL_MSI)
    msi_rate: float = 0.0          # MSIs/s per thread, 0 = as fast as possible
    lpi_reset_every: float = 0.0   # s between ITS resets (every LPI released, made anew)


@dataclass
class WorkDone:
    """What the workload did: the denominators for per-unit-of-work rates."""
    pid: int
    duration_s: float
    vcpus: int
    exits: list = field(default_factory=list)          # per vCPU, all exits to userspace
    io_exits: list = field(default_factory=list)
    mmio_exits: list = field(default_factory=list)
    msr_writes: int = 0
    churn_ops: int = 0                                  # memslot create + delete ioctls
    xen_sends: int = 0                                  # KVM_XEN_HVM_EVTCHN_SEND ioctls
    xen_forced_slow: int = 0                            # shared_info pages dropped
    xen_timers: int = 0                                 # expired Xen timers set
    apic_toggles: int = 0                               # APIC off+on, each way (sregs, MSR)
    lpis: int = 0                                       # LPIs the ITS tables map
    msis: int = 0                                       # KVM_SIGNAL_MSI delivered
    msis_refused: int = 0                               # refused (the ITS was being reset)
    lpi_restores: int = 0                               # tables loaded (1 + resets)
    config: dict = field(default_factory=dict)
    interrupted: bool = False                           # stopped early by a signal
    kicked: list = field(default_factory=list)          # vCPUs still in KVM_RUN at the stop

    def as_dict(self):
        d = dict(self.__dict__)
        d["exits_total"] = sum(self.exits)
        d["exits_per_s_per_vcpu"] = [e / self.duration_s for e in self.exits] \
            if self.duration_s else []
        d["churn_ops_per_s"] = self.churn_ops / self.duration_s if self.duration_s else 0.0
        return d


def _name_thread(name):
    """Kernel-visible thread name (comm), so that samples show vcpu0, churn1, ..."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)    # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class _Gate:
    """Parks every vCPU thread out of KVM_RUN while a VM-wide ioctl that needs all of
    their mutexes runs (the ITS reset), as a VMM pauses its vCPUs."""

    def __init__(self, n):
        self.n, self.parked, self.closing = n, 0, False
        self.cond = threading.Condition()

    def park(self):                         # a vCPU thread, between two KVM_RUNs
        with self.cond:
            self.parked += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: not self.closing)
            self.parked -= 1

    def paused(self, fn, stop):
        """fn() with every vCPU parked; False if stopped first."""
        with self.cond:
            self.closing = True
            try:
                while not self.cond.wait_for(lambda: self.parked == self.n, 0.1):
                    if stop.is_set():
                        return False
                fn()
                return True
            finally:
                self.closing = False
                self.cond.notify_all()


class _Vcpu:
    def __init__(self, vm_fd, index, run_size, kvmclock, gate=None):
        self.fd = kvmapi.ioctl(vm_fd, kvmapi.CREATE_VCPU, index)
        self.run = mmap.mmap(self.fd, run_size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.exits = self.io = self.mmio = self.xen_timers = self.apic_toggles = 0
        self.error = None
        self.gate = gate
        self.between = []               # (N, call): a call every N exits (Workload's)
        if ARM64:
            gicv3.init_vcpu(vm_fd, self.fd, CODE_GPA)
            return
        sregs = kvmapi.Sregs()
        kvmapi.ioctl(self.fd, kvmapi.GET_SREGS, sregs)
        sregs.cs.base, sregs.cs.selector = 0, 0
        sregs.ds.base, sregs.ds.selector = SPARE_GPA, SPARE_GPA >> 4
        kvmapi.ioctl(self.fd, kvmapi.SET_SREGS, sregs)
        regs = kvmapi.Regs(rip=CODE_GPA, rflags=2, rbx=0,
                           rcx=kvmapi.MSR_KVM_SYSTEM_TIME_NEW if kvmclock else 0,
                           rax=(PVCLOCK_GPA + 64 * index) | 1, rdx=0)
        kvmapi.ioctl(self.fd, kvmapi.SET_REGS, regs)

    def loop(self, stop, name):
        _name_thread(name)
        run_ioctl, fd, run, gate = kvmapi.ioctl, self.fd, self.run, self.gate
        between = self.between
        exits = io = mmio = 0
        try:
            while not stop.is_set():
                try:
                    run_ioctl(fd, kvmapi.RUN)
                except InterruptedError:    # kicked out at the stop (run()), or a stray signal
                    continue
                reason = int.from_bytes(run[kvmapi.RUN_EXIT_REASON:kvmapi.RUN_EXIT_REASON + 4],
                                        "little")
                exits += 1
                if not exits & 1023:         # progress(): live counts, at little cost
                    self.exits = exits
                if gate is not None and gate.closing:
                    gate.park()
                for every, call in between:
                    if not exits % every:
                        call(self)
                if reason == kvmapi.EXIT_IO:
                    io += 1
                elif reason == kvmapi.EXIT_MMIO:  # the spare slot is deleted right now
                    mmio += 1
                else:
                    raise kvmapi.KvmError(f"guest stopped with exit reason "
                                          f"{kvmapi.EXIT_NAMES.get(reason, reason)}")
        except Exception as e:   # reported by the main thread, which owns the exit code
            self.error = e
            stop.set()
        self.exits, self.io, self.mmio = exits, io, mmio


def _toggle_apic(vcpu):
    """From the vCPU's thread, between two KVM_RUNs: its local APIC off and on again,
    once through KVM_SET_SREGS and once through KVM_SET_MSRS: kvm_lapic_set_base()
    from two ioctls, which before 6.2 called kvm_vcpu_update_apicv() with SRCU not
    held (sregs) and held (MSRs): seed 004's "may or may not hold SRCU"."""
    sregs = kvmapi.Sregs()
    kvmapi.ioctl(vcpu.fd, kvmapi.GET_SREGS, sregs)
    base = sregs.apic_base
    for value in (base & ~kvmapi.APICBASE_ENABLE, base):
        sregs.apic_base = value
        kvmapi.ioctl(vcpu.fd, kvmapi.SET_SREGS, sregs)
    for value in (base & ~kvmapi.APICBASE_ENABLE, base):
        kvmapi.set_msr(vcpu.fd, kvmapi.MSR_IA32_APICBASE, value)
    vcpu.apic_toggles += 1


def _paced(stop, rate):
    """Yield until `stop` is set, at most `rate` times a second (0: as fast as possible)."""
    period = 1.0 / rate if rate else 0.0
    next_t = time.monotonic()
    while not stop.is_set():
        yield
        if period:
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                stop.wait(delay)


KICK_AFTER_S = 1.0      # a vCPU exits every few us: one still in KVM_RUN after this is stuck


def _join(vcpu_threads):
    """Join the vCPU threads once stop is set; those still in KVM_RUN after
    KICK_AFTER_S (a guest that stopped exiting) are kicked out with a signal,
    which KVM_RUN returns for as EINTR, again every 0.1 s until they return (a
    signal taken just before the ioctl is not pending inside it). Returns the
    indices kicked. Signal handlers belong to the main thread: elsewhere, no kick."""
    deadline = time.monotonic() + KICK_AFTER_S
    for t in vcpu_threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [i for i, t in enumerate(vcpu_threads) if t.is_alive()]
    if not stuck or threading.current_thread() is not threading.main_thread():
        return stuck
    old = signal.signal(signal.SIGUSR1, lambda *_: None)   # no default action: it kills
    try:
        while any(vcpu_threads[i].is_alive() for i in stuck):
            for i in stuck:
                if vcpu_threads[i].is_alive():
                    signal.pthread_kill(vcpu_threads[i].ident, signal.SIGUSR1)
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGUSR1, old)
    return stuck


class Workload:
    """Python API: Workload(WorkloadConfig(...)).run() -> WorkDone."""

    def __init__(self, config):
        self.config = config
        self.kvm_fd = kvmapi.open_kvm()
        self.vm_fd = kvmapi.ioctl(self.kvm_fd, kvmapi.CREATE_VM, 0)
        if (config.lpis or config.lpi_reset_every) and not ARM64:
            raise kvmapi.KvmError("--lpis needs an arm64 host (a vGICv3 ITS): run it in "
                                  "`kvmlockprof lab --arch arm64`")
        if config.lpi_reset_every and not config.lpis:
            raise kvmapi.KvmError("--lpi-reset-every resets the ITS of --lpis N: give both")
        if config.xen and ARM64:
            raise kvmapi.KvmError("--xen is x86 only")
        try:
            # VMX real mode wants a TSS (the int arg is signed; KVM takes 32 bits)
            kvmapi.ioctl(self.vm_fd, kvmapi.SET_TSS_ADDR, 0xFFFBD000 - (1 << 32))
        except kvmapi.KvmError:
            pass                                             # not needed on SVM/PVM
        self.main_mem, main_hva = kvmapi.guest_memory(MAIN_SLOT_SIZE)
        code = gicv3.guest_code() if ARM64 else guest_code(config.kvmclock)
        self.main_mem[CODE_GPA:CODE_GPA + len(code)] = code
        kvmapi.set_memslot(self.vm_fd, 0, 0, MAIN_SLOT_SIZE, main_hva)
        self.spare = [kvmapi.guest_memory(SPARE_SIZE) for _ in range(max(1, config.churn_threads))]
        # Slot 1 backs what the vCPUs read; further churn threads churn slots of
        # their own, so that they also contend with each other on kvm->slots_lock.
        kvmapi.set_memslot(self.vm_fd, 1, SPARE_GPA, SPARE_SIZE, self.spare[0][1])
        if config.xen:
            self._xen_config()
        if config.apic_toggle_every:
            if ARM64:
                raise kvmapi.KvmError("--apic-toggle-every is x86 only")
            kvmapi.ioctl(self.vm_fd, kvmapi.CREATE_IRQCHIP)  # a local APIC in the kernel
        run_size = kvmapi.ioctl(self.kvm_fd, kvmapi.GET_VCPU_MMAP_SIZE)
        # The vGIC is made before the vCPUs and started once they all exist.
        self.lpis = gicv3.Lpis(self.vm_fd, config.vcpus, config.lpis) if config.lpis else None
        self.gate = _Gate(config.vcpus) if config.lpi_reset_every else None
        self.vcpus = [_Vcpu(self.vm_fd, i, run_size, config.kvmclock, self.gate)
                      for i in range(config.vcpus)]
        if self.lpis:
            self.lpis.start()
        if config.xen and config.xen_vcpu_info:
            for i, v in enumerate(self.vcpus):
                kvmapi.ioctl(v.fd, kvmapi.XEN_VCPU_SET_ATTR,
                             kvmapi.XenAttr(type=kvmapi.XEN_VCPU_ATTR_TYPE_VCPU_INFO,
                                            u64=XEN_VCPU_INFO_GPA + 64 * i))
        if config.xen_timer_every:
            if not config.xen:
                raise kvmapi.KvmError("--xen-timer-every needs --xen (the shared_info page)")
            for v in self.vcpus:
                v.between.append((config.xen_timer_every, self._xen_expired_timer))
        if config.apic_toggle_every:
            for v in self.vcpus:
                v.between.append((config.apic_toggle_every, _toggle_apic))
                # with a local APIC, all but vCPU 0 wait for a startup IPI
                kvmapi.ioctl(v.fd, kvmapi.SET_MP_STATE, ctypes.c_uint32(kvmapi.MP_STATE_RUNNABLE))
        self.xen_sends = self.xen_forced_slow = 0
        self.churn_ops = self.msis = self.msis_refused = 0
        self.errors = []
        self._lock = threading.Lock()

    def _xen_config(self):
        caps = kvmapi.ioctl(self.kvm_fd, kvmapi.CHECK_EXTENSION, kvmapi.CAP_XEN_HVM)
        if not caps & kvmapi.XEN_HVM_CONFIG_EVTCHN_SEND:
            raise kvmapi.KvmError("this kernel's KVM has no Xen event channels "
                                  "(CONFIG_KVM_XEN=n or too old): run --xen in a Xen-capable "
                                  "lab kernel")
        kvmapi.ioctl(self.vm_fd, kvmapi.XEN_HVM_CONFIG,
                     kvmapi.XenHvmConfig(flags=kvmapi.XEN_HVM_CONFIG_EVTCHN_SEND))
        kvmapi.ioctl(self.vm_fd, kvmapi.XEN_HVM_SET_ATTR,
                     kvmapi.XenAttr(type=kvmapi.XEN_ATTR_TYPE_SHARED_INFO,
                                    u64=XEN_SHINFO_GPA >> 12))

    def _xen_sender(self, stop):
        """Send on one port to vCPU 0, clearing its pending bit each time so that
        the fast path delivers; every xen_slow_every sends, drop the shared_info
        page from our mapping: the gfn_to_pfn_cache is invalidated and the next
        send falls back to the slow path."""
        _name_thread("kvmlp-xen")
        ev = kvmapi.XenEvtchn(port=XEN_PORT, vcpu=0, priority=kvmapi.XEN_EVTCHN_PRIO_2LEVEL)
        pending = XEN_SHINFO_GPA + XEN_PENDING_OFF
        sends = slow = 0
        try:
            while not stop.is_set():
                self.main_mem[pending:pending + 8] = bytes(8)
                kvmapi.ioctl(self.vm_fd, kvmapi.XEN_HVM_EVTCHN_SEND, ev)
                sends += 1
                if self.config.xen_slow_every and sends % self.config.xen_slow_every == 0:
                    self.main_mem.madvise(mmap.MADV_DONTNEED, XEN_SHINFO_GPA, 4096)
                    slow += 1
        except Exception as e:
            self.errors.append(e)
            stop.set()
        self.xen_sends, self.xen_forced_slow = sends, slow

    def _xen_expired_timer(self, vcpu):
        """From the vCPU's thread, between two KVM_RUNs: drop the shared_info page
        (its cache is invalidated: the fast path fails) and set the vCPU's Xen timer to
        a deadline long past, which KVM delivers at once: the timer's event then takes
        kvm_xen_set_evtchn's slow path, from the ioctl or the next KVM_RUN."""
        self.main_mem.madvise(mmap.MADV_DONTNEED, XEN_SHINFO_GPA, 4096)
        attr = kvmapi.XenAttr(type=kvmapi.XEN_VCPU_ATTR_TYPE_TIMER,
                              u64=XEN_TIMER_PORT | kvmapi.XEN_EVTCHN_PRIO_2LEVEL << 32)
        attr.rest[0] = 1                    # expires_ns: kvmclock's first nanosecond
        kvmapi.ioctl(vcpu.fd, kvmapi.XEN_VCPU_SET_ATTR, attr)
        vcpu.xen_timers += 1

    def _msi(self, index, stop):
        """Inject LPIs index, index + msi_threads, ... in turn, at msi_rate."""
        _name_thread(f"kvmlp-msi{index}")
        cfg = self.config
        mine = range(index, self.lpis.n, cfg.msi_threads) or range(self.lpis.n)
        sent = refused = 0
        try:
            for _ in _paced(stop, cfg.msi_rate):
                for lpi in mine:
                    try:
                        sent += self.lpis.msi(lpi)
                    except kvmapi.KvmError:  # the ITS is being reset: its tables are gone
                        refused += 1
        except Exception as e:
            self.errors.append(e)
            stop.set()
        with self._lock:
            self.msis += sent
            self.msis_refused += refused

    def _lpi_resets(self, stop):
        _name_thread("kvmlp-itsreset")
        try:
            while not stop.wait(self.config.lpi_reset_every):
                self.gate.paused(self.lpis.reset, stop)
        except Exception as e:
            self.errors.append(e)
            stop.set()

    def _churn(self, index, stop):
        _name_thread(f"kvmlp-churn{index}")
        slot = 1 + index
        # Slot 1 is what the vCPUs read; the others sit above real mode's reach.
        gpa = 0x100000 + index * SPARE_SIZE if index else SPARE_GPA
        hva = self.spare[index][1]
        ops = 0
        try:
            present = index == 0
            for _ in _paced(stop, self.config.churn_rate):
                kvmapi.set_memslot(self.vm_fd, slot, gpa, 0 if present else SPARE_SIZE, hva)
                present = not present
                ops += 1
                self.churn_live[index] = ops
        except Exception as e:
            self.errors.append(e)
            stop.set()
        with self._lock:
            self.churn_ops += ops

    def progress(self):
        """Work done so far (exits to within 1024 per vCPU), while run() runs."""
        return {"t": time.monotonic(), "exits": sum(v.exits for v in self.vcpus),
                "churn_ops": sum(self.churn_live)}

    def run(self, every=0.0, report=None):
        """Run for config.duration; with `every`, call report(progress()) that often."""
        cfg = self.config
        self.churn_live = [0] * cfg.churn_threads
        stop = threading.Event()
        vcpu_threads = [threading.Thread(target=v.loop, args=(stop, f"kvmlp-vcpu{i}"),
                                         name=f"vcpu{i}", daemon=True)
                        for i, v in enumerate(self.vcpus)]
        threads = list(vcpu_threads)
        if cfg.churn:
            threads += [threading.Thread(target=self._churn, args=(i, stop), name=f"churn{i}",
                                         daemon=True) for i in range(cfg.churn_threads)]
        if cfg.xen:
            threads.append(threading.Thread(target=self._xen_sender, args=(stop,), daemon=True))
        if self.lpis:
            threads += [threading.Thread(target=self._msi, args=(i, stop), daemon=True)
                        for i in range(cfg.msi_threads)]
        if self.gate:
            threads.append(threading.Thread(target=self._lpi_resets, args=(stop,), daemon=True))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        interrupted = False
        try:
            end = t0 + cfg.duration
            while not stop.wait(max(0.0, min(every or cfg.duration, end - time.monotonic()))):
                if time.monotonic() >= end:
                    break
                if report:
                    report(self.progress())
        except KeyboardInterrupt:         # Ctrl-C or SIGTERM: still report the work done
            interrupted = True
        finally:
            stop.set()
            kicked = _join(vcpu_threads)
            for t in threads:
                t.join()
        elapsed = time.monotonic() - t0
        errors = self.errors + [v.error for v in self.vcpus if v.error]
        if errors:
            raise errors[0]
        return WorkDone(
            pid=os.getpid(), duration_s=elapsed, vcpus=cfg.vcpus,
            exits=[v.exits for v in self.vcpus], io_exits=[v.io for v in self.vcpus],
            mmio_exits=[v.mmio for v in self.vcpus],
            msr_writes=sum(v.io for v in self.vcpus) if cfg.kvmclock else 0,
            churn_ops=self.churn_ops, xen_sends=self.xen_sends,
            xen_forced_slow=self.xen_forced_slow,
            xen_timers=sum(v.xen_timers for v in self.vcpus),
            apic_toggles=sum(v.apic_toggles for v in self.vcpus), lpis=cfg.lpis, msis=self.msis,
            msis_refused=self.msis_refused,
            lpi_restores=self.lpis.restores if self.lpis else 0, config=dict(cfg.__dict__),
            interrupted=interrupted, kicked=kicked)

    def close(self):
        if self.lpis:
            self.lpis.close()
        for v in self.vcpus:
            v.run.close()
            os.close(v.fd)
        os.close(self.vm_fd)
        os.close(self.kvm_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
