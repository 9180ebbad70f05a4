"""lockorder: lock order, IRQ context and recursion of KVM's own locks, on a
production kernel without lockdep (bpf/lockorder.bpf.c).

Every lock and unlock entry point is probed; only locks inside a watched KVM object
(a struct kvm or kvm_vcpu, watched from its first ioctl) are followed. Per lock
class (the lock's place in its object: `kvm->slots_lock`,
`vcpu->arch.xen.vcpu_info_cache.lock`, `kvm->srcu`), the report lists the order
edges seen (held -> acquired), the contexts of each acquisition, and what lockdep
would flag: inversions (A -> B and B -> A, where each can wait for the other),
IRQ-safety conflicts (a lock taken in hardirq or softirq context and elsewhere held
with that enabled), recursion (a task taking a lock it holds), a lock still held as
its task returns to user space or exits, and edges against the orders
Documentation/virt/kvm/locking.rst states; and how long each lock was held, by
where it was taken (`kvm->mmu_lock` taken for write by kvm_mmu_zap_all_fast: its
hold times), beside the waits on it.
It sees only watched locks and only the paths the workload ran; trylocks are not
followed. A debugging probe: every lock operation of the host pays for its filter
(bench/README.md "lockorder cost")."""
import dataclasses

from kvmlockprof import cdefs, options
from kvmlockprof.lazy import np, pd
from kvmlockprof.options import knob
from kvmlockprof.locktypes import lock_class
from kvmlockprof.probe import FENTRY, KPROBE, Probe, Section, Target
from kvmlockprof.probes.common import CONTEXTS, IRQS, call_chains, callers
from kvmlockprof.quantiles import hist_quantile

KINDS = cdefs.labels("lockorder.bpf.c", "lo_kind", {
    "LO_SPIN": "spin", "LO_READ": "read", "LO_WRITE": "write", "LO_MUTEX": "mutex",
    "LO_RWSEM_READ": "rwsem read", "LO_RWSEM_WRITE": "rwsem write",
    "LO_SRCU_READ": "srcu read", "LO_SRCU_SYNC": "srcu sync",
    "LO_READ_RECURSIVE": "recursive read"})
EVENTS = cdefs.labels("lockorder.bpf.c", "lo_event", {
    "LO_EV_RECURSION": "recursion", "LO_EV_HELD_TO_USER": "held at return to user space",
    "LO_EV_HELD_AT_EXIT": "held at exit"})
READERS = {"read", "recursive read", "rwsem read", "srcu read"}
RECURSIVE = {"recursive read", "srcu read"}     # lockdep's read=2: no waiting writer stops one
IRQ_CONTEXTS = {"softirq", "hardirq", "nmi", "irq"}

# (key in the C, kernel symbol, parameter): keys are short (bpf/lockorder.bpf.c says
# how they are spelled) and grouped by the kind of lock their unlocks release.
_RAW = {"S": "spin", "R": "read", "W": "write"}
_VARIANTS = (("", ""), ("B", "_bh"), ("I", "_irq"))
ENTRY_POINTS = {}
for _k, _name in _RAW.items():
    ENTRY_POINTS[_name] = (
        [(f"LOL{_k}{v}", f"_raw_{_name}_lock{suffix}", "lock") for v, suffix in _VARIANTS] +
        [(f"LOL{_k}F", f"_raw_{_name}_lock_irqsave", "lock")],
        [(f"LOU{_k}{v}", f"_raw_{_name}_unlock{suffix}", "lock") for v, suffix in _VARIANTS] +
        [(f"LOU{_k}F", f"_raw_{_name}_unlock_irqrestore", "lock")])
ENTRY_POINTS["mutex"] = ([("LOLM", "mutex_lock", "lock"),
                          ("LOLMT", "mutex_lock_interruptible", "lock"),
                          ("LOLMK", "mutex_lock_killable", "lock")],
                         [("LOUM", "mutex_unlock", "lock")])
ENTRY_POINTS["rwsem"] = ([("LOLD", "down_read", "sem"), ("LOLDK", "down_read_killable", "sem"),
                          ("LOLE", "down_write", "sem"), ("LOLEK", "down_write_killable", "sem")],
                         [("LOUD", "up_read", "sem"), ("LOUE", "up_write", "sem")])
ENTRY_POINTS["srcu"] = ([("LOLC", "__srcu_read_lock", "ssp")],
                        [("LOUC", "__srcu_read_unlock", "ssp")])
# a grace-period wait: ordered after the locks held, released at once (no unlock)
ENTRY_POINTS["srcu sync"] = ([("LOLY", "synchronize_srcu", "ssp"),
                              ("LOLYE", "synchronize_srcu_expedited", "ssp")], [])
LOCK_SYMBOLS = {s for acq, rel in ENTRY_POINTS.values() for _, s, _ in acq + rel}

# `record --srcu-at FN,...`: at each function's entry, which kvm->srcu read section is
# held. Four slots (LOAT0-3 in the C); without the option, slot 0 watches the
# function that "may or may not hold SRCU" (kvm_lapic_set_base's callee before 6.2).
SRCU_AT_SLOTS = 4
SRCU_AT_DEFAULT = ("kvm_vcpu_update_apicv",)


