"""Open the BPF modules a session reads (`record`, `top` and `exporter` alike): the
contention probe and one module holding every function probe this host can
attach, with a status for every catalog probe (attached, or why not)."""
import dataclasses

from kvmlockprof import catalog, options
from kvmlockprof.options import knob
from kvmlockprof.kernel import bpfload, bpfstats, btf, capabilities, handover, host
from kvmlockprof.kernel.bpfload import BpfUnavailable
from kvmlockprof.probes.contention import PROBE, ContentionOptions, ContentionProbe
from kvmlockprof.probes.functions import FunctionProbes


def _function_plans(requested, status, prefer, warn, probe_options=None):
    """{probe: Plan} of the function probes to load; the others get a status.
    probe_options: {probe name: its options object} (Plan.options)."""
    wanted = requested if requested is not None else catalog.CATALOG
    function_probes = [p for p in wanted if p.name != "contention"]
    if not function_probes:
        return {}
    caps = capabilities.probe_host(full=False)
    plans = {}
    for p in catalog.CATALOG:
        if p.name == "contention":
            continue
        plan = capabilities.plan(p, caps, prefer=prefer,
                                 options=(probe_options or {}).get(p.name))
        if p not in function_probes:
            status[p.name] = {"status": "not requested"}
        elif requested is None and p.opt_in and plan.ok:
            status[p.name] = {"status": "not requested",
                              "reason": f"off by default ({p.opt_in}): add it with "
                                        f"--probes contention,{p.name}"}
        elif plan.ok:
            plans[p] = plan
        else:
            status[p.name] = {"status": "unavailable", "reason": plan.reason}
            if requested is not None:
                warn(f"probe {p.name} cannot attach here: {plan.reason}")
    return plans


def load_btf(warn):
    """(the running kernel's BTF or None, the reason it is missing or None): KVM lock
    names and function-probe offsets need it; contention alone does not."""
    try:
        return btf.Btf(), None
    except btf.BtfError as e:
        warn(f"no BTF, locks inside KVM objects stay unnamed: {e}")
        return None, str(e)


# The kernel memory the maps of a session may pin, by default (--kernel-mem-mb).
KERNEL_MEM_MB = 64


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    """What a session (record, top, exporter) opens: which probes, how they attach,
    the kernel memory they may pin, and each source's options: the contention probe's
    and, per function probe that has some (Probe.options), its own."""
    probes: tuple = knob(None, "--probes", csv=True, dest="probe_names", metavar="A,B,...",
                         help="Probes to attach (default: every probe this host can "
                              "attach; see `kvmlockprof probes`).")
    prefer: str = knob(None, "--prefer", choices=("fentry", "kprobe"),
                       help="Attach method to try first for function probes (default: "
                            "fentry).")
    kernel_mem_mb: int = knob(KERNEL_MEM_MB, "--kernel-mem-mb", min=1,
                              help="Refuse to start if the probes' maps would pin more "
                                   "kernel memory than this (the kernel's own figure; "
                                   "none grows with the CPU count).")
    contention: ContentionOptions = ContentionOptions()
    # {probe name: its options}, for every catalog probe that has some
    probe_options: dict = dataclasses.field(default_factory=lambda: {
        p.name: p.options() for p in catalog.CATALOG if p.options})

    def __post_init__(self):
        options.check(self)

    @classmethod
    def from_kwargs(cls, kwargs, **contention):
        """From a command's parameters: its own, the contention probe's, and those of
        each function probe's options class (absent ones keep their defaults);
        contention: the contention options a command fixes."""
        probe_options = {p.name: options.from_kwargs(p.options, kwargs)
                         for p in catalog.CATALOG if p.options}
        return options.from_kwargs(
            cls, kwargs, contention=options.from_kwargs(ContentionOptions, kwargs,
                                                        **contention),
            probe_options=probe_options)

    def requested(self):
        """The catalog probes asked for, or None for every probe this host can attach
        (catalog.UnknownProbe for a name it does not have)."""
        return None if self.probes is None else catalog.select(self.probes)

    def not_requested_options(self):
        """[(flag, probe)] of options set for a function probe that is not requested."""
        names = set(self.probes or ())
        return [(k["flags"][-1], name) for name, o in self.probe_options.items()
                if name not in names for f, k in options.knobs(type(o))
                if k["flags"] and getattr(o, f.name) != f.default]


def kernel_memory(sources):
    """What the maps of open sources pin, by the kernel's accounting (memlock):
    {"maps": {"source/map": bytes}, "total": bytes, "possible_cpus": n}."""
    maps = {f"{name}/{m}": b for name, src in sources.items()
            for m, b in bpfstats.map_memory(src.bpf).items()}
    return {"maps": maps, "total": sum(maps.values()), "possible_cpus": host.possible_cpus()}


# What the maps take, roughly (docs/scale.md); doctor prints it with the
# kernel's own figure for the default settings.
MEMORY_FORMULA = ("contention ~ 1 KB x -M (aggregates, stacks, first walks) + 1.3 MB + "
                  "--ringbuf-mb; function probes ~ 16 MB (24.5 MB with all five of x86, "
                  "2 MB of it a ring each; lockorder's hold times 2.3 MB more); "
                  "per-CPU parts < 1 KB a CPU")


def default_memory(kbtf=None):
    """kernel_memory() of the probes `record` would attach with its defaults,
    loaded for no process and closed at once (doctor)."""
    sources, _, mem = open_sources(
        SessionOptions(kernel_mem_mb=None), tgids=[], kbtf=kbtf)
    close_sources(sources)
    return mem


