"""KVM-aware lock names: `kvm(1234)->mmu_lock` instead of an address.

Most KVM locks live in dynamically allocated objects (struct kvm and its arch
container, struct kvm_vcpu and its container), which kallsyms cannot name. With
the object's base address known, the running kernel's BTF names any lock inside
it by field path. Bases come from two places, and the recording says which:

- observed: a function probe saw the `struct kvm *` / `struct kvm_vcpu *` (the
  `vms` probe on kvm_vm_ioctl/kvm_vcpu_ioctl and at their creation; the VM/vCPU
  registry tables). The vms probe also sees them destroyed, and the kernel may
  then give the address to a new VM of another process: Registry keeps every
  lifetime, and a lock is named by the latest owner of its address;
- inferred: a contention whose lock is certain from its stack. On x86 (and
  arm64) the only rwlock the MMU code takes is kvm->mmu_lock, so an rwlock
  contended with a kvm_mmu_* / kvm_tdp_mmu_* caller sits at kvm + offsetof(mmu_lock).
"""
import bisect
import dataclasses
import re
import time

from kvmlockprof.lazy import np, pa
from kvmlockprof.locktypes import LCB_F_MUTEX, LCB_F_READ, LCB_F_SPIN, LCB_F_WRITE

# The function probes' registry snapshots (FunctionProbes.snapshots): the live VMs
# and vCPUs, and those whose end the vms probe saw.
REGISTRY_TABLES = ("vms", "vcpus", "vm_ends", "vcpu_ends")

# Callers whose rwlock can only be kvm->mmu_lock (x86 MMU, TDP MMU; arm64 stage-2 faults).
MMU_CALLER = re.compile(r"^(__)?(kvm_mmu_|kvm_tdp_mmu_|kvm_zap_|tdp_mmu_|user_mem_abort|"
                        r"kvm_handle_guest_abort|kvm_pgtable_stage2_)")


def containers(kbtf, struct):
    """Structs that embed `struct` as their first member (kvm_svm, kvm_vmx, kvm_pvm
    for struct kvm; vcpu_svm, vcpu_vmx, vcpu_pvm for struct kvm_vcpu)."""
    out = []
    for name, (unit, t) in kbtf.structs.items():
        members = t.get("members") or []
        # arm64's pkvm_hyp_vm/pkvm_hyp_vcpu embed them too, but are the EL2 hypervisor's
        # copies under protected KVM: the host's VMs are never inside one
        if name == struct or name.startswith("pkvm_hyp_") or not members or \
                members[0]["bits_offset"] != 0:
            continue
        mt = kbtf.resolve(members[0]["type_id"], unit)
        if mt and mt["kind"] == "STRUCT" and mt.get("name") == struct:
            out.append(name)
    return sorted(out)


def _records(table):
    """Rows of an Arrow table or DataFrame (None: none) as dicts."""
    if table is None or len(table) == 0:
        return []
    if hasattr(table, "to_pylist"):
        return table.to_pylist()
    return table.to_dict("records")


