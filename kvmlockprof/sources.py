"""Open the BPF modules a session reads (`record` and `top` alike): the
contention probe and one module holding every function probe this host can
attach, with a status for every catalog probe (attached, or why not)."""
from . import btf, capabilities, catalog
from .bpfload import BpfUnavailable
from .probes.contention import ContentionProbe
from .probes.functions import FunctionProbes


def _function_plans(requested, status, prefer, warn):
    """{probe: Plan} of the function probes to load; the others get a status."""
    wanted = requested if requested is not None else catalog.CATALOG
    function_probes = [p for p in wanted if p.name != "contention"]
    if not function_probes:
        return {}
    caps = capabilities.probe_host(full=False)
    plans = {}
    for p in catalog.CATALOG:
        if p.name == "contention":
            continue
        plan = capabilities.plan(p, caps, prefer=prefer)
        if p not in function_probes:
            status[p.name] = {"status": "not requested"}
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


def open_sources(requested=None, tgids=None, follow_fork=False, sample_every=1,
                 ringbuf_mb=16, map_entries=16384, prefer=None, warn=None, status=None,
                 kbtf=None, stack_every=1, stack_budget=0):
    """({name: source}, {probe name: status}).

    requested: catalog probes, or None for every probe this host can attach.
    tgids: processes to keep (None: whole host). Raises BpfUnavailable when
    nothing at all could attach. Sources opened before an error are closed."""
    warn = warn or (lambda msg: None)
    status = {} if status is None else status
    sources = {}
    try:
        if requested is None or any(p.name == "contention" for p in requested):
            c = ContentionProbe(tgids=tgids, follow_fork=follow_fork,
                                sample_every=sample_every, ringbuf_mb=ringbuf_mb,
                                agg_entries=map_entries, stack_entries=map_entries,
                                stack_every=stack_every, stack_budget=stack_budget)
            sources["contention"] = c
            status["contention"] = {"status": "attached", "method": catalog.TRACEPOINT,
                                    "targets": sorted(c.attached), **c.options}
        plans = _function_plans(requested, status, prefer, warn)
        if plans:
            try:
                f = FunctionProbes(plans, kbtf or btf.Btf(), srcu_sample_every=64)
            except (BpfUnavailable, btf.BtfError) as e:
                for p in plans:
                    status[p.name] = {"status": "failed", "reason": str(e)}
                warn(f"function probes failed to load: {e}")
            else:
                sources["functions"] = f
                status.update(f.status)
                for name, st in f.status.items():
                    if st["status"] != "attached":
                        warn(f"probe {name} not attached: {st.get('reason')}")
        if not any(st.get("status") == "attached" for st in status.values()):
            raise BpfUnavailable("no probe could attach: run `kvmlockprof doctor` to see why")
    except BaseException:
        close_sources(sources)
        raise
    return sources, status


def close_sources(sources):
    """Detach every probe first (stop the firing), then free the modules."""
    try:
        for src in sources.values():
            src.detach()
    finally:
        for src in sources.values():
            src.close()