def _within_limit(sources, limit_mb):
    mem = kernel_memory(sources)
    if limit_mb is not None and mem["total"] > limit_mb << 20:
        top = sorted(mem["maps"].items(), key=lambda kv: -kv[1])[:3]
        raise BpfUnavailable(
            f"the probes' maps take {mem['total'] / 2**20:.0f} MB of kernel memory, over "
            f"the {limit_mb} MB limit (largest: "
            + ", ".join(f"{m} {b / 2**20:.1f} MB" for m, b in top)
            + "): lower -M/--map-nr-entries or --ringbuf-mb, attach fewer --probes, "
              "or raise --kernel-mem-mb")
    return mem


def open_sources(session=SessionOptions(), tgids=None, kfilter=None, warn=None, status=None,
                 kbtf=None, here=False, also=None):
    """({name: source}, {probe name: status}, kernel memory (see kernel_memory)).

    bcc compiles and loads in a child process, which hands the modules over as fds
    (kernel/handover.py): LLVM never maps into a session's process. here: load in
    this process instead (bcc's own objects: a test or bench that reaches into them).
    also: a function of `warn` run there too once the probes are loaded, for what
    should not be made here either (the lock namers, from the BTF); its result comes
    fourth.

    session: its SessionOptions (session.probes None: every probe this host can
    attach); tgids: processes to keep (None: whole host); kfilter: the contention
    probe's other kernel-side filters (recording.filters.split). Raises
    BpfUnavailable when nothing at all could attach, or when the maps take more than
    session.kernel_mem_mb (None: no limit; they are freed at once). Sources opened
    before an error are closed. kbtf: the running kernel's Btf, or a function that
    reads it (then called only if needed: the contention probe's offsets are kept per
    boot, so the read comes after it attached)."""
    warn = warn or (lambda msg: None)
    status = {} if status is None else status
    if here:
        out = _open_here(session, tgids, kfilter, warn, status, kbtf)
        return out + (also(warn),) if also else out
    told = []

    def load():         # (in the child: its warnings travel back with its result or error)
        try:
            out = _open_here(session, tgids, kfilter, told.append, {}, kbtf, cache=True)
            if also:
                out += (also(told.append),)
            for src in out[0].values():
                src.hand_over()
        except Exception as e:
            e.kvmlockprof_warnings = told
            raise
        return out, told

    def fds(result):
        return [fd for src in result[0][0].values() for fd in src.bpf.fds()]

    try:
        (sources, st, memory, *more), told = handover.run(load, fds)
    except Exception as e:
        for msg in getattr(e, "kvmlockprof_warnings", ()):
            warn(msg)
        raise
    for msg in told:
        warn(msg)
    status.update(st)
    return (sources, status, memory, *more)


FIRST_ON_TRACEPOINTS = {"lockorder"}     # probes attached before the contention probe


def _open_here(session, tgids, kfilter, warn, status, kbtf, cache=False):
    """open_sources() in this process (bcc is imported in a thread meanwhile); cache:
    the contention probe from a kept compile where there is one (kernel/bpfcache.py)."""
    bpfload.prefetch_bcc()
    sources = {}
    requested = session.requested()

    def contention():
        offsets = btf.kernel_defines(PROBE.fields, kbtf) if callable(kbtf) else \
            btf.defines(kbtf, PROBE.fields)
        c = ContentionProbe(session.contention, tgids=tgids, kfilter=kfilter,
                            offsets=offsets, cache=cache)
        sources["contention"] = c
        status["contention"] = {"status": "attached", "method": catalog.TRACEPOINT,
                                "targets": sorted(c.attached), **c.options}

    def functions(plans):
        try:
            f = FunctionProbes(plans, (kbtf() if callable(kbtf) else kbtf) or btf.Btf())
        except (BpfUnavailable, btf.BtfError) as e:
            for p in plans:
                status[p.name] = {"status": "failed", "reason": str(e)}
            warn(f"function probes failed to load: {e}")
            return
        sources["functions"] = f
        status.update(f.status)
        for name, st in f.status.items():
            if st["status"] != "attached":
                warn(f"probe {name} not attached: {st.get('reason')}")
    try:
        waits = requested is None or any(p.name == "contention" for p in requested)
        if waits:
            status["contention"] = {}           # (its place first among the statuses)
        plans = _function_plans(requested, status, session.prefer, warn,
                                session.probe_options)
        # A tracepoint runs its programs in the order they attached: lockorder's
        # contention_begin puts a wait down to the lock's holder as it begins, so it
        # goes before the contention probe's stack walk (under the emulator, tens
        # of us in which a holder can release)
        first = [p for p in plans if p.name in FIRST_ON_TRACEPOINTS]
        if first:
            functions(plans)
        if waits:
            contention()
        if plans and not first:
            functions(plans)
        if not any(st.get("status") == "attached" for st in status.values()):
            raise BpfUnavailable("no probe could attach: run `kvmlockprof doctor` to see why")
        memory = _within_limit(sources, session.kernel_mem_mb)
    except BaseException:
        close_sources(sources)
        raise
    return sources, status, memory


def waits_source(sources):
    """The source of the lock waits (the contention probe's: role "waits"), or None: its
    counters are a recording's own, its aggregates and stacks name the locks."""
    return next((s for s in sources.values() if s.role == "waits"), None)


def close_sources(sources):
    """Detach every probe first (stop the firing), then free the modules."""
    try:
        for src in sources.values():
            src.detach()
    finally:
        for src in sources.values():
            src.close()