@dataclasses.dataclass(frozen=True)
class LockorderOptions:
    """The probe's own options (its plan's and prepare's)."""
    srcu_at: tuple = knob(None, "--srcu-at", csv=True, metavar="FN,...",
                          help="With the lockorder probe: at the entry of these kernel "
                               "functions (at most 4), is a kvm->srcu read section held? "
                               "[default: kvm_vcpu_update_apicv]")
    watch: tuple = knob((), "--watch", multiple=True, metavar="MODULE|SYMBOL|ADDR:SIZE",
                        help="With the lockorder probe: follow these locks too (a loaded "
                             "module's data, a variable, or a range), beside KVM's "
                             "objects; repeatable.")
    # the --watch specs resolved (resolve_watch): done before anything is loaded
    regions: tuple = knob(())

    def __post_init__(self):
        options.check(self)
        if self.srcu_at is not None and len(self.srcu_at) > SRCU_AT_SLOTS:
            raise options.OptionError(f"--srcu-at takes at most {SRCU_AT_SLOTS} functions")

    @property
    def srcu_at_functions(self):
        """The --srcu-at functions, the default's without the option."""
        return tuple(SRCU_AT_DEFAULT if self.srcu_at is None else self.srcu_at)

    def resolved(self, kallsyms="/proc/kallsyms"):
        """These options with --watch resolved (WatchError if it cannot be)."""
        return dataclasses.replace(self, regions=tuple(resolve_watch(self.watch, kallsyms)))


# Lockdep kernels (CONFIG_DEBUG_LOCK_ALLOC) route these through their _nested twins
# (mutex_lock is a macro for mutex_lock_nested(lock, 0)): the same kinds, other symbols.
ENTRY_POINTS["nested"] = ([("LOLSN", "_raw_spin_lock_nested", "lock"),
                           ("LOLSFN", "_raw_spin_lock_irqsave_nested", "lock"),
                           ("LOLMN", "mutex_lock_nested", "lock"),
                           ("LOLMTN", "mutex_lock_interruptible_nested", "lock"),
                           ("LOLMKN", "mutex_lock_killable_nested", "lock"),
                           ("LOLDN", "down_read_nested", "sem"),
                           ("LOLDKN", "down_read_killable_nested", "sem"),
                           ("LOLEN", "down_write_nested", "sem"),
                           ("LOLEKN", "down_write_killable_nested", "sem")], [])
LOCK_SYMBOLS = {s for acq, rel in ENTRY_POINTS.values() for _, s, _ in acq + rel}


# Acquisitions that can fail (a signal): their return handler drops what they pushed.
MAY_FAIL = {"LOLMT", "LOLMK", "LOLMTN", "LOLMKN", "LOLDK", "LOLDKN", "LOLEK", "LOLEKN"}


def _targets():
    out = []
    for acq, rel in ENTRY_POINTS.values():
        for key, sym, param in acq + rel:
            # kprobe first: only its saved flags say whether IRQs were on
            sig = (param, "subclass") if sym.endswith("_nested") else (param,)
            out.append(Target(key, (sym,), (KPROBE, FENTRY), (param,), {sym: sig},
                              optional=True, ret=key in MAY_FAIL))
    _filp = {"kvm_vm_ioctl": ("filp", "ioctl", "arg"), "kvm_vcpu_ioctl": ("filp", "ioctl", "arg")}
    out += [Target("LOVM", ("kvm_vm_ioctl",), (KPROBE, FENTRY), ("filp",), _filp),
            Target("LOVC", ("kvm_vcpu_ioctl",), (KPROBE, FENTRY), ("filp",), _filp)]
    out += [Target(f"LOAT{i}", (SRCU_AT_DEFAULT[i] if i < len(SRCU_AT_DEFAULT) else
                               f"kvmlp_srcu_at_{i}",), (KPROBE, FENTRY), optional=True,
                   why_limited="a slot for a function named by --srcu-at")
            for i in range(SRCU_AT_SLOTS)]
    return tuple(out)


def _srcu_at_method(sym, caps):
    if caps.ok("kprobe attach"):
        return KPROBE
    if caps.ok("fentry load (trial)") and not caps.symbols.get(sym):   # vmlinux only
        return FENTRY
    return None


def adjust_plan(plan, caps=None):
    """A kind of lock whose unlocks cannot all be probed here (an unlock the kernel
    inlined, as arm64's spin unlocks) would leave phantom held locks: its unlocks are
    left off and the C does not push it (lo_followed). The --srcu-at slots get their
    functions (plan.options: LockorderOptions)."""
    if caps is not None:
        at = (plan.options or LockorderOptions()).srcu_at_functions
        for i in range(SRCU_AT_SLOTS):
            sym = at[i] if i < len(at) else None
            if sym and sym not in caps.symbols and f"__{sym}" in caps.symbols:
                # inlined into its callers here (6.12: kvm_vcpu_update_apicv): its body
                plan.off[f"srcu-at {sym}"] = f"--srcu-at: {sym} is inlined here: at __{sym}"
                sym = f"__{sym}"
            elif sym and sym not in caps.symbols:
                plan.off[f"srcu-at {sym}"] = f"--srcu-at: no function {sym} in this kernel"
                sym = None
            plan.targets[f"LOAT{i}"] = (sym, _srcu_at_method(sym, caps)) if sym else \
                (None, None)
    for kind, (acq, rel) in ENTRY_POINTS.items():
        missing = [sym for key, sym, _ in rel if not plan.targets.get(key, (None, None))[1]]
        if missing:             # the C follows a kind only with all its unlocks
            for key, sym, _ in rel:
                plan.targets[key] = (plan.targets.get(key, (sym, None))[0], None)
            plan.off[kind] = (f"{', '.join(missing)} not probeable here (inlined): {kind} "
                              f"locks give contexts and edges into them, but are not "
                              f"followed as held (no edges out of them, no recursion)")


def defines(kbtf):
    """The watched objects' sizes: the arch's containers of struct kvm / kvm_vcpu."""
    from kvmlockprof.recording.locknames import containers
    out = {}
    for struct, name in (("kvm", "KVMLP_LO_KVM_SIZE"), ("kvm_vcpu", "KVMLP_LO_VCPU_SIZE")):
        size = kbtf.size(struct) if kbtf else None
        conts = containers(kbtf, struct) if size else []
        out[name] = max([size or 0] + [kbtf.size(c) or 0 for c in conts])
    return out


# --- record --watch: locks outside KVM's objects ----------------------------------------