class Registry:
    """The VMs and vCPUs the function probes registered, one row per lifetime.

    The kernel keeps an entry per live object (kvmlp_vms, kvmlp_vcpus) and, when the
    vms probe sees the object destroyed, moves it with the time it ended to
    kvmlp_vm_ends / kvmlp_vcpu_ends. A lifetime is (address, first_ns): here each one
    seen in any snapshot is kept, with when the probes first saw it (first_ns,
    from the kernel), when it was last known alive (last_ns: the last snapshot that
    had it, or its end) and when it ended (end_ns; 0 if not seen ending). An
    address the kernel reused for a new VM has a row per owner. Times are
    CLOCK_MONOTONIC ns, as the samples' ts_ns."""

    KEY = {"vms": "kvm", "vcpus": "vcpu"}
    COLUMNS = {"vms": {"kvm": "uint64", "tgid": "uint32", "first_ns": "uint64",
                       "last_ns": "uint64", "end_ns": "uint64"},
               "vcpus": {"vcpu": "uint64", "kvm": "uint64", "tid": "uint32",
                         "tgid": "uint32", "vcpu_idx": "int32", "vcpu_id": "int32",
                         "first_ns": "uint64", "last_ns": "uint64",
                         "end_ns": "uint64"}}          # (Arrow types by name)
    OWNER = {"vms": ("tgid",), "vcpus": ("tgid", "kvm", "vcpu_idx")}   # what names use

    def __init__(self):
        self.rows = {"vms": {}, "vcpus": {}}     # kind -> {(address, first_ns): row}
        self.version = 0        # changes when a lifetime, or an owner that names use, does

    def observe(self, vms=None, vcpus=None, vm_ends=None, vcpu_ends=None, now_ns=None):
        """Snapshots of the live registry (seen alive at now_ns, by default now) and
        of the ended lifetimes (Arrow tables or DataFrames, any may be None)."""
        now = time.monotonic_ns() if now_ns is None else int(now_ns)
        for kind, live, ended in (("vms", vms, vm_ends), ("vcpus", vcpus, vcpu_ends)):
            for r in _records(live):
                self._merge(kind, r, now, 0)
            for r in _records(ended):
                self._merge(kind, r, int(r["end_ns"]), int(r["end_ns"]))

    def _merge(self, kind, r, seen_ns, end_ns):
        cols = self.COLUMNS[kind]
        # addresses as unsigned whatever the input's dtype (an int64 column wraps them)
        new = {c: int(r[c]) & ((1 << 64) - 1) if cols[c] == "uint64" else int(r[c])
               for c in cols if c in r and c not in ("last_ns", "end_ns")}
        key = (new[self.KEY[kind]], new.get("first_ns", 0))
        row = self.rows[kind].get(key)
        if row is None:
            row = {c: -1 if c in ("vcpu_idx", "vcpu_id") else 0 for c in cols}
            self.rows[kind][key] = row
            self.version += 1
        elif any(row[c] != new.get(c, row[c]) for c in self.OWNER[kind]):
            self.version += 1
        row.update(new)
        row["first_ns"] = key[1]
        if end_ns:
            row["end_ns"] = row["last_ns"] = end_ns
        elif not row["end_ns"]:
            row["last_ns"] = max(row["last_ns"], seen_ns)

    def lifetimes(self, kind):
        """{address: [rows, oldest first]}."""
        out = {}
        for (addr, _), row in sorted(self.rows[kind].items()):
            out.setdefault(addr, []).append(row)
        return out

    def tables(self):
        """{"vms", "vcpus"}: every lifetime as an Arrow table, by address and first_ns."""
        out = {}
        for kind, cols in self.COLUMNS.items():
            rows = [row for _, row in sorted(self.rows[kind].items())]
            out[kind] = pa.table({c: pa.array([r[c] for r in rows], pa.type_for_alias(t))
                                  for c, t in cols.items()})
        return out


OBSERVED = {"vms": "VM base observed: struct kvm * at kvm_vm_ioctl (or its creation); "
                   "fields from BTF",
            "vcpus": "vCPU base observed: struct kvm_vcpu * at kvm_vcpu_ioctl (or its "
                     "creation); fields from BTF"}


def _observed(kind, lives):
    """What names use of an address's lifetimes: its latest owner, and the others."""
    last = lives[-1]
    v = {"tgid": last["tgid"], "how": OBSERVED[kind], "first_ns": last["first_ns"],
         "last_ns": last["last_ns"], "end_ns": last["end_ns"]}
    if kind == "vcpus":
        v.update(kvm=last["kvm"], vcpu_idx=last["vcpu_idx"])
    if len(lives) > 1:
        pids = ", ".join(str(r["tgid"]) for r in lives)
        v["how"] += (f"; the address had {len(lives)} owners over time (pids {pids}, "
                     "oldest first): named by the latest")
        v["owners"] = [{c: r[c] for c in ("tgid", "first_ns", "last_ns", "end_ns")}
                       for r in lives]
    return v


def _columns(aggs):
    """Contention aggregates (a DataFrame or {column: array}) as {column: numpy
    array}, or {} when there are none."""
    if aggs is None or "lock_addr" not in aggs or not len(aggs["lock_addr"]):
        return {}
    return {c: np.asarray(aggs[c]) for c in ("lock_addr", "flags", "stack_id", "tgid", "count")
            if c in aggs}


