"""What this host's kernel lets us do, found by trying it, and the attach plan
that follows for each catalog probe."""
import hashlib
import os
import platform
from dataclasses import dataclass, field

from kvmlockprof import catalog
from kvmlockprof.kernel import bpfload, headers, host, ksyms, tracefs

KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"
# The attach trials' verdicts, kept for this boot: /run is emptied at every boot,
# and the key holds the kernel, the boot and the trial itself. record reads them
# (each trial compiles a program: a quarter of a second); doctor always tries anew.
TRIALS = f"{host.RUN_DIR}/trials.json"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warn: bool = False           # usable, but the user should know

    @property
    def status(self):
        return "warn" if (self.ok and self.warn) else ("ok" if self.ok else "no")


@dataclass
class Capabilities:
    checks: dict = field(default_factory=dict)
    symbols: dict = field(default_factory=dict)      # text symbol -> module ("" vmlinux)

    def ok(self, name):
        c = self.checks.get(name)
        return bool(c and c.ok)

    def why(self, name):
        c = self.checks.get(name)
        return c.detail if c else "not checked"


def _trial(text, attach=None):
    """Compile (and with tracepoints, attach) a tiny program; '' or the error."""
    try:
        b = bpfload.compile_bpf(text=text)
    except bpfload.BpfUnavailable as e:
        return str(e)
    try:
        if attach:
            attach(b)
        return ""
    except Exception as e:
        return str(e).splitlines()[0]
    finally:
        b.cleanup()


def _boot_key(kind, symbol, text):
    """What a trial's verdict depends on: the kernel and this boot, the privileges
    (CapEff) and lockdown state it ran under, the bcc that loaded it, the trial."""
    boot = host.boot_id()
    if not boot:
        return None
    caps = f"{host.effective_caps():x}"
    lockdown = host.read_text("/sys/kernel/security/lockdown")
    try:
        bcc = getattr(bpfload.import_bcc(), "__version__", "?")
    except bpfload.BpfUnavailable:
        bcc = "none"
    digest = hashlib.sha256(f"{caps}|{lockdown}|{bcc}|{text}".encode()).hexdigest()[:16]
    return f"{platform.release()}|{boot}|{kind}|{symbol}|{digest}"


# Failures of this environment, not verdicts of the kernel: never kept (the user may
# install what is missing before the next run).
_NOT_VERDICTS = ("bcc's Python bindings are missing", "no kernel headers")


def _remembered(kind, symbol, text, fresh, check):
    """check() (a Check), or this boot's verdict of the same trial where `fresh` is
    False; a fresh verdict of the kernel is kept for the next run (concurrent runs
    may each write theirs: the last one's file wins, the others try again)."""
    key = _boot_key(kind, symbol, text)
    got = host.kept(TRIALS).get(key)
    if not fresh and isinstance(got, list) and len(got) == 2 and isinstance(got[0], bool):
        return Check(kind, got[0], f"{got[1]} (this boot's trial, kept in {TRIALS})")
    c = check()
    if key and not c.detail.startswith(_NOT_VERDICTS):
        host.keep(TRIALS, key, [c.ok, c.detail])
    return c


def _kprobe_check(symbol, fresh=True):
    if not (os.path.exists(KPROBE_PMU) or
            os.path.exists(os.path.join(tracefs.tracefs_path() or "/nonexistent",
                                        "kprobe_events"))):
        cfg = host.config_option("CONFIG_KPROBES")
        return Check("kprobe attach", False,
                     "kernel has no kprobes (CONFIG_KPROBES="
                     f"{cfg or '?'}: no kprobe PMU, no kprobe_events); "
                     "kprobe programs load but cannot attach")

    def attach(b):
        b.attach_kprobe(event=symbol, fn_name="f")
    text = "int f(void *ctx) { return 0; }"

    def check():
        err = _trial(text, attach)
        return Check("kprobe attach", not err, f"attached to {symbol}" if not err else err)
    return _remembered("kprobe attach", symbol, text, fresh, check)


def _fentry_check(symbol, fresh=True):
    text = f"KFUNC_PROBE({symbol}) {{ return 0; }}"

    def check():
        err = _trial(text)
        if not err:
            return Check("fentry load (trial)", True, f"loaded and attached on {symbol}")
        if "super-user" in err or "EPERM" in err or "not permitted" in err.lower():
            err = ("the kernel refused the tracing program with EPERM although we are "
                   "privileged (lockdown, or no ftrace direct calls in this kernel)")
        return Check("fentry load (trial)", False, err)
    return _remembered("fentry load (trial)", symbol, text, fresh, check)


