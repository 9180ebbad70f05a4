"""What the function probes' analyses share: DataFrames in, DataFrames out."""

from kvmlockprof import cdefs
from kvmlockprof.lazy import pd
from kvmlockprof.quantiles import quantiles

# A probe hit's context and IRQs at the call, as bpf/common.h records them
CONTEXTS = cdefs.labels("common.h", "kvmlp_context", {
    "KVMLP_CTX_TASK": "task", "KVMLP_CTX_SOFTIRQ": "softirq", "KVMLP_CTX_HARDIRQ": "hardirq",
    "KVMLP_CTX_NMI": "nmi", "KVMLP_CTX_UNKNOWN": "unknown", "KVMLP_CTX_IRQ": "irq"})
IRQS = cdefs.labels("common.h", "kvmlp_irqs", {
    "KVMLP_IRQS_ON": "on", "KVMLP_IRQS_OFF": "off", "KVMLP_IRQS_UNKNOWN": "unknown"})
IRQS_OFF = cdefs.enum("common.h", "kvmlp_irqs")["KVMLP_IRQS_OFF"]


def stats(df, keys, col):
    """count, total, mean, p50, p99 (nearest rank), max of `col` per group."""
    g = df.groupby(keys)[col]
    return pd.DataFrame({"count": g.size(), "total_ns": g.sum(), "mean_ns": g.mean(),
                         "p50_ns": g.agg(lambda x: quantiles(x.to_numpy(), 0.5)),
                         "p99_ns": g.agg(lambda x: quantiles(x.to_numpy(), 0.99)),
                         "max_ns": g.max()}).reset_index()


def _by_stack(rec, stack_ids, skip, pick):
    """pick(the frames of a function-probe stack that are not the probed function
    itself nor probe machinery (kprobe/trampoline frames)) for each stack id; "?"
    for a stack not recorded (or nothing picked)."""
    st = rec.stacks
    if st.empty:
        return pd.Series(["?"] * len(stack_ids), index=stack_ids.index)
    if "source" in st.columns:
        st = st[st["source"] == "functions"]
    out = {}
    for sid, frames in zip(st["stack_id"], st["frames"]):
        out[int(sid)] = pick([f for f in frames if f.split("+", 1)[0] not in skip and
                              not f.startswith(("bpf_", "kprobe", "ftrace", "0x"))]) or "?"
    return stack_ids.map(lambda s: out.get(int(s), "?"))


def callers(rec, stack_ids, skip):
    """The first such frame of each stack (with its offset): the caller."""
    return _by_stack(rec, stack_ids, skip, lambda fs: fs[0] if fs else None)


def call_chains(rec, stack_ids, skip, depth=5):
    """The first `depth` such frames of each stack, innermost first, as "f <- g <- h"
    (function names only): where a recursion was taken, whole enough to tell the
    path, short enough for a line."""
    return _by_stack(rec, stack_ids, skip,
                     lambda fs: " <- ".join(f.split("+", 1)[0] for f in fs[:depth]))


def duration_s(rec):
    return rec.manifest.get("duration_s") or float("nan")


def vm_label(rec):
    """tgid -> the VM's name (its process), for figures."""
    from kvmlockprof.analysis.locks import processes
    p = processes(rec)
    names = dict(zip(p["tgid"], p["vm"]))
    return lambda t: names.get(t, str(t))
