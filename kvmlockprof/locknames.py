"""KVM-aware lock names: `kvm(1234)->mmu_lock` instead of an address.

Most KVM locks live in dynamically allocated objects (struct kvm and its arch
container, struct kvm_vcpu and its container), which kallsyms cannot name. With
the object's base address known, the running kernel's BTF names any lock inside
it by field path. Bases come from two places, and the recording says which:

- observed: a function probe saw the `struct kvm *` / `struct kvm_vcpu *` (the
  `vms` probe on kvm_vm_ioctl/kvm_vcpu_ioctl; the VM/vCPU registry tables);
- inferred: a contention whose lock is certain from its stack. On x86 (and
  arm64) the only rwlock the MMU code takes is kvm->mmu_lock, so an rwlock
  contended with a kvm_mmu_* / kvm_tdp_mmu_* caller sits at kvm + offsetof(mmu_lock).
"""
import re

import numpy as np

from .analysis import LCB_F_READ, LCB_F_SPIN, LCB_F_WRITE

# Callers whose rwlock can only be kvm->mmu_lock (x86 MMU, TDP MMU; arm64 stage-2 faults).
MMU_CALLER = re.compile(r"^(__)?(kvm_mmu_|kvm_tdp_mmu_|kvm_zap_|tdp_mmu_|user_mem_abort|"
                        r"kvm_handle_guest_abort|kvm_pgtable_stage2_)")


def containers(kbtf, struct):
    """Structs that embed `struct` as their first member (kvm_svm, kvm_vmx, kvm_pvm
    for struct kvm; vcpu_svm, vcpu_vmx, vcpu_pvm for struct kvm_vcpu)."""
    out = []
    for name, (unit, t) in kbtf.structs.items():
        members = t.get("members") or []
        if name == struct or not members or members[0]["bits_offset"] != 0:
            continue
        mt = kbtf._resolve(members[0]["type_id"], unit)
        if mt and mt["kind"] == "STRUCT" and mt.get("name") == struct:
            out.append(name)
    return sorted(out)