PAGE = 1 << cdefs.define("lockorder.bpf.c", "LO_PAGE_SHIFT")
WATCH_MAX = cdefs.define("lockorder.bpf.c", "LO_MAX_PAGES") * PAGE
LO_DEPTH = cdefs.define("lockorder.bpf.c", "LO_DEPTH")
LO_OBJ_WATCH = cdefs.define("lockorder.bpf.c", "LO_OBJ_WATCH")
DATA_TYPES = set("dDbBrR")      # kallsyms' data, bss and read-only data symbols
LAST_SYMBOL_BYTES = 256         # what a module's last data symbol may span


class WatchError(ValueError):
    pass


def _kallsyms(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mod = parts[3].strip("[]") if len(parts) > 3 else ""
                    out.append((int(parts[0], 16), parts[1], parts[2], mod))
    except OSError as e:
        raise WatchError(f"--watch: cannot read {path}: {e.strerror}") from e
    if out and not any(a for a, *_ in out):
        raise WatchError("--watch: /proc/kallsyms shows no addresses: run as root")
    return sorted(out)


def resolve_watch(specs, kallsyms="/proc/kallsyms"):
    """`record --watch` specs to [{spec, base, size, symbols: {address: name}}]: a
    loaded module (MODULE: its data and bss symbols), a variable (SYMBOL: to the next
    symbol; vmlinux's need CONFIG_KALLSYMS_ALL) or ADDR:SIZE. At most WATCH_MAX bytes
    each (the pages one watched object may span in the C)."""
    if not specs:
        return []
    syms = _kallsyms(kallsyms)
    out = []
    for spec in specs:
        spec = spec.strip()
        if ":" in spec:
            a, _, n = spec.partition(":")
            try:
                base, size = int(a, 16), int(n, 0)
            except ValueError:
                raise WatchError(f"--watch {spec}: ADDR:SIZE wants hex:int") from None
            named = {}
        elif any(m == spec for _, _, _, m in syms):
            data = sorted((a, name) for a, t, name, m in syms if m == spec and t in DATA_TYPES)
            if not data:
                raise WatchError(f"--watch {spec}: the module has no data symbols")
            # a module's data, bss, rodata and ro_after_init may be allocated apart
            # (megabytes between them, as the allocator chose): a region each
            for part in _clusters(data):
                out.append(_region(spec, part[0][0], part[-1][0] + LAST_SYMBOL_BYTES -
                                   part[0][0], dict(part)))
            continue
        else:
            at = [i for i, (_, t, name, _) in enumerate(syms) if name == spec and t in DATA_TYPES]
            if not at:
                raise WatchError(f"--watch {spec}: no such module or data symbol in "
                                 f"/proc/kallsyms (data symbols need CONFIG_KALLSYMS_ALL; "
                                 f"a module must be loaded)")
            i = at[0]
            base = syms[i][0]
            nxt = next((a for a, *_ in syms[i + 1:] if a > base), base + LAST_SYMBOL_BYTES)
            size, named = nxt - base, {base: spec}
        out.append(_region(spec, base, size, named))
    return out


def _clusters(data):
    """(address, name) sorted, split where a gap is wider than a watched region."""
    parts = [[data[0]]]
    for prev, cur in zip(data, data[1:]):
        if cur[0] - prev[0] > WATCH_MAX:
            parts.append([])
        parts[-1].append(cur)
    return parts


def _region(spec, base, size, named):
    if not 0 < size <= WATCH_MAX:
        raise WatchError(f"--watch {spec}: {size} bytes; at most {WATCH_MAX} "
                         f"(name the variables instead)")
    return {"spec": spec, "base": base, "size": size,
            "symbols": {f"{a:x}": n for a, n in named.items()}}


def prepare(bpf, opts):
    """Before attaching: the --watch regions into lo_pages, as the C's lo_watch()
    puts a KVM object (slot 0: an object begun before the page, slot 1: in it)."""
    opts = opts or LockorderOptions()
    watched = opts.regions
    out = {"srcu_at": list(opts.srcu_at_functions)}
    if not watched:
        return out
    pages = bpf["lo_pages"]
    for w in watched:
        base, size = w["base"], w["size"]
        for page in range(base // PAGE, (base + size - 1) // PAGE + 1):
            k = pages.Key(page)
            v = pages.get(k) or pages.Leaf()
            slot = 0 if base // PAGE < page else 1
            v.base[slot], v.size[slot], v.kind[slot] = base, size, LO_OBJ_WATCH
            pages[k] = v
    return dict(out, watch=[dict(w, base=f"{w['base']:x}") for w in watched])


# --- naming ---------------------------------------------------------------------------

def _objects(rec):
    """[(base, size, "kvm"/"vcpu")] of the recording's VMs and vCPUs."""
    ko = rec.manifest.get("kvm_objects") or {}
    layout = ko.get("layout") or {}
    out = []
    for kind, struct in (("vcpus", "kvm_vcpu"), ("vms", "kvm")):
        size = (layout.get(struct) or {}).get("size")
        if size:
            out += [(int(b, 16), size, "vcpu" if kind == "vcpus" else "kvm")
                    for b in (ko.get(kind) or {})]
    return out


def _watched(rec):
    """The --watch regions [(base, size)] and their symbols [(address, name)], sorted."""
    st = (rec.manifest.get("probes") or {}).get("lockorder") or {}
    ws = st.get("watch") or ()
    return ([(int(w["base"], 16), w["size"]) for w in ws],
            sorted((int(a, 16), n) for w in ws for a, n in w["symbols"].items()))


def class_names(rec, addrs):
    """{address: lock class} for watched lock addresses: the recorded lock name
    without its process, a --watch symbol (+offset), else the object and offset (a
    lock BTF does not name)."""
    names = {int(a, 16): v["name"] for a, v in (rec.manifest.get("lock_names") or {}).items()}
    objs = _objects(rec)
    regions, wsyms = _watched(rec)
    out = {}
    for a in set(int(x) for x in addrs):
        if a in names:
            out[a] = lock_class(names[a])
            continue
        sym = next(((b, n) for b, n in reversed(wsyms) if b <= a), None)
        if sym and any(b <= a < b + s for b, s in regions):
            out[a] = sym[1] if a == sym[0] else f"{sym[1]}+{a - sym[0]:#x}"
            continue
        hit = next(((b, k) for b, s, k in objs if b <= a < b + s), None)
        out[a] = f"{hit[1]}->+{a - hit[0]:#x}" if hit else f"{a:#x}"
    return out


# --- analyses: DataFrames in, DataFrames out ---------------------------------------------

def _skip():
    return LOCK_SYMBOLS | {"srcu_read_lock", "srcu_read_unlock"}


def _kind(k):
    return KINDS.get(int(k), f"kind {k}")


def edges(rec):
    """Order edges between lock classes, one a pair of kinds (as lockdep keeps a
    dependency per read/write type): held -> acquired, count, the VMs it was seen in,
    and the caller of its first acquisition."""
    df = rec.table("lockorder_edges")
    if df.empty:
        return df
    cls = class_names(rec, pd.concat([df["held"], df["acquired"]]))
    df = df.assign(held_class=df["held"].map(cls), acquired_class=df["acquired"].map(cls),
                   held_kind=df["held_kind"].map(_kind),
                   acquired_kind=df["acquired_kind"].map(_kind),
                   caller=callers(rec, df["stack_id"], skip=_skip()))
    g = df.sort_values("count", ascending=False).groupby(
        ["held_class", "acquired_class", "held_kind", "acquired_kind"])
    out = pd.DataFrame({"count": g["count"].sum(), "objects": g["held"].nunique(),
                        "first_caller": g["caller"].first()}).reset_index()
    return out.sort_values("count", ascending=False, ignore_index=True)


def _pairs(e):
    """`edges` summed per pair of classes (held -> acquired, count)."""
    return e.groupby(["held_class", "acquired_class"], as_index=False, sort=False)[
        "count"].sum().sort_values("count", ascending=False, ignore_index=True)


def contexts(rec):
    """Per lock class: acquisitions by context, IRQs at the call and while held (an
    _irqsave entry point turns them off), softirqs while held (a _bh entry point
    turns them off; "unknown" where the kernel keeps that per CPU, and in recordings
    made before it was recorded), and the class it was taken under ("" when no
    watched lock was held)."""
    df = rec.table("lockorder_acqs")
    if df.empty:
        return df
    cls = class_names(rec, pd.concat([df["addr"], df["outer"][df["outer"] != 0]]))
    softirqs = df["softirqs"].map(IRQS) if "softirqs" in df else "unknown"
    df = df.assign(lock_class=df["addr"].map(cls), kind=df["kind"].map(_kind),
                   context=df["context"].map(CONTEXTS), irqs=df["irqs"].map(IRQS),
                   irqs_at_call=df["irqs_at_call"].map(IRQS), softirqs=softirqs,
                   under=df["outer"].map(lambda a: cls.get(int(a), "") if a else ""),
                   caller=callers(rec, df["stack_id"], skip=_skip()))
    g = df.sort_values("count", ascending=False).groupby(
        ["lock_class", "kind", "context", "irqs_at_call", "irqs", "softirqs", "under"])
    out = pd.DataFrame({"count": g["count"].sum(), "first_caller": g["caller"].first()})
    return out.reset_index().sort_values(["lock_class", "count"], ascending=[True, False],
                                         ignore_index=True)


def holds(rec):
    """Per lock class, kind and where it was taken (the caller): how long it was held,
    from its taking (the end of its wait where it waited) to its unlock's entry
    (in-kernel log2 histograms: p50/p99 are bucket upper bounds); SRCU read sections
    are the srcu probe's. waits_caused, wait_ns_caused: the waits on its lock that
    began while it held it exclusively (a row of kind "no exclusive holder" for the
    others). Beside each row, the waits on its whole class that the
    contention probe timed in the same recording (where it ran; of the recorded
    processes, while the holds are every task's): what the class's holds cost its
    waiters, the same on each row of a class."""
    df = rec.table("lockorder_holds")
    if df.empty:
        return df
    cls = class_names(rec, df["addr"])
    df = df.assign(lock_class=df["addr"].map(cls), kind=df["kind"].map(_kind),
                   caller=callers(rec, df["stack_id"], skip=_skip()))
    rows = []
    for (c, kind, caller), g in df.groupby(["lock_class", "kind", "caller"]):
        hist = np.sum(np.stack(g["hist"].to_numpy()), axis=0)
        n, total = int(g["count"].sum()), int(g["total_ns"].sum())
        rows.append({"lock_class": c, "kind": kind, "caller": caller, "count": n,
                     "total_ns": total, "mean_ns": total / n if n else np.nan,
                     "p50_ns_bound": hist_quantile(hist, 0.5),
                     "p99_ns_bound": hist_quantile(hist, 0.99), "max_ns": int(g["max_ns"].max())})
    out = pd.DataFrame(rows)
    out = _with_waits_caused(rec, out)
    waits = _waits_by_class(rec, cls)
    out = out.assign(class_waits=out["lock_class"].map(lambda c: waits.get(c, (0, 0))[0]),
                     class_wait_ns=out["lock_class"].map(lambda c: waits.get(c, (0, 0))[1]))
    return out.sort_values(["lock_class", "total_ns"], ascending=[True, False],
                           ignore_index=True)


NO_HOLDER = cdefs.define("lockorder.bpf.c", "LO_NO_HOLDER")


def _with_waits_caused(rec, out):
    """The hold rows with the waits on their lock that began while they held it
    exclusively (waits_caused, wait_ns_caused: lockorder_caused, the BPF's join), and
    a row per class for the waits no exclusive holder was seen for (kind "no
    exclusive holder": readers held it, or it was taken where the probe cannot see)."""
    c = rec.table("lockorder_caused")
    if c.empty:
        return out.assign(waits_caused=0, wait_ns_caused=0)
    cls = class_names(rec, c["addr"])
    c = c.assign(lock_class=c["addr"].map(cls),
                 kind=c["kind"].map(lambda k: "no exclusive holder" if k == NO_HOLDER
                                    else _kind(k)),
                 caller=callers(rec, c["stack_id"], skip=_skip()))  # (none's: -1)
    g = c.groupby(["lock_class", "kind", "caller"])[["count", "total_ns"]].sum() \
        .rename(columns={"count": "waits_caused", "total_ns": "wait_ns_caused"}).reset_index()
    out = out.merge(g, on=["lock_class", "kind", "caller"], how="outer") \
        .fillna({"count": 0, "total_ns": 0, "waits_caused": 0, "wait_ns_caused": 0})
    return out.astype({k: "int64" for k in ("count", "total_ns", "waits_caused",
                                             "wait_ns_caused")})


def _waits_by_class(rec, cls):
    """{lock class: (waits, total wait ns)} of the contention probe's waits on the
    held locks' addresses."""
    a = rec.table("aggregates", columns=("lock_addr", "count", "total_ns"))
    if a.empty:
        return {}
    a = a[a["lock_addr"].isin(list(cls))]
    g = a.assign(c=a["lock_addr"].map(cls)).groupby("c")[["count", "total_ns"]].sum()
    return {c: (int(r["count"]), int(r["total_ns"])) for c, r in g.iterrows()}


def srcu_at(rec):
    """Per function named by --srcu-at: its calls with a kvm->srcu read section held
    (which) and without, by context, and the path of the first call of each (the
    callers tell which ioctl or exit held it or not)."""
    df = rec.table("lockorder_srcu_at")
    if df.empty:
        return df
    # the probe's status says (older recordings: the manifest's top level)
    fns = ((rec.manifest.get("probes") or {}).get("lockorder") or {}).get("srcu_at") \
        or rec.manifest.get("srcu_at") or []
    cls = class_names(rec, df["ssp"][df["ssp"] != 0])
    df = df.assign(function=df["fn"].map(lambda i: fns[i] if i < len(fns) else f"slot {i}"),
                   srcu_held=df["ssp"].map(lambda a: cls.get(int(a), "") if a else "none"),
                   context=df["context"].map(CONTEXTS),
                   caller=call_chains(rec, df["stack_id"], depth=4,
                                      skip={*fns, *(f"__{f}" for f in fns)}))
    g = df.groupby(["function", "srcu_held", "context"])
    return pd.DataFrame({"calls": g["count"].sum(), "called_from": g["caller"].first()}) \
        .reset_index()


def _events(rec, *whats):
    """The streamed events of these kinds (a recording made before lockorder told
    more than recursion has no `what`: all recursion)."""
    df = rec.table("lockorder_recursion")
    if df.empty:
        return df
    what = df["what"] if "what" in df.columns else pd.Series(0, index=df.index)
    return df[what.isin([k for k, v in EVENTS.items() if v in whats])]


def recursion(rec):
    """Acquisitions of a lock its task already held (the fast-path/slow-path
    deadlock shape), with the caller of both."""
    df = _events(rec, "recursion")
    if df.empty:
        return df
    cls = class_names(rec, df["addr"])
    skip = _skip()
    return pd.DataFrame({
        "lock_class": df["addr"].map(cls), "kind": df["kind"].map(KINDS),
        "held_as": df["held_kind"].map(KINDS), "context": df["context"].map(CONTEXTS),
        "taken_again_at": callers(rec, df["stack_id"], skip=skip),
        "first_taken_at": callers(rec, df["held_stack_id"], skip=skip),
        "taken_again_stack": call_chains(rec, df["stack_id"], skip=skip),
        "first_taken_stack": call_chains(rec, df["held_stack_id"], skip=skip),
        "depth": df["depth"], "tid": df["tid"], "tgid": df["tgid"],
        "ts_ns": df["ts_ns"]})


def _blocks(acquired, held):
    """Whether taking a lock as `acquired` can wait for a holder of it as `held`
    (lockdep-design.rst's block conditions): a recursive reader (an SRCU read section,
    an rwlock read in_interrupt()) waits only for a writer; any other acquisition for
    any holder (an rwsem or a task's rwlock read queues behind a waiting writer, which
    waits for the readers; synchronize_srcu waits for the readers)."""
    return not (acquired in RECURSIVE and held in READERS)


def inversions(e):
    """Pairs of classes seen in both orders (from `edges`) where an edge each way can
    wait for the other: a possible ABBA deadlock. Judged per pair of edges, each with
    its own kinds (lockdep-design.rst's strong circle): a kvm->srcu read section
    inside a mutex and the mutex inside one are none, a synchronize_srcu inside the
    mutex is one. The counts and callers are those of the edges that pair up; kinds,
    the heaviest such pair."""
    cols = ["a", "b", "a_then_b", "b_then_a", "a_then_b_at", "b_then_a_at", "kinds"]
    if e is None or e.empty:
        return pd.DataFrame(columns=cols)
    by_pair = dict(iter(e.groupby(["held_class", "acquired_class"], sort=False)))
    rows = []
    for (h, a), fwd in by_pair.items():
        rev = by_pair.get((a, h))
        if not h < a or rev is None:
            continue
        # each edge's acquisition waits for the other edge's holder of that class
        hits = [(f, r) for f in fwd.itertuples() for r in rev.itertuples()
                if _blocks(f.acquired_kind, r.held_kind)
                and _blocks(r.acquired_kind, f.held_kind)]
        if not hits:
            continue
        ab = fwd.loc[sorted({p[0].Index for p in hits}), "count"].sum()
        ba = rev.loc[sorted({p[1].Index for p in hits}), "count"].sum()
        f, r = max(hits, key=lambda p: p[0].count + p[1].count)
        rows.append((h, a, int(ab), int(ba), f.first_caller, r.first_caller,
                     f"{f.held_kind} -> {f.acquired_kind}; {r.held_kind} -> {r.acquired_kind}"))
    return pd.DataFrame(rows, columns=cols)


CYCLE_MAX = 6          # classes in the longest circle looked for (lockdep: any length)


def cycles(e):
    """Circles of three or more classes (A -> B -> C -> A, from `edges`) where each
    class's acquisition can wait for its holder in the next edge (`_blocks`), as
    lockdep's circular dependency; pairs are `inversions`. One row a circle, started
    at its least class, with the first caller of each edge."""
    cols = ["classes", "edges_at"]
    if e is None or e.empty:
        return pd.DataFrame(columns=cols)
    out_edges = {}
    for r in e.itertuples():
        if r.held_class != r.acquired_class:
            out_edges.setdefault(r.held_class, []).append(r)
    rows = []

    def walk(start, path):
        for r in out_edges.get(path[-1].acquired_class if path else start, ()):
            if path and not _blocks(path[-1].acquired_kind, r.held_kind):
                continue
            nxt = r.acquired_class
            if nxt == start:
                if len(path) >= 2 and _blocks(r.acquired_kind, path[0].held_kind):
                    rows.append(path + [r])
            elif nxt > start and len(path) + 1 < CYCLE_MAX and \
                    nxt not in {p.held_class for p in path}:
                walk(start, path + [r])

    for start in sorted(out_edges):
        walk(start, [])
    seen, out = set(), []
    for c in rows:
        key = tuple(r.held_class for r in c)
        if key not in seen:
            seen.add(key)
            out.append((" -> ".join(key + (key[0],)), "; ".join(r.first_caller for r in c)))
    return pd.DataFrame(out, columns=cols)


def _usage(g):
    """Per state (hardirq, softirq): the acquisition rows that make the lock safe
    (taken in that IRQ context) and those that make it unsafe (held with it
    enabled), as lockdep's mark_usage() marks them."""
    ctx, at_call = g["context"], g["irqs_at_call"]
    # x86's "irq" (off the task's stack) with IRQs on at the call is a softirq: hardirq
    # handlers run with them off
    soft = (ctx == "softirq") | ((ctx == "irq") & (at_call == "on"))
    hard = ctx.isin(["hardirq", "nmi"]) | ((ctx == "irq") & (at_call != "on"))
    # lock_sync() (synchronize_srcu) marks no ENABLED usage: it holds nothing
    hard_on = (g["irqs"] == "on") & (g["kind"] != "srcu sync")
    # ENABLED_SOFTIRQ needs hardirqs on as well; softirq context runs with BH off
    soft_on = hard_on & (g["softirqs"] != "off") & ~ctx.isin(IRQ_CONTEXTS)
    return (("hardirq", hard, hard_on), ("softirq", soft, soft_on))


def irq_conflicts(cx):
    """Lockdep's single-lock IRQ-safety rule, from `contexts`, per state (hardirq,
    softirq): a class taken in that IRQ context and also held with it enabled (an
    interrupt there can deadlock on it). A class held only with softirqs off
    (spin_lock_bh) is no conflict for a softirq; a read usage conflicts only with a
    write one (SRCU and rwlock read sections beside each other are none). Softirqs
    "unknown" (x86 without a _bh entry point) count as on. One row a class: its
    hardirq conflict, else its softirq one."""
    cols = ["lock_class", "state", "in_irq", "irqs_on_elsewhere", "irq_at", "irqs_on_at"]
    if cx is None or cx.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for c, g in cx.groupby("lock_class"):
        for state, safe, unsafe in _usage(g):
            irq, on = g[safe], g[unsafe]
            if irq.empty or on.empty:
                continue
            if set(irq["kind"]) <= READERS and set(on["kind"]) <= READERS:
                continue
            rows.append((c, state, int(irq["count"].sum()), int(on["count"].sum()),
                         irq["first_caller"].iloc[0], on["first_caller"].iloc[0]))
            break
    return pd.DataFrame(rows, columns=cols)


def irq_order_conflicts(e, cx):
    """Lockdep's IRQ-safe -> IRQ-unsafe rule, per state: a class taken in that IRQ
    context (safe) ordered, directly or through other classes (`edges`), before a
    class held with that state enabled (unsafe): the interrupt that wants the first
    can spin on a CPU whose task waits for the second's holder, which waits for the
    interrupted task. Readers on both ends are no conflict (as in irq_conflicts)."""
    cols = ["safe", "unsafe", "state", "path", "in_irq_at", "irqs_on_at"]
    if e is None or e.empty or cx is None or cx.empty:
        return pd.DataFrame(columns=cols)
    nxt = {}
    for h, a in zip(e["held_class"], e["acquired_class"]):
        if h != a:
            nxt.setdefault(h, set()).add(a)
    safe, unsafe = {}, {}
    for c, g in cx.groupby("lock_class"):
        for state, s_mask, u_mask in _usage(g):
            if s_mask.any():
                safe.setdefault(state, {})[c] = g[s_mask]
            if u_mask.any():
                unsafe.setdefault(state, {})[c] = g[u_mask]
    rows = []
    for state in ("hardirq", "softirq"):
        for s_cls, s_rows in safe.get(state, {}).items():
            prev, todo = {s_cls: None}, [s_cls]
            while todo:                 # breadth first: the shortest path to each
                c = todo.pop(0)
                for n in sorted(nxt.get(c, ())):
                    if n not in prev:
                        prev[n] = c
                        todo.append(n)
            for u_cls, u_rows in unsafe.get(state, {}).items():
                if u_cls == s_cls or u_cls not in prev:
                    continue
                if set(s_rows["kind"]) <= READERS and set(u_rows["kind"]) <= READERS:
                    continue
                path, c = [u_cls], u_cls
                while prev[c] is not None:
                    c = prev[c]
                    path.append(c)
                rows.append((s_cls, u_cls, state, " -> ".join(reversed(path)),
                             s_rows["first_caller"].iloc[0], u_rows["first_caller"].iloc[0]))
    out = pd.DataFrame(rows, columns=cols)
    # a pair conflicting in hardirq is reported once, as lockdep stops at the first
    return out.drop_duplicates(["safe", "unsafe"], ignore_index=True)


# Documentation/virt/kvm/locking.rst (6.12), "Acquisition Orders": (outer, inner)
# pairs it states, and the classes it says cannot be taken inside kvm->srcu.
DOCUMENTED_ORDER = (
    ("kvm->lock", "vcpu->mutex"), ("kvm->lock", "kvm->slots_lock"),
    ("kvm->lock", "kvm->irq_lock"), ("kvm->slots_lock", "kvm->irq_lock"),
    ("vcpu->mutex", "kvm->arch.hyperv.hv_lock"), ("vcpu->mutex", "kvm->arch.xen.xen_lock"),
    ("kvm->mmu_lock", "kvm->arch.tdp_mmu_pages_lock"),
    ("kvm->mmu_lock", "kvm->arch.mmu_unsync_pages_lock"))
NOT_UNDER_SRCU = ("kvm->lock", "vcpu->mutex", "kvm->slots_lock")
SRCU_CLASSES = ("kvm->srcu",)


def documented(e):
    """Each edge (from `edges`) against locking.rst: "documented" (an order it
    states), "reversed" (the opposite of one), "forbidden" (a lock it says cannot be
    taken inside a kvm->srcu read section), else "not stated"."""
    if e is None or e.empty:
        return pd.DataFrame(columns=["held_class", "acquired_class", "count", "locking_rst"])
    order = set(DOCUMENTED_ORDER)

    def verdict(h, a):
        if (h, a) in order:
            return "documented"
        if (a, h) in order:
            return "reversed"
        if h in SRCU_CLASSES and a in NOT_UNDER_SRCU:
            return "forbidden"
        return "not stated"
    out = _pairs(e)
    out["locking_rst"] = [verdict(h, a) for h, a in zip(out["held_class"],
                                                        out["acquired_class"])]
    rank = {"reversed": 0, "forbidden": 1, "documented": 2, "not stated": 3}
    return out.sort_values(["locking_rst", "count"], key=lambda s: s.map(rank)
                           if s.name == "locking_rst" else -s, ignore_index=True)


def held_on_leaving(rec):
    """Locks a task still held as it returned to user space or exited (a range whose
    end never came: seed 003's rwsem held from a notifier's range start to an end
    that never ran), with where they were taken (the held entry's stack: its
    acquisition's, or that acquisition's first, bpf/lockorder.bpf.c)."""
    df = _events(rec, "held at return to user space", "held at exit")
    if df.empty:
        return df
    cls = class_names(rec, df["addr"])
    return pd.DataFrame({
        "event": df["what"].map(EVENTS), "lock_class": df["addr"].map(cls),
        "kind": df["kind"].map(KINDS),
        "taken_at": call_chains(rec, df["stack_id"], skip=_skip()),
        "held": df["depth"], "tid": df["tid"], "tgid": df["tgid"], "ts_ns": df["ts_ns"]})


def findings(rec):
    """What lockdep would report, one row each: inversion, IRQ conflict, recursion,
    an edge locking.rst reverses or forbids."""
    e, cx = edges(rec), contexts(rec)
    rows = [("inversion", f"{r.a} <-> {r.b}", f"{r.a_then_b} x at {r.a_then_b_at}; "
             f"{r.b_then_a} x at {r.b_then_a_at} ({r.kinds})")
            for r in inversions(e).itertuples()]
    rows += [("inversion", r.classes, f"a circle: {r.edges_at}")
             for r in cycles(e).itertuples()]
    rows += [("IRQ conflict", r.lock_class, f"{r.state}-safe: in {r.state} context "
              f"{r.in_irq} x at {r.irq_at}; {r.state}-unsafe: held with {r.state}s on "
              f"{r.irqs_on_elsewhere} x at {r.irqs_on_at}")
             for r in irq_conflicts(cx).itertuples()]
    rows += [("IRQ conflict", f"{r.safe} -> {r.unsafe}", f"{r.state}-safe {r.safe} (in "
              f"{r.state} at {r.in_irq_at}) before {r.state}-unsafe {r.unsafe} (held with "
              f"{r.state}s on at {r.irqs_on_at}): {r.path}")
             for r in irq_order_conflicts(e, cx).itertuples()]
    rows += [("recursion", r.lock_class, f"{r.kind} taken again at {r.taken_again_stack}; "
              f"held since {r.first_taken_stack}") for r in recursion(rec).drop_duplicates(
                  ["lock_class", "taken_again_stack", "first_taken_stack"]).itertuples()]
    rows += [(r.event, r.lock_class, f"{r.kind} taken at {r.taken_at}, never released")
             for r in held_on_leaving(rec).drop_duplicates(
                 ["event", "lock_class", "taken_at"]).itertuples()]
    d = documented(e)
    rows += [(f"locking.rst: {r.locking_rst}", f"{r.held_class} -> {r.acquired_class}",
              f"{r.count} x") for r in d[d["locking_rst"].isin(["reversed", "forbidden"])]
             .itertuples()] if not d.empty else []
    c = (rec.manifest.get("probe_counters") or {}).get("lockorder") or {}
    if c.get("lost_recursion"):         # (kprobes: another of ours ran on that CPU)
        rows.append(("incomplete", "", f"{c['lost_recursion']} lock calls (of any lock) "
                     f"the kernel ran none of our handlers for (recursion_misses: an "
                     f"interrupt inside another of them); a watched lock's taking or "
                     f"release among them goes unseen"))
    if c.get("depth_overflow"):         # lockdep follows 48: say what was not followed
        rows.append(("incomplete", "", f"{c['depth_overflow']} acquisitions with {LO_DEPTH} "
                     f"watched locks held already: no edges out of them (lockdep "
                     f"would have followed them)"))
    return pd.DataFrame(rows, columns=["finding", "locks", "seen"])


def order_figure(rec):
    """The classes on a circle, an arrow per edge, its width by count."""
    import math
    import plotly.graph_objects as go
    e = edges(rec)
    if e.empty:
        return None
    e = _pairs(e)
    classes = sorted(set(e["held_class"]) | set(e["acquired_class"]))
    pos = {c: (math.cos(2 * math.pi * i / len(classes)), math.sin(2 * math.pi * i / len(classes)))
           for i, c in enumerate(classes)}
    top = max(1, int(e["count"].max()))
    fig = go.Figure()
    for r in e.itertuples():
        (x0, y0), (x1, y1) = pos[r.held_class], pos[r.acquired_class]
        fig.add_annotation(x=x1, y=y1, ax=x0, ay=y0, xref="x", yref="y", axref="x", ayref="y",
                           showarrow=True, arrowhead=2, arrowwidth=1 + 5 * r.count / top,
                           hovertext=f"{r.held_class} -> {r.acquired_class}: {r.count}")
    fig.add_trace(go.Scatter(x=[p[0] for p in pos.values()], y=[p[1] for p in pos.values()],
                             mode="markers+text", text=list(pos), textposition="top center"))
    fig.update_layout(xaxis_visible=False, yaxis_visible=False, showlegend=False,
                      title="lock order: held -> acquired")
    return fig


def compare_values(rec):
    """Each edge's count, each (class, context, IRQs) acquisition count and each
    (class, kind)'s mean hold: an edge or context only NEW has is a line BASE reads 0
    in."""
    out = {}
    e = edges(rec)
    for r in _pairs(e).itertuples() if not e.empty else ():
        out[(f"order {r.held_class} -> {r.acquired_class}", "lower", "count")] = float(r.count)
    cx = contexts(rec)
    if not cx.empty:
        g = cx.groupby(["lock_class", "context", "irqs"])["count"].sum()
        for (c, ctx, irqs), n in g.items():
            out[(f"taken {c} in {ctx}, IRQs {irqs}", "lower", "count")] = float(n)
    h = holds(rec)
    if not h.empty:
        g = h.groupby(["lock_class", "kind"])[["count", "total_ns"]].sum()
        for (c, kind), r in g.iterrows():
            if r["count"]:
                out[(f"held {c} ({kind}), mean", "lower", "ns")] = r["total_ns"] / r["count"]
    return out


PROBE = Probe(
    name="lockorder",
    fires="per lock and unlock of every lock on the host and every contention begin and "
          "end (the filter), and per VM/vCPU ioctl",
    summary="lock order, IRQ context, recursion and hold times of KVM's locks (a "
            "lockdep for watched KVM objects)",
    targets=_targets(),
    bpf="lockorder.bpf.c",
    tables=("lockorder_edges", "lockorder_acqs", "lockorder_recursion", "lockorder_srcu_at",
            "lockorder_holds", "lockorder_caused"),
    columns={"lockorder_edges": {"held": "n", "acquired": "n", "held_kind": "n",
                                 "acquired_kind": "n", "count": "n", "stack_id": "n"},
             "lockorder_acqs": {"addr": "n", "outer": "n", "kind": "n", "context": "n",
                                "irqs": "n", "irqs_at_call": "n", "count": "n",
                                "stack_id": "n"},
             "lockorder_holds": {"addr": "n", "kind": "n", "stack_id": "n", "count": "n",
                                 "total_ns": "n", "max_ns": "n", "hist": "l"},
             "lockorder_caused": {"addr": "n", "kind": "n", "stack_id": "n", "count": "n",
                                  "total_ns": "n"}},
    streams=(("lockorder_events", "lockorder_recursion"),),
    aggregates=(("lockorder_edges", "lockorder_edges"), ("lockorder_acqs", "lockorder_acqs"),
                ("lockorder_srcu_at", "lockorder_srcu_at"),
                ("lockorder_holds", "lockorder_holds"), ("lockorder_caused", "lockorder_caused")),
    lock_columns={"lockorder_edges": ("held", "acquired"), "lockorder_acqs": ("addr", "outer"),
                  "lockorder_recursion": ("addr",), "lockorder_srcu_at": ("ssp",),
                  "lockorder_holds": ("addr",), "lockorder_caused": ("addr",)},
    fields={"LO_TASK_PREEMPT": ("task_struct", "thread_info.preempt_count"),
            "LO_TASK_STACK": ("task_struct", "stack"),
            "LO_FILE_PRIVATE_DATA": ("file", "private_data"),
            "LO_VCPU_KVM": ("kvm_vcpu", "kvm")},
    defines=defines,
    adjust_plan=adjust_plan,
    prepare=prepare,
    options=LockorderOptions,
    sections=(Section("lockorder_findings", "Lock order: what lockdep would report",
                      findings),
              Section("lockorder_edges", "Lock order edges (held -> acquired)", edges,
                      order_figure),
              Section("lockorder_documented", "Lock order edges against "
                      "Documentation/virt/kvm/locking.rst", lambda r: documented(edges(r))),
              Section("lockorder_contexts", "Lock acquisitions by context and IRQs",
                      contexts),
              Section("lockorder_recursion", "Recursive acquisitions", recursion),
              Section("lockorder_held", "Locks held on return to user space or at exit",
                      held_on_leaving),
              Section("lockorder_srcu_at", "SRCU held at the entry of --srcu-at functions",
                      srcu_at),
              Section("lockorder_holds", "Hold times of KVM's locks, by where they were "
                      "taken", holds)),
    compare=compare_values,
    uses=("vms",),              # its lock classes are named after the VMs' and vCPUs' fields
    notes="sees only locks inside watched KVM objects (from their first ioctl) and only "
          "the paths the workload ran; trylocks are not followed",
    opt_in="every lock operation of the host runs its filter: a debugging probe "
           "(bench/README.md \"lockorder cost\")",
)