def probe_host(full=True):
    """Try what this host allows. `full=False` (record) skips the trials the
    contention probe's own load repeats anyway: it only needs the attach methods
    and symbols for the function probes' plans, and takes this boot's verdicts of
    the attach trials where a run before made them (TRIALS)."""
    caps = Capabilities()
    add = lambda c: caps.checks.__setitem__(c.name, c)  # noqa: E731

    root = os.geteuid() == 0
    add(Check("privileges", host.can_bpf(),
              ("root" if root else "CAP_BPF+CAP_PERFMON") if host.can_bpf() else
              "need root or CAP_BPF+CAP_PERFMON: run with sudo"))
    tfs, how = tracefs.mount_tracefs() if host.can_bpf() else (tracefs.tracefs_path(), "")
    add(Check("tracefs", bool(tfs), f"{tfs} ({how})" if tfs else
              (how or "not mounted; needs root to mount")))
    h = headers.find_headers()
    add(Check("kernel headers", h.status != "missing", h.describe(), warn=h.status == "fallback"))
    add(Check("BTF", host.has_btf(),
              f"{host.BTF_VMLINUX} ({len(os.listdir('/sys/kernel/btf')) - 1} module BTFs)"
              if host.has_btf() else "no /sys/kernel/btf/vmlinux: field offsets unknown"))
    kvm_ok = os.access("/dev/kvm", os.R_OK | os.W_OK)
    add(Check("/dev/kvm", kvm_ok, "usable: the built-in workload can run" if kvm_ok else
              "missing or not permitted: the built-in workload cannot run"))
    caps.symbols = ksyms.text_symbols()

    if not host.can_bpf():
        for n in ("BPF syscall", "tracepoint lock:contention_begin/end", "kprobe attach",
                  "fentry load (trial)"):
            add(Check(n, False, "not tried: no privileges"))
        return caps
    if full:
        _probe_tracing(add)
    target = next((s for s in ("kvm_vm_ioctl", "vfs_read") if s in caps.symbols), "vfs_read")
    add(_kprobe_check(target, fresh=full))
    # fentry through bcc reaches vmlinux functions only: try one of those
    add(_fentry_check(next((s for s in ("vfs_read", "ksys_read") if caps.symbols.get(s) == ""),
                           "vfs_read"), fresh=full))
    return caps


def _probe_tracing(add):
    err = _trial("int f(void *ctx) { return 0; }",
                 lambda b: b.load_func("f", bpfload.import_bcc().BPF.KPROBE))
    add(Check("BPF syscall", not err, "programs load and pass the verifier" if not err else err))
    have_tp = all(tracefs.tracepoint_exists("lock", e) for e in
                  ("contention_begin", "contention_end"))
    err = "" if have_tp else "no lock:contention_* tracepoints (kernel < 5.19?)"
    if have_tp:
        err = _trial("RAW_TRACEPOINT_PROBE(contention_begin) { return 0; }\n"
                     "RAW_TRACEPOINT_PROBE(contention_end) { return 0; }")
    add(Check("tracepoint lock:contention_begin/end", not err,
              "attached (trial)" if not err else err))
    from kvmlockprof.kernel import btf
    try:            # (read once for both)
        kb = btf.Btf(modules=[]) if host.has_btf() else None
    except btf.BtfError as e:
        kb = e
    add(_slab_names_check(kb))
    add(_owner_stacks_check(kb))
    kvm_events = tracefs.tracepoint_events("kvm")
    add(Check("tracepoints kvm:*", bool(kvm_events),
              f"{len(kvm_events)} events" if kvm_events else "kvm module not loaded"))


def _slab_names_check(kb):
    """Whether a lock in a slab object can be named by its cache: the kernel's
    bpf_get_kmem_cache kfunc (6.13+), called through bpf/kfunc.h in a trial load. kb:
    the kernel's Btf, None without one, or the BtfError reading it raised."""
    from kvmlockprof.kernel import btf
    name = "slab names"
    if isinstance(kb, btf.BtfError):
        return Check(name, False, str(kb))
    kid = btf.kfunc_id(kb, "bpf_get_kmem_cache") if kb else None
    if kid is None:
        return Check(name, False, "this kernel has no bpf_get_kmem_cache kfunc (6.13+, "
                     "BTF): a lock in a slab object is named only where another rule "
                     "names it (docs/lock-names.md)")
    err = _trial('#include "kfunc.h"\n'
                 f"static u64 (*cache_of)(u64) = KVMLP_KFUNC({kid});\n"
                 "int t(void *ctx) { return cache_of(0) != 0; }",
                 lambda b: bpfload.load_func(b, b"t", bpfload.import_bcc().BPF.RAW_TRACEPOINT))
    return Check(name, not err, "bpf_get_kmem_cache: a lock in a slab object is named "
                 "by its cache (`&task_struct@ADDR`)" if not err else
                 f"bpf_get_kmem_cache refused: {err}")