class LockNamer:
    """Learns VM and vCPU bases, names lock addresses inside them."""

    def __init__(self, kbtf):
        self.vms = {}            # kvm base -> {"tgid", "how"}
        self.vcpus = {}          # vcpu base -> {"tgid", "kvm", "vcpu_idx", "how"}
        self.layout = {}         # struct -> (container, size)
        self.locks = {}          # struct -> {offset: lock path}: BTF is not kept
        for struct in ("kvm", "kvm_vcpu"):
            size = kbtf.size(struct) if kbtf else None
            if not size:
                continue
            conts = containers(kbtf, struct)
            # only one vendor's container can be in use; with several we cannot tell
            cont = conts[0] if len(conts) == 1 else struct
            self.layout[struct] = (cont, kbtf.size(cont))
            # paths inside the embedded struct drop the member that embeds it, whatever
            # its name (kvm_svm.kvm, but vcpu_svm.vcpu): `mutex`, not `vcpu.mutex`
            prefix = kbtf.structs[cont][1]["members"][0]["name"] + "." if cont != struct \
                else ""
            self.locks[struct] = {off: p[len(prefix):] if prefix and p.startswith(prefix)
                                  else p for off, p in kbtf.lock_offsets(cont).items()}
        self.mmu_lock = kbtf.offset("kvm", "mmu_lock") if kbtf else None

    # --- learning bases --------------------------------------------------------------

    def observe(self, vms=None, vcpus=None):
        """The function probes' registry tables (Arrow or pandas, may be None)."""
        if vms is not None and len(vms):
            df = vms.to_pandas() if hasattr(vms, "to_pandas") else vms
            for kvm, tgid in zip(df["kvm"].tolist(), df["tgid"].tolist()):
                self.vms[int(kvm)] = {"tgid": int(tgid), "how": "VM base observed: "
                                      "struct kvm * at kvm_vm_ioctl; fields from BTF"}
        if vcpus is not None and len(vcpus):
            df = vcpus.to_pandas() if hasattr(vcpus, "to_pandas") else vcpus
            for r in df.itertuples(index=False):
                self.vcpus[int(r.vcpu)] = {"tgid": int(r.tgid), "kvm": int(r.kvm),
                                           "vcpu_idx": int(r.vcpu_idx),
                                           "how": "vCPU base observed: struct kvm_vcpu * "
                                                  "at kvm_vcpu_ioctl; fields from BTF"}

    def infer(self, aggs, callers):
        """Infer VM bases from the contention aggregates (DataFrame: lock_addr, flags,
        stack_id, tgid, count) and {stack_id: caller frame}."""
        if self.mmu_lock is None or aggs is None or len(aggs) == 0:
            return
        rw = aggs[(aggs["flags"] & LCB_F_SPIN).astype(bool) &
                  (aggs["flags"] & (LCB_F_READ | LCB_F_WRITE)).astype(bool)]
        votes = {}
        for addr, sid, tgid, n in zip(rw["lock_addr"].tolist(), rw["stack_id"].tolist(),
                                      rw["tgid"].tolist(), rw["count"].tolist()):
            caller = callers.get(int(sid), "")
            if not MMU_CALLER.match(caller):
                continue
            v = votes.setdefault(int(addr) - self.mmu_lock, {"tgids": {}, "caller": caller})
            v["tgids"][int(tgid)] = v["tgids"].get(int(tgid), 0) + int(n)
        for base, v in votes.items():
            if base in self.vms and "observed" in self.vms[base]["how"]:
                continue
            owners = {t: n for t, n in v["tgids"].items() if t}
            tgid = max(owners, key=owners.get) if owners else 0
            self.vms[base] = {"tgid": tgid, "how": f"VM base inferred: an rwlock under "
                              f"{v['caller'].split('+')[0]} is kvm->mmu_lock "
                              f"(kvm + {self.mmu_lock}); fields from BTF"}

    # --- naming -------------------------------------------------------------------------

    def _inside(self, addr, bases, struct):
        if struct not in self.layout or not bases:
            return None
        keys = np.fromiter(bases, dtype=np.uint64)
        below = keys[keys <= np.uint64(addr)]
        if below.size == 0:
            return None
        base = int(below.max())
        if addr - base >= self.layout[struct][1]:
            return None
        path = self.locks[struct].get(addr - base)
        return (base, path) if path else None

    def name(self, addr):
        """(name, how) for a lock address inside a known VM or vCPU, else None."""
        hit = self._inside(addr, self.vcpus, "kvm_vcpu")
        if hit:
            base, path = hit
            v = self.vcpus[base]
            return f"kvm({v['tgid']})->vcpu{v['vcpu_idx']}->{path}", v["how"]
        hit = self._inside(addr, self.vms, "kvm")
        if hit:
            base, path = hit
            v = self.vms[base]
            return f"kvm({v['tgid']})->{path}", v["how"]
        return None

    def names(self, addrs):
        """{hex address: {"name", "how"}} for the addresses this can name."""
        out = {}
        for a in addrs:
            n = self.name(int(a))
            if n:
                out[f"{int(a):#x}"] = {"name": n[0], "how": n[1]}
        return out

    def manifest(self):
        """The bases and how each was learnt, for the recording."""
        return {"vms": {f"{b:#x}": v for b, v in self.vms.items()},
                "vcpus": {f"{b:#x}": v for b, v in self.vcpus.items()},
                "layout": {k: {"container": c, "size": s} for k, (c, s) in self.layout.items()}}


class SessionNames:
    """Names of a live session's lock addresses (`record` and `top`): kallsyms data
    symbols for static locks, LockNamer's for locks inside KVM objects."""

    def __init__(self, ksyms, kbtf):
        self.ksyms = ksyms
        self.namer = LockNamer(kbtf) if kbtf else None
        self.callers = {}        # contention stack id -> caller frame
        self.symbols = {}        # hex address -> kallsyms data symbol
        self.kvm = {}            # hex address -> {"name", "how"}

    def add_stacks(self, stacks):
        """New contention stacks (an Arrow table or DataFrame with stack_id, frames,
        lock_frame); no DataFrame is built: this runs at every flush that has some."""
        from .analysis import caller_frame
        cols = stacks.to_pydict() if hasattr(stacks, "to_pydict") else stacks
        for sid, frames, lockf in zip(cols["stack_id"], cols["frames"], cols["lock_frame"]):
            self.callers[int(sid)] = caller_frame(list(frames), lockf)

    def update(self, aggs, vms=None, vcpus=None):
        """Name the addresses in the aggregates (DataFrame) not named yet."""
        if aggs is None or aggs.empty:
            return
        addrs = np.unique(aggs["lock_addr"].to_numpy())
        fresh = [a for a in addrs.tolist() if f"{a:#x}" not in self.symbols]
        for a, n in zip(fresh, self.ksyms.data_symbols(fresh)):
            self.symbols[f"{a:#x}"] = n
        if self.namer:
            self.namer.observe(vms, vcpus)
            self.namer.infer(aggs, self.callers)
            self.kvm = self.namer.names(addrs)

    def display(self):
        """{hex address: name} for every address with a name."""
        out = {a: n for a, n in self.symbols.items() if n}
        out.update({a: v["name"] for a, v in self.kvm.items()})
        return out

    def manifest(self):
        return {"lock_symbols": {a: n for a, n in self.symbols.items() if n},
                "lock_names": self.kvm,
                "kvm_objects": self.namer.manifest() if self.namer else None}
