"""The function probes at run time: every selected catalog probe compiled into
one BPF module (they share the VM registry and the stack map), attached per
target with the method its plan chose, read generically from the catalog's
stream/aggregate/counter declarations."""
from kvmlockprof import catalog, cdefs
from kvmlockprof.kernel import bpfload, bpfstats, btf, handles
from kvmlockprof.kernel.maps import read_counters, read_hash_parts
from kvmlockprof.kernel.ringbuf import BatchRingBuffer
from kvmlockprof.recording.arrow import to_arrow

# The VM/vCPU registry every module shares (common.h): live, and the lifetimes ended
# (locknames.REGISTRY_TABLES; keyed by address and first_ns, LRU).
SHARED_TABLES = (("kvmlp_vms", "vms", "kvm"), ("kvmlp_vcpus", "vcpus", "vcpu"),
                 ("kvmlp_vm_ends", "vm_ends", "key"), ("kvmlp_vcpu_ends", "vcpu_ends", "key"))
# fentry on a symbol that other targets of the module share (bpf/common.h)
SHARED_FENTRY = cdefs.define("common.h", "KVMLP_M_SHARED_FENTRY")


def target_defines(target, symbol, method, kbtf):
    """KVMLP_M/S/N/A_* for one target: method, symbol, argument count and positions."""
    params = (kbtf.func_params(symbol) if kbtf and symbol else None) or \
        list(target.signatures.get(symbol, ()))
    d = {f"KVMLP_M_{target.key}": catalog.METHOD_CODE[method],
         f"KVMLP_S_{target.key}": symbol or "kvmlp_absent", f"KVMLP_N_{target.key}": len(params)}
    for p in target.params:
        d[f"KVMLP_A_{target.key}_{p.upper()}"] = params.index(p) if p in params else -1
    return d


def module_defines(plans, kbtf, stack_entries=16384, ringbuf_pages=1024):
    """Every define the combined module needs, for {probe: Plan}."""
    d = {"KVMLP_STACK_ENTRIES": stack_entries, "KVMLP_RINGBUF_PAGES": ringbuf_pages}
    for probe in plans:
        d.update(probe.defines(kbtf) if callable(probe.defines) else probe.defines)
    bases = counter_bases(plans)
    d.update({f"KVMLP_CBASE_{p.name.upper()}": base for p, base in bases.items()})
    d["KVMLP_NR_COUNTERS"] = max(1, sum(len(p.counters) for p in plans))
    returning = [t for p in plans for t in p.targets if t.ret]
    d.update({f"KVMLP_FN_{t.key}": i for i, t in enumerate(returning, 1)})
    for probe, plan in plans.items():
        for t in probe.targets:
            sym, method = plan.targets.get(t.key, (None, None))
            d.update(target_defines(t, sym, method, kbtf))
        d.update({btf.define_name(k, probe.fields[k]): v
                  for k, v in btf.defines(kbtf, probe.fields).items()})
    for targets in shared_fentry(plans).values():
        d.update({f"KVMLP_M_{t.key}": SHARED_FENTRY for t in targets})
    return d


def shared_fentry(plans):
    """{symbol: [targets]} for the symbols that several targets of the module attach
    by fentry (vms and xarray both hook kvm_arch_vcpu_destroy). bcc names an fentry
    program after its function (kfunc__SYM), so a module holds one per symbol: it
    calls each target's handler in turn (dispatch_source). Kprobes need no such
    thing: each target's program is attached on its own."""
    by_symbol = {}
    for probe, plan in plans.items():
        for t in probe.targets:
            sym, method = plan.targets.get(t.key, (None, None))
            if method == catalog.FENTRY:
                by_symbol.setdefault(sym, []).append(t)
    return {sym: ts for sym, ts in by_symbol.items() if len(ts) > 1}


def dispatch_source(plans):
    """The fentry/fexit programs of the shared symbols, each calling its targets'
    handlers (KVMLP_M 3 makes those plain functions, common.h)."""
    out = []
    for sym, targets in shared_fentry(plans).items():
        keys = ", ".join(t.key for t in targets)
        calls = "".join(f"\tkvmlp_fe__{t.key}(ctx);\n" for t in targets)
        out.append(f"/* ---- fentry on {sym}, shared by {keys} ---- */\n"
                   f"KFUNC_PROBE({sym})\n{{\n{calls}\treturn 0;\n}}\n")
        rets = "".join(f"\tkvmlp_fx__{t.key}(ctx);\n" for t in targets if t.ret)
        if rets:
            out.append(f"KRETFUNC_PROBE({sym})\n{{\n{rets}\treturn 0;\n}}\n")
    return "\n".join(out)