def _owner_stacks_check(kb):
    """Whether --lock-owner can take a sleeping owner's stack: a tp_btf program on
    lock:contention_begin calling bpf_task_from_pid and bpf_task_release (kfuncs), tried.
    kb: as _slab_names_check's."""
    from kvmlockprof.kernel import btf
    name = "owner stacks"
    if isinstance(kb, btf.BtfError):
        return Check(name, False, str(kb))
    ids = {f: btf.kfunc_id(kb, f) if kb else None for f in ("bpf_task_from_pid",
                                                            "bpf_task_release")}
    tp = btf.tracepoint_btf_id(kb, "contention_begin") if kb else None
    if None in ids.values() or tp is None:
        lacks = [f for f, i in ids.items() if i is None] + ([] if tp else ["tp_btf"])
        return Check(name, False, f"the kernel has no {', '.join(lacks)}: --lock-owner "
                     "names owners without their stacks")
    text = ('#include "kfunc.h"\n'
            f"static u64 (*from_pid)(s32) = KVMLP_KFUNC({ids['bpf_task_from_pid']});\n"
            f"static void (*release)(u64) = KVMLP_KFUNC({ids['bpf_task_release']});\n"
            "int t(u64 *ctx) { u64 task = from_pid(1); if (task) release(task); return 0; }")

    err = _trial(text, lambda b: os.close(bpfload.load_tp_btf(b, b"t", tp)))
    return Check(name, not err, "--lock-owner takes a sleeping owner's kernel stack "
                 "(tp_btf, bpf_task_from_pid)" if not err else f"refused: {err}")


@dataclass
class Plan:
    """How a probe would attach here: per target (symbol, method), or why not."""
    probe: object
    targets: dict = field(default_factory=dict)     # key -> (symbol or None, method or None)
    reason: str = ""
    off: dict = field(default_factory=dict)         # what the probe turned off, and why
    # the probe's options object (Probe.options; None if it has none), as its
    # prepare gets it: its adjust_plan reads it here, so that no module state carries
    # it between plans
    options: object = None

    @property
    def ok(self):
        return not self.reason

    @property
    def method(self):
        return "+".join(sorted({m for _, m in self.targets.values() if m})) or None


def _missing_symbol_reason(probe, target):
    why = f"no symbol {' / '.join(target.symbols)} in this kernel"
    for opt in probe.needs:
        if host.config_option(opt) == "n":
            why += f" ({opt}=n)"
    return why


def plan(probe, caps, prefer=None, options=None):
    """The attach plan of one catalog probe on this host; `prefer` (fentry or
    kprobe) is tried first where a target allows it; options: the probe's own
    options object (its defaults when None)."""
    arch = platform.machine()
    if options is None and probe.options:
        options = probe.options()
    p = Plan(probe, options=options)
    if arch not in probe.arch:
        p.reason = f"{arch} host: this probe is for {'/'.join(probe.arch)}"
        return p
    if not probe.bpf:
        p.reason = "catalogued, BPF program not built yet"
        return p
    not_attachable = []
    for t in probe.targets:
        if catalog.TRACEPOINT in t.methods:
            cat, ev = t.name.split(":")
            if not tracefs.tracepoint_exists(cat, ev):
                p.reason = f"tracepoint {t.name} does not exist"
            elif not caps.ok("tracepoint lock:contention_begin/end"):
                p.reason = caps.why("tracepoint lock:contention_begin/end")
            p.targets[t.key] = (t.name, catalog.TRACEPOINT)
            continue
        sym = catalog.resolve_symbol(t, caps.symbols)
        if not sym:
            not_attachable.append(_missing_symbol_reason(probe, t))
            if not t.optional:
                p.reason = p.reason or not_attachable[-1]
            p.targets[t.key] = (None, None)
            continue
        why = []
        method = None
        order = sorted(t.methods, key=lambda m: m != prefer)
        for m in order:
            if m == catalog.FENTRY:
                if not caps.ok("fentry load (trial)"):
                    why.append(f"fentry: {caps.why('fentry load (trial)')}")
                elif caps.symbols.get(sym):
                    why.append(f"fentry: {sym} is in module {caps.symbols[sym]} and bcc "
                               "attaches fentry to vmlinux functions only")
                else:
                    method = m
            elif m == catalog.KPROBE:
                if caps.ok("kprobe attach"):
                    method = m
                else:
                    why.append(f"kprobe: {caps.why('kprobe attach')}")
            if method:
                break
        if not method:
            if t.why_limited:
                why.append(t.why_limited)
            not_attachable.append(f"{sym}: " + "; ".join(why))
            if not t.optional:
                p.reason = p.reason or not_attachable[-1]
        p.targets[t.key] = (sym, method)
    if probe.adjust_plan and not p.reason:
        probe.adjust_plan(p, caps)
        not_attachable += list(p.off.values())
    if not p.reason and not any(m for _, m in p.targets.values()):
        p.reason = " | ".join(not_attachable)        # only optional targets, none usable
    return p


def symbol_rows(caps):
    """Each catalog target: which of its names this kernel has."""
    rows = []
    for p in catalog.CATALOG:
        for t in p.targets:
            if catalog.TRACEPOINT in t.methods:
                cat, ev = t.name.split(":")
                found = t.name if tracefs.tracepoint_exists(cat, ev) else ""
            else:
                found = catalog.resolve_symbol(t, caps.symbols) or ""
            rows.append((p.name, t.name, found))
    return rows
