"""What a probe is: the declaration each probe module makes (Probe, its Targets and
report Sections) and the attach methods. Below the catalog that registers them
(catalog.py) and everything that loads them, so that a probe module imports only this.

For a function probe, each Target names the kernel function (newest name first,
older aliases after), the attach methods it allows in order of preference, the
parameters the C reads (their positions come from BTF, else from `signatures`),
and whether a return handler is needed. The C sees, per target KEY:
KVMLP_M_KEY (the method: one of KVMLP_M_* in bpf/common.h), KVMLP_S_KEY (the
symbol), KVMLP_N_KEY (argument count), KVMLP_A_KEY_PARAM (argument index or -1).
Struct field offsets (`fields`) reach it as KVMLP_OFF_NAME, BTF ids (kfuncs, tp_btf)
as KVMLP_ID_NAME, -1 where BTF lacks one (kernel.btf.define_name).
"""
from dataclasses import dataclass, field

from kvmlockprof import cdefs

TRACEPOINT = "raw_tracepoint"    # never perf-attached: see bpf/contention.bpf.c
FENTRY = "fentry"
KPROBE = "kprobe"
# The C's codes for them (KVMLP_M_*, bpf/common.h), which its macros paste as suffixes
METHOD_CODE = {None: cdefs.define("common.h", "KVMLP_M_OFF"),
               FENTRY: cdefs.define("common.h", "KVMLP_M_FENTRY"),
               KPROBE: cdefs.define("common.h", "KVMLP_M_KPROBE")}


@dataclass(frozen=True, eq=False)   # catalog entries are singletons: hash by identity
class Target:
    key: str                       # C macro suffix
    symbols: tuple                 # newest name first: the first one present is used
    methods: tuple                 # attach methods allowed, preferred first
    params: tuple = ()             # parameter names the C reads
    signatures: dict = field(default_factory=dict)   # symbol -> parameter names (no BTF)
    ret: bool = False              # needs a return handler
    optional: bool = False         # the probe still works without this target
    why_limited: str = ""          # why some methods are impossible for it

    @property
    def name(self):
        return self.symbols[0]


@dataclass(frozen=True)
class Section:
    """One part of a probe's report: a table (DataFrame from a Recording, empty
    when there is nothing), and optionally its figure (plotly, or None)."""
    key: str
    title: str
    frame: object                  # rec -> DataFrame
    figure: object = None          # rec -> figure or None
    hex: tuple = ()                # columns of kernel addresses, shown in hex


@dataclass(frozen=True, eq=False)   # catalog entries are singletons: hash by identity
class Probe:
    name: str
    summary: str
    targets: tuple
    bpf: str = ""
    header: str = ""               # the C file of its enums, if not `bpf`
    arch: tuple = ("x86_64", "aarch64")
    tables: tuple = ()             # recording tables it fills
    columns: dict = field(default_factory=dict)     # table -> {column: kind}, checked on read
    streams: tuple = ()            # (ring buffer map, recording table)
    aggregates: tuple = ()         # (in-kernel map, recording table), snapshotted
    # KVMLP_OFF_X -> (struct, field path, or "sizeof": the struct's size); KVMLP_ID_X ->
    # (btf.KFUNC or btf.TP_BTF, name)
    fields: dict = field(default_factory=dict)
    # its own build-time knobs, for its C: a dict, or kbtf -> dict (sizes from BTF)
    defines: object = field(default_factory=dict)
    # table -> columns holding lock addresses that `record` names (as it names the
    # contended ones)
    lock_columns: dict = field(default_factory=dict)
    # (Plan, Capabilities) -> None: turn targets off as a set (Plan.off says why), or
    # point them at symbols chosen at run time (from Plan.options: the same options
    # `prepare` gets), after the plan is made
    adjust_plan: object = None
    # (bcc module, its options from the command line) -> dict for its status: fills
    # its maps before its programs attach
    prepare: object = None
    # its options class (kvmlockprof.options: knobs with their command-line flags), or
    # None; record takes its flags, and its plan and prepare get an instance
    options: object = None
    sections: tuple = ()           # its Sections of report and HTML, in order
    compare: object = None         # rec -> {(metric, better, unit): value}
    # (stream batches, map snapshots) -> {name: (hits, total, counted since the start)}
    top: object = None
    needs: tuple = ()              # kernel config a probe needs, for the why-not
    uses: tuple = ()               # probes recorded with it (what names its findings)
    notes: str = ""
    fires: str = ""                # how often its programs run: its cost class
    # Why plain record/top leave it off (its measured cost, bench/README.md "Function
    # probe costs"); "" : on by default. --probes attaches it.
    opt_in: str = ""

    @property
    def counters(self):
        """Names of its in-kernel counters, in order: `enum <name>_counter` of its C
        (a probe with C must have one: its slots in the shared array come from it)."""
        return cdefs.counters(self.header or self.bpf, f"{self.name}_counter") \
            if self.bpf else ()