def counter_bases(probes):
    """Where each probe's counters start in the shared kvmlp_counters array."""
    bases, n = {}, 0
    for p in probes:
        bases[p] = n
        n += len(p.counters)
    return bases


def forced_plans(probes, method):
    """Plans that use `method` for every target under its newest name, whatever
    this host has: for compiling and verifying flavours a host cannot attach."""
    from kvmlockprof.kernel.capabilities import Plan
    return {p: Plan(p, {t.key: (t.symbols[0], method) for t in p.targets}) for p in probes}


def module_source(probes):
    """common.h and each probe's C, inlined: bcc rewrites map calls (map.lookup()
    and friends) only in the main text, not in files it #includes. With plans
    ({probe: Plan}), the programs of shared fentry symbols close it."""
    parts = [(bpfload.BPF_DIR / "common.h").read_text()]
    parts += [f"/* ---- {p.bpf} ---- */\n" + (bpfload.BPF_DIR / p.bpf).read_text()
              for p in probes]
    if isinstance(probes, dict):
        parts.append(dispatch_source(probes))
    return "\n".join(parts)


# Each streaming probe's ring buffer: drained at least ten times a second, 2 MB holds
# ~30k events, several times the busiest stream measured (bench/README.md).
RINGBUF_MB = 2


class FunctionProbes:
    """Compile, attach, read and detach a set of function probes."""
    role = "functions"      # not the lock waits' source (ContentionProbe.role)

    def __init__(self, plans, kbtf, ringbuf_mb=RINGBUF_MB, attach=True):
        """plans: {probe: Plan}; each Probe.prepare gets its plan's options."""
        self.plans = dict(plans)
        pages = max(1, ringbuf_mb * (1 << 20) // 4096)
        self.ringbuf_bytes = (1 << (pages.bit_length() - 1)) * 4096
        self.defines = module_defines(self.plans, kbtf, ringbuf_pages=self.ringbuf_bytes // 4096)
        # fentry handlers attach as bcc compiles the module; kprobes below, one by one.
        self.bpf = bpfload.compile_bpf(text=module_source(self.plans), defines=self.defines)
        self.status = {}
        for probe, plan in self.plans.items():
            prepared = probe.prepare(self.bpf, plan.options) if probe.prepare else {}
            self.status[probe.name] = dict(self._attach(probe, plan) if attach else
                                           {"status": "loaded", "method": plan.method},
                                           **prepared)
        self.rings = {}
        for probe in self.plans:
            for ring, table in probe.streams:
                t = self.bpf[ring]
                self.rings[table] = BatchRingBuffer(t.map_fd, self.ringbuf_bytes,
                                                    bpfload.event_dtype(t))

    def kprobe_functions(self, probe, target=None):
        """(function name, kernel symbol, is-return) of a probe's kprobe handlers."""
        plan = self.plans[probe]
        out = []
        for t in probe.targets:
            sym, method = plan.targets.get(t.key, (None, None))
            if method == catalog.KPROBE and target in (None, t):
                out.append((f"kvmlp_kp_{t.key}", sym, False))
                if t.ret:
                    out.append((f"kvmlp_kr_{t.key}", sym, True))
        return out

    def _detach_kprobes(self, handlers):
        for fn, sym, is_ret in handlers:
            try:        # by program: another probe's may be on the same symbol
                (self.bpf.detach_kretprobe if is_ret else self.bpf.detach_kprobe)(
                    event=sym, fn_name=fn)
            except Exception:
                pass            # never attached

    def _attach(self, probe, plan):
        """Attach a probe's kprobe targets. An optional target that fails is
        reported and skipped; a required one, or a handler the verifier refuses,
        fails the whole probe."""
        targets, attached = {}, []
        kprobe = bpfload.import_bcc().BPF.KPROBE
        for t in probe.targets:
            sym, method = plan.targets.get(t.key, (None, None))
            targets[t.key] = {"symbol": sym, "method": method}
            handlers = self.kprobe_functions(probe, t)
            try:
                for fn, _, _ in handlers:
                    try:
                        bpfload.load_func(self.bpf, fn.encode(), kprobe)
                    except bpfload.BpfUnavailable as e:
                        # the verifier refusing our handler is our bug on this kernel,
                        # not a symbol it lacks: no target of the probe can be trusted
                        return self._failed(probe, attached, targets, t, str(e))
                for fn, s, is_ret in handlers:
                    (self.bpf.attach_kretprobe if is_ret else self.bpf.attach_kprobe)(
                        event=s, fn_name=fn)
            except Exception as e:
                self._detach_kprobes(handlers)
                reason = str(e).splitlines()[0]
                if not t.optional:
                    return self._failed(probe, attached, targets, t, reason)
                targets[t.key].update(method=None, error=reason)
                continue
            if method:
                attached.append(t)
        off = plan.off
        if not attached:
            return {"status": "failed", "method": None, "targets": targets, "off": off,
                    "reason": " | ".join(v.get("error", f"{k}: not attachable")
                                         for k, v in targets.items())}
        return {"status": "attached",
                "method": "+".join(sorted({v["method"] for v in targets.values()
                                           if v["method"]})),
                "targets": targets, **({"off": off} if off else {})}

    def _failed(self, probe, attached, targets, target, reason):
        for a in attached:
            self._detach_kprobes(self.kprobe_functions(probe, a))
        targets[target.key].update(method=None, error=reason)
        return {"status": "failed", "method": self.plans[probe].method,
                "reason": f"{target.key} ({targets[target.key]['symbol']}): {reason}",
                "targets": targets}

    def load_kprobe_handlers(self):
        """Load every kprobe handler through the verifier (no attach): the check
        that kprobe flavours are valid on kernels that cannot attach them."""
        bcc = bpfload.import_bcc()
        for probe in self.plans:
            for fn, _, _ in self.kprobe_functions(probe):
                self.bpf.load_func(fn, bcc.BPF.KPROBE)

    def poll(self):
        return {table: ring.consume() for table, ring in self.rings.items()}

    def event_dtypes(self):
        return {table: ring.dtype for table, ring in self.rings.items()}

    def snapshots(self):
        out = {}
        for probe in self.plans:
            for m, table in probe.aggregates:
                out[table] = to_arrow(*read_hash_parts(self.bpf[m]))
        for m, table, key in SHARED_TABLES:
            out[table] = to_arrow(*read_hash_parts(self.bpf[m], key_name=key))
        return out

    def counters(self):
        names = [f"{p.name}.{c}" for p in self.plans for c in p.counters]
        flat = read_counters(self.bpf["kvmlp_counters"], names) if names else {}
        out = {}
        for key, v in flat.items():
            probe, counter = key.split(".", 1)
            out.setdefault(probe, {})[counter] = v
        # the kernel's count of the calls a program never ran for (a shared one: each's)
        for fd, probes in self.prog_fds().values():
            missed = bpfstats.recursion_misses(fd)
            for p in probes:
                c = out.setdefault(p, {})
                c[bpfstats.RECURSION] = c.get(bpfstats.RECURSION, 0) + missed
        return out

    def stack_addrs(self, stack_id):
        return bpfload.stack_addrs(self.bpf["kvmlp_stacks"], stack_id)

    def prog_fds(self):
        """{program name: (fd, names of the probes it serves)} of every attached
        handler (a symbol's one fentry program may serve several probes)."""
        out = {}
        fentry = [*self.bpf.kfunc_entry_fds, *self.bpf.kfunc_exit_fds]
        for probe, plan in self.plans.items():
            for t in probe.targets:
                sym, method = plan.targets.get(t.key, (None, None))
                if method == catalog.KPROBE:
                    names = [fn.encode() for fn, _, _ in self.kprobe_functions(probe, t)]
                elif method == catalog.FENTRY:
                    names = [fn for fn in fentry if fn.endswith(b"__" + sym.encode())]
                else:
                    continue
                for fn in names:
                    if fn in self.bpf.funcs:
                        fd, probes = out.get(fn.decode(), (self.bpf.funcs[fn].fd, ()))
                        out[fn.decode()] = (fd, tuple(sorted({*probes, probe.name})))
        return out

    def detach(self):
        for probe in self.plans:
            self._detach_kprobes(self.kprobe_functions(probe))
        for fn in list(self.bpf.kfunc_entry_fds):
            self.bpf.detach_kfunc(fn)
        for fn in list(self.bpf.kfunc_exit_fds):
            self.bpf.detach_kretfunc(fn)

    def hand_over(self):
        """In the loading child: keep bcc's object as its fds (kernel/handover.py)."""
        self.bpf = handles.Module.from_bcc(self.bpf)

    def close(self):
        for r in self.rings.values():
            r.close()
        self.bpf.cleanup()