class LockNamer:
    """Learns VM and vCPU bases, names lock addresses inside them."""

    def __init__(self, kbtf):
        self.registry = Registry()
        self.vms = {}            # kvm base -> {"tgid", "how"[, "first_ns", ..., "owners"]}
        self.vcpus = {}          # vcpu base -> {"tgid", "kvm", "vcpu_idx", "how"[, ...]}
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
            # SRCU structs too (kvm->srcu: lockorder follows its read sections); a
            # lock that starts at the same offset keeps the name
            offsets = {**kbtf.lock_offsets(cont, {"srcu_struct"}), **kbtf.lock_offsets(cont)}
            self.locks[struct] = {off: p[len(prefix):] if prefix and p.startswith(prefix)
                                  else p for off, p in offsets.items()}
        self.mmu_lock = kbtf.offset("kvm", "mmu_lock") if kbtf else None

    # --- learning bases --------------------------------------------------------------

    def observe(self, vms=None, vcpus=None, vm_ends=None, vcpu_ends=None, now_ns=None):
        """The function probes' registry tables (Arrow or pandas, may be None): see
        Registry.observe. A base's name is its latest owner's."""
        self.registry.observe(vms, vcpus, vm_ends, vcpu_ends, now_ns)
        for kind, known in (("vms", self.vms), ("vcpus", self.vcpus)):
            for base, lives in self.registry.lifetimes(kind).items():
                known[base] = _observed(kind, lives)

    def infer(self, aggs, callers):
        """Infer VM bases from the contention aggregates ({column: array}: lock_addr,
        flags, stack_id, tgid, count) and {stack_id: caller frame}."""
        aggs = _columns(aggs)
        if self.mmu_lock is None or not aggs:
            return
        fl = aggs["flags"]
        rw_rows = (fl & LCB_F_SPIN).astype(bool) & (fl & (LCB_F_READ | LCB_F_WRITE)).astype(bool)
        rw = {c: a[rw_rows] for c, a in aggs.items()}
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
        """(base, lock path) of the object holding `addr`: of those whose extent
        holds it (a destroyed VM's memory may hold part of a newer one), the one
        registered last."""
        if struct not in self.layout or not bases:
            return None
        keys = np.fromiter(bases, dtype=np.uint64)
        a = np.uint64(addr)
        holding = keys[keys <= a]
        holding = holding[a - holding < np.uint64(self.layout[struct][1])]
        if holding.size == 0:
            return None
        base = max(holding.tolist(), key=lambda b: (bases[b].get("first_ns", 0), b))
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


# Locks a caller tells by itself: functions of the core kernel that, at every spin or rw
# lock call of theirs that is not a run queue's (named by address, first), take one kind
# of lock (a lock with a sleeping wait is never named so).
# A class, not an instance: which bucket, zone or queue stays unsaid. (function regex,
# name); checked in the lab against kallsyms' names of the static ones.
CALLER_CLASSES = [(re.compile(r), n) for r, n in (
    (r"futex_(wake|wake_op|q_lock|requeue|unqueue|wait_setup|wait_multiple_setup|"
     r"do_wait)$", "futex_hash_bucket->lock"),
    (r"(free_pcppages_bulk|rmqueue_bulk|rmqueue_buddy|free_one_page)$", "zone->lock"),
    (r"folio_lruvec_(re)?lock(_irq|_irqsave)?$", "lruvec->lru_lock"),
    (r"(__)?pte_offset_map(_rw_nolock|_ro_nolock)?_lock$", "page table lock (ptl)"),
    (r"try_to_wake_up$", "task->pi_lock"),
    (r"(alloc_vmap_area|free_vmap_area_noflush|purge_vmap_node|__purge_vmap_area_lazy|"
     r"find_unlink_vmap_area|find_vmap_area)$", "vmap_area lock"),
    (r"(__wake_up_common_lock|__wake_up|prepare_to_wait(_event|_exclusive)?|finish_wait|"
     r"(add|remove)_wait_queue(_exclusive)?)$", "wait_queue_head->lock"),
    (r"(swake_up_(one|all|locked)|prepare_to_swait_(event|exclusive)|finish_swait)$",
     "swait_queue_head->lock"),
    (r"(__queue_work|worker_thread|process_one_work|try_to_grab_pending|"
     r"__flush_work|pwq_dec_nr_in_flight)$", "worker_pool->lock"),
    (r"(srcu_gp_start_if_needed|srcu_funnel_gp_start|srcu_gp_start|srcu_invoke_callbacks|"
     r"srcu_reschedule)$", "srcu_struct/srcu_data lock"),
    (r"(rcu_report_qs_rnp|rcu_report_qs_rdp|note_gp_changes|rcu_gp_init|rcu_gp_cleanup|"
     r"rcu_accelerate_cbs_unlocked|rcu_gp_fqs_loop|force_qs_rnp|rcu_start_this_gp|"
     r"rcu_core)$", "rcu_node->lock"),
    (r"(lock_timer_base|run_timer_softirq|__run_timers|__mod_timer|add_timer_on)$",
     "timer_base->lock"),
    (r"(eventfd_write|eventfd_read|eventfd_signal_mask)$", "eventfd_ctx->wqh.lock"),
    (r"tick_do_update_jiffies64$", "jiffies_lock"),
    (r"(alloc_fd|close_fd|file_close_fd|do_dup2|replace_fd)$", "files_struct->file_lock"))]


