"""The probe catalog: the registry of probes, the built-in ones first.

A probe is its BPF C file under bpf/ and one module under kvmlockprof/probes/ that
declares its Probe (kvmlockprof/probe.py: targets, tables, and the hooks through which
report, HTML, top and compare show it: `sections`, `compare`, `top`). The loader,
doctor, `probes`, `record` and every view iterate over CATALOG; none names a probe.
Adding one: the two files, and its module in probes.BUILTIN (or register() it).
"""
from kvmlockprof import probes
# What a probe is, for whoever declares one beside the catalog (register())
from kvmlockprof.probe import (  # noqa: F401
    FENTRY, KPROBE, METHOD_CODE, TRACEPOINT, Probe, Section, Target)

CATALOG = []           # in registration order: the built-in probes first
BY_NAME = {}


def register(probe):
    """Add a probe to the catalog (its name must be new); returns it."""
    if probe.name in BY_NAME:
        raise ValueError(f"a probe named {probe.name!r} is already registered")
    probe.counters                  # its C states them: refuse a probe whose C does not
    CATALOG.append(probe)
    BY_NAME[probe.name] = probe
    return probe


def unregister(probe):
    CATALOG.remove(probe)
    del BY_NAME[probe.name]


class UnknownProbe(ValueError):
    pass


def select(names):
    """Catalog entries by name; an unknown name lists the valid ones."""
    out = []
    for n in names:
        if n not in BY_NAME:
            raise UnknownProbe(f"unknown probe {n!r}; valid probes: {', '.join(BY_NAME)}")
        out.append(BY_NAME[n])
    for p in list(out):
        out += [BY_NAME[u] for u in p.uses if BY_NAME[u] not in out]
    return out


def resolve_symbol(target, symbols):
    """The first of the target's names (newest first) that this kernel has."""
    return next((s for s in target.symbols if s in symbols), None)


def table_columns():
    """{table: {column: kind}} that every probe's tables must have when read."""
    return {t: cols for p in CATALOG for t, cols in p.columns.items()}


for _probe in probes.BUILTIN:
    register(_probe)