def _function(frame):
    """`name+0x1c/0x40 [module]` -> name."""
    return frame.split("+")[0].split()[0] if frame else ""


class KernelNamer:
    """Locks inside the kernel's own objects, which kallsyms cannot name (per-CPU,
    allocated and on-stack data), by the rule that tells each, in this order:
    - `rq(cpu N)->__lock`: each CPU's run queue, found once at the start by running
      on that CPU (ContentionProbe.run_queues), its lock at its BTF offset;
    - `mm(PID)->mmap_lock[.wait_lock]`: a waiter's own mm's lock (or the spinlock its
      waiters queue under), told by the waiter when its
      aggregate is made (ContentionProbe.lock_kinds); an address a new process's mm
      takes is named by its latest owner;
    - `on-stack(FUNCTION)@ADDR`: on the waiter's own kernel stack (told the same way),
      named by the caller of the wait that told it;
    - `futex_hash_bucket(PID)->lock@ADDR`: a bucket of the waiter's process's private
      futex hash (6.16+), told the same way;
    - `zone(Node N, TYPE)->lock`: a page allocator zone's, told by any waiter;
    - a class by the lock's callers (CALLER_CLASSES), when all its walked callers
      agree: `futex_hash_bucket->lock@ADDR`, `zone->lock@ADDR`, ...;
    - `&CACHE@ADDR`: in an object of that slab cache (ContentionProbe.slab_caches,
      asked once per address: `&task_struct@ADDR`, `&kmalloc-cg-2k@ADDR`).
    A name is one address's (`@ADDR` where the rule names a class, not an instance);
    its class (locktypes.lock_class) drops the instance."""

    def __init__(self, kbtf):
        self.rq_field = next((f for f in ("__lock", "lock")
                              if kbtf and kbtf.offset("rq", f) is not None), None)
        self.rq_off = kbtf.offset("rq", self.rq_field) if self.rq_field else None
        # the per-CPU variables ((offset, size, name, type id) by offset), the section's
        # size, and where locks start inside each (made now: the BTF is not kept)
        self._pv, self._pv_size = kbtf.percpu_vars() if hasattr(kbtf, "percpu_vars") \
            else ([], 0)
        self._pv_locks = {i: paths for i, (_, _, _, tid) in enumerate(self._pv)
                          if (paths := kbtf.lock_paths(tid))}
        self._offs = [o for o, _, _, _ in self._pv]
        self.percpu = {}        # cpu -> the address of its copy of the per-CPU section
        self._bases = []        # (base, cpu) sorted
        self.rq_addrs = set()
        self.zone_size = kbtf.size("zone") if kbtf else None
        self.zone_types = kbtf.enums.get("zone_type", {}) if kbtf else {}
        self.by_addr = {}       # lock address -> {"name", "how"}: rq and mm
        self.told = {}          # lock address -> (kind, id): the waiters'
        self.slabs = {}         # lock address -> its slab cache's name ("": none)
        self.rqs = 0            # run queues found

    def run_queues(self, rqs):
        """{cpu: struct rq address}."""
        if self.rq_off is None:
            return
        self.rqs += len(rqs)
        runqueues = next((o for o, _, n, _ in self._pv if n == "runqueues"), None)
        for cpu, rq in rqs.items():
            if runqueues is not None:
                self.percpu[cpu] = rq - runqueues
            self.rq_addrs.add(rq + self.rq_off)
            self.by_addr[rq + self.rq_off] = {
                "name": f"rq(cpu {cpu})->{self.rq_field}",
                "how": f"CPU {cpu}'s run queue (struct rq, found from a task running there: "
                       f"se.cfs_rq->rq); {self.rq_field} at +{self.rq_off} from BTF"}
        self._bases = sorted((b, c) for c, b in self.percpu.items())   # (percpu_lock's)

    def lock_kinds(self, kinds):
        """{lock address: (kind, id, the telling wait's stack id)} the waiters told."""
        for addr, (kind, ident, stack_id) in kinds.items():
            if kind == "mm":
                self.by_addr[addr] = {"name": f"mm({ident})->mmap_lock",
                                      "how": "the waiter's own mm_struct's mmap_lock "
                                             "(task->mm, BTF offsets)"}
            elif kind == "mm_wait_lock":
                self.by_addr[addr] = {"name": f"mm({ident})->mmap_lock.wait_lock",
                                      "how": "the spinlock inside the waiter's own mm's "
                                             "mmap_lock (rw_semaphore.wait_lock, BTF "
                                             "offsets)"}
            elif kind == "futex":
                self.by_addr[addr] = {"name": f"futex_hash_bucket({ident})->lock@{addr:x}",
                                      "how": "a bucket of the waiter's own process's private "
                                             "futex hash (mm->futex_phash's queues, BTF "
                                             "offsets)"}
            elif kind == "zone" and self.zone(ident):
                self.by_addr[addr] = self.zone(ident)
            else:
                self.by_addr.pop(addr, None)        # (a freed mm's address, reused)
                self.told[addr] = (kind, ident, stack_id)

    def percpu_lock(self, a):
        """{"name", "how"} of a lock inside a static per-CPU variable (`timer_bases(cpu
        1)[0].lock`), or None: each CPU's copy of the per-CPU section starts where its
        run queue, less runqueues' offset in it (BTF), does."""
        if not self.percpu:
            return None
        pv, size = self._pv, self._pv_size
        j = bisect.bisect_right(self._bases, (a, float("inf"))) - 1
        if j < 0 or a - self._bases[j][0] >= size:
            return None
        base, cpu = self._bases[j]
        i = bisect.bisect_right(self._offs, a - base) - 1
        if i < 0 or a - base >= self._offs[i] + pv[i][1]:
            return None
        off, _, var, _ = pv[i]
        path = self._pv_locks.get(i, {}).get(a - base - off)
        if path is None:
            return None
        return {"name": f"{var}(cpu {cpu}){path}",
                "how": f"in CPU {cpu}'s copy of the per-CPU variable {var} (BTF's per-CPU "
                       f"section, that CPU's copy placed by its run queue)"}

    def retain(self, addrs):
        """Forget what was told of addresses not in `addrs` (the exporter: those of
        processes gone, whose aggregates it deleted): a reused address is told again by
        its new waiters; the run queues stay."""
        keep = set(addrs) | self.rq_addrs
        self.by_addr = {a: v for a, v in self.by_addr.items() if a in keep}
        self.told = {a: v for a, v in self.told.items() if a in keep}
        self.slabs = {a: v for a, v in self.slabs.items() if a in keep}

    def zone(self, ident):
        """A zone lock's {"name", "how"} from its waiter's (node << 16 | byte offset of
        the zone in its node's node_zones), or None: its type is the offset over
        sizeof(struct zone), named as /proc/zoneinfo names it (zone_type ZONE_NORMAL
        -> Normal, ZONE_DMA32 -> DMA32)."""
        node, off = ident >> 16, ident & 0xffff
        if not self.zone_size or off % self.zone_size:
            return None
        t = self.zone_types.get(off // self.zone_size, "")
        if not t.startswith("ZONE_"):
            return None
        t = t.removeprefix("ZONE_")
        t = {"HIGHMEM": "HighMem"}.get(t, t if t.startswith("DMA") else t.capitalize())
        return {"name": f"zone(Node {node}, {t})->lock",
                "how": f"a page allocator zone's lock: its zone's zone_pgdat (node {node}) "
                       f"holds it as node_zones[{off // self.zone_size}] (BTF offsets, "
                       "enum zone_type), read by its waiter"}

    def names(self, addrs, callers=None, stack_callers=None, sleeping=()):
        """{hex address: {"name", "how"}} of these addresses this can name; callers:
        {address: [the functions its walked waits were called from]}; stack_callers:
        {stack id: caller}; sleeping: addresses with a mutex or rwsem wait."""
        out = {}
        for a in map(int, addrs):
            if a in self.by_addr:
                out[f"{a:#x}"] = self.by_addr[a]
                continue
            pc = self.percpu_lock(a)
            if pc:
                out[f"{a:#x}"] = pc
                continue
            kind, ident, sid = self.told.get(a, (None, None, None))
            fn = _function((stack_callers or {}).get(sid, ""))
            if kind == "stack" and fn:
                out[f"{a:#x}"] = {"name": f"on-stack({fn})@{a:x}",
                                  "how": f"on the kernel stack of its waiter (tid {ident}), "
                                         f"in the frame of {fn} or a caller of it"}
                continue
            fns = sorted({_function(c) for c in (callers or {}).get(a, ())} - {""})
            slab = self.slabs.get(a)
            classes = {next((n for r, n in CALLER_CLASSES if r.match(f)), None)
                       for f in fns} if fns and a not in sleeping else set()
            if classes == {"task->pi_lock"} and not self.rqs and slab != "task_struct":
                classes = set()     # (try_to_wake_up's other lock: a run queue's, unnamed)
            in_slab = f"in an object of the slab cache {slab} (bpf_get_kmem_cache, " \
                      "asked when the session first saw the lock)"
            if len(classes) == 1 and None not in classes:
                out[f"{a:#x}"] = {"name": f"{classes.pop()}@{a:x}",
                                  "how": f"by its callers ({', '.join(fns)}): the one kind "
                                         "of lock they take" + (f"; {in_slab}" if slab else "")}
            elif slab:
                out[f"{a:#x}"] = {"name": f"&{slab}@{a:x}", "how": in_slab}
        return out

    def slab_caches(self, caches):
        """{lock address: its slab cache's name, "" where it is in no slab object}."""
        self.slabs.update(caches)


@dataclasses.dataclass
class Namers:
    """What lock names take from the kernel's BTF, made once: the kernel's namer and
    KVM's (None without BTF), and why the BTF is missing (None when it is not)."""
    kernel: KernelNamer
    kvm: object = None
    btf_error: str = None

    @classmethod
    def of(cls, kbtf, btf_error=None):
        return cls(KernelNamer(kbtf), LockNamer(kbtf) if kbtf else None, btf_error)


class SessionNames:
    """Names of a live session's lock addresses (`record` and `top`): kallsyms data
    symbols for static locks, LockNamer's for locks inside KVM objects, KernelNamer's
    for run queues and mm locks."""

    def __init__(self, ksyms, kbtf=None, namers=None):
        """kbtf: the running kernel's Btf (None: none); namers: what it gives the
        names, made before (Namers: in the loader child, so that this process never
        reads the BTF) in its place."""
        self.ksyms = ksyms
        namers = namers or Namers.of(kbtf)
        self.kernel_namer = namers.kernel
        self.kernel = {}         # hex address -> {"name", "how"}: KernelNamer's
        self.namer = namers.kvm
        self.registry = self.namer.registry if self.namer else Registry()
        self.callers = {}        # contention stack id -> caller frame
        self.symbols = {}        # hex address -> kallsyms data symbol
        self.kvm = {}            # hex address -> {"name", "how"}
        self.more = {}           # the same, of other probes' lock addresses (name_more)
        # {address: slab cache name} asked of the kernel (ContentionProbe.slab_caches),
        # once per address; None: not asked
        self.slab_lookup = None
        self.slab_error = None          # why the kernel stopped answering, if it did

    def add_stacks(self, stacks):
        """New contention stacks (an Arrow table or DataFrame with stack_id, frames,
        lock_frame); no DataFrame is built: this runs at every flush that has some."""
        from kvmlockprof.analysis.locks import caller_frame
        cols = stacks.to_pydict() if hasattr(stacks, "to_pydict") else stacks
        for sid, frames, lockf in zip(cols["stack_id"], cols["frames"], cols["lock_frame"]):
            self.callers[int(sid)] = caller_frame(list(frames), lockf)

    def observe(self, vms=None, vcpus=None, vm_ends=None, vcpu_ends=None, now_ns=None):
        """The function probes' registry snapshots (REGISTRY_TABLES): lifetimes kept in
        self.registry, bases learnt for the names."""
        if self.namer:
            self.namer.observe(vms, vcpus, vm_ends, vcpu_ends, now_ns)
        else:
            self.registry.observe(vms, vcpus, vm_ends, vcpu_ends, now_ns)

    def update(self, aggs, vms=None, vcpus=None, vm_ends=None, vcpu_ends=None):
        """Learn from the registry snapshots given, then name the addresses in the
        aggregates not named yet (a DataFrame, or {column: array}: `record` has no
        pandas; the columns are recorder.NAMING_COLUMNS)."""
        if any(t is not None for t in (vms, vcpus, vm_ends, vcpu_ends)):
            self.observe(vms, vcpus, vm_ends, vcpu_ends)
        aggs = _columns(aggs)
        if not aggs:
            return
        addrs = np.unique(aggs["lock_addr"])
        fresh = [a for a in addrs.tolist() if f"{a:#x}" not in self.symbols]
        for a, n in zip(fresh, self.ksyms.data_symbols(fresh)):
            self.symbols[f"{a:#x}"] = n
        callers, sleeping = {}, set()
        for a, sid, fl in zip(aggs["lock_addr"].tolist(), aggs["stack_id"].tolist(),
                              aggs["flags"].tolist()):
            if not fl & LCB_F_SPIN or fl & LCB_F_MUTEX:
                sleeping.add(int(a))
            if int(sid) in self.callers:
                callers.setdefault(int(a), set()).add(self.callers[int(sid)])
        # a data symbol (kallsyms) names a static lock better than any rule here
        unnamed = [a for a in addrs.tolist() if not self.symbols.get(f"{a:#x}")]
        ask = [a for a in unnamed if a not in self.kernel_namer.slabs]
        if ask and self.slab_lookup:
            try:
                found = self.slab_lookup(ask)
            except OSError as e:            # (naming only: say why, ask no more)
                found, self.slab_lookup, self.slab_error = {}, None, str(e)
            self.kernel_namer.slab_caches({a: found.get(a, "") for a in ask})
        self.kernel = self.kernel_namer.names(unnamed, callers, self.callers, sleeping)
        if self.namer:
            self.namer.infer(aggs, self.callers)
            self.kvm = self.namer.names(addrs)

    def retain(self, addrs):
        """Keep only what concerns these addresses (the live aggregates'): a session of
        months does not grow with every lock address it ever saw."""
        keep = {f"{int(a):#x}" for a in addrs}
        self.symbols = {a: n for a, n in self.symbols.items() if a in keep}
        self.kernel_namer.retain({int(a) for a in addrs})

    def name_more(self, addrs):
        """Name lock addresses other probes saw (not contended ones), as update does."""
        if self.namer:
            self.more = self.namer.names(sorted(addrs))

    def display(self):
        """{hex address: name} for every address with a name."""
        out = {a: n for a, n in self.symbols.items() if n}
        out.update({a: v["name"] for a, v in {**self.kernel, **self.more, **self.kvm}.items()})
        return out

    def manifest(self):
        out = {"lock_symbols": {a: n for a, n in self.symbols.items() if n},
                "lock_names": {**self.kernel, **self.more, **self.kvm},
                "kvm_objects": self.namer.manifest() if self.namer else None}
        if self.slab_error:
            out["slab_names_error"] = self.slab_error
        return out
