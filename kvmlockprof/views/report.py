"""Text, CSV and JSON renderings of a recording's contention tables."""
import json
import re


from kvmlockprof.analysis import locks, owners
from kvmlockprof.analysis import vcpus
from kvmlockprof.lazy import pd
from kvmlockprof.recording import processes


def probe_sections(only=None):
    """Every registered probe's report sections (catalog.Section), in catalog order
    (only: just that probe's)."""
    from kvmlockprof.catalog import CATALOG
    return [sec for p in CATALOG for sec in p.sections if only in (None, p.name)]


def fmt_ns(ns, bound=False):
    if ns != ns:              # NaN
        return "-"
    for unit, div in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= div:
            s = f"{ns / div:.2f} {unit}"
            break
    else:
        s = f"{ns:.0f} ns"
    return ("<=" + s) if bound else s


# The reasons a probe did not attach, said short (the whole reason: report -v, doctor)
_SHORT = [(re.compile(p), r) for p, r in (
    (r"kernel has no kprobes", "no kprobes"),
    (r"kernel refused the tracing program", "fentry refused"),
    (r"built without ftrace hooks", "no fentry in lib/"),
    (r"no symbol (.+?) in this kernel(?: \(([^)]*)\))?", lambda m: f"no {m.group(1)}" +
     (f": {m.group(2)}" if m.group(2) else "")),
    (r"this probe is for (\w+)", r"\1 only"))]


def short_reason(reason):
    """A probe's reason for not attaching, in a few words."""
    found = []
    for rx, r in _SHORT:
        m = rx.search(reason or "")
        said = m and (r(m) if callable(r) else m.expand(r))
        if said and said not in found:
            found.append(said)
    return ", ".join(found) if found else (reason or "?")[:80]


def probe_lines(probes, cost=None, verbose=False, more="-v or `kvmlockprof doctor`"):
    """The probes' status: one line for those attached, one for the others grouped by
    why (verbose: a line per probe with its whole reason)."""
    cost = cost or {}
    if verbose:
        return [f"probe {n}: {p.get('status')} (" + (str(p.get("method")) if p.get("status")
                == "attached" else f"NOT attached: {p.get('reason', '')}") + ")" +
                _cost_text(cost.get(n)) for n, p in probes.items()]
    on = [f"{n} ({p.get('method')}){_cost_text(cost.get(n))}" for n, p in probes.items()
          if p.get("status") == "attached"]
    why = {}
    for n, p in probes.items():
        if p.get("status") not in ("attached", "not requested"):
            why.setdefault(short_reason(p.get("reason")), []).append(n)
    lines = [f"probes attached: {', '.join(on) or 'none'}"]
    if why:
        lines.append("not attached: " + "; ".join(f"{', '.join(ns)} ({r})"
                                                  for r, ns in why.items()) +
                     f" ({more}: why)")
    return lines


def summary_lines(rec, verbose=False):
    m = rec.manifest
    t = locks.totals(rec)
    lines = [f"host {m.get('host')}  kernel {m.get('kernel_release')}  "
             f"duration {m.get('duration_s', 0):.2f} s  stopped by {m.get('stopped_by', '?')}"]
    if rec.interrupted:
        lines.append(f"INTERRUPTED recording: read from {rec.path}, data up to the last flush")
    if m.get("command_stuck"):
        lines.append("COMMAND STUCK: " + processes.describe_stuck(m["command_stuck"]))
    lines += probe_lines(m.get("probes", {}), m.get("probe_cost") or {}, verbose)
    c = m.get("probes", {}).get("contention", {})
    every, budget = c.get("stack_every", 1) or 1, c.get("stack_budget", 0) or 0
    c_first = m.get("counters", {}).get("first_walks", 0)
    if every > 1 or budget:
        lines.append("kernel stacks walked for " + " and ".join(
            ([f"1 wait in {every} (--stack-every)"] if every > 1 else []) +
            ([f"at most {budget} waits/s per CPU, drawn at random (--stack-budget)"]
             if budget else [])) +
            f", and once for each lock that had none ({c_first} walks)" * bool(c_first) +
            f": {_walked_share(rec):.1%} of the waits; the others count under their lock, "
            "and by caller are spread over the lock's walked callers (~)")
    floor = resolution_line(m)
    if floor:
        lines.append(floor)
    mem = m.get("kernel_memory")
    if isinstance(mem, dict) and mem.get("total"):
        lines.append(f"kernel memory: the maps took {mem['total'] / 2**20:.1f} MB "
                     f"(the kernel's count) at {mem.get('possible_cpus')} possible CPUs")
    lost = {k: v for k, v in t["losses"].items() if v}
    lines.append(f"contended waits {t['waits_paired']}  samples {t['samples']}  "
                 f"losses {', '.join(f'{k}={v}' for k, v in lost.items()) or 'none'}" +
                 (f"  begins whose end never came {t['begins_unended']}"
                  if t["begins_unended"] else ""))
    if t["nested_waits"]:
        lines.append(f"nested waits {t['nested_waits']} ({fmt_ns(t['nested_ns'])}): begun "
                     "inside another wait of their task (a mutex's wait_lock, an interrupt); "
                     "counted by lock, their time not added again to per-VM or per-vCPU "
                     f"totals; {t['irq_waits']} waits in interrupt context")
    stuck = locks.waits_in_progress(rec)
    if not stuck.empty:
        since = fmt_ns(m.get("in_progress_min_ns", float("nan")))
        lines.append(f"{len(stuck)} waits still in progress at the stop, begun at least "
                     f"{since} before (a deadlock, or a very long wait):")
        lines += [f"  tid {r.tid} ({r.comm}, pid {r.tgid}) waiting {fmt_ns(r.age_ns)} on "
                  f"{r.lock} ({r.type}) from {r.caller}" for r in stuck.head(20).itertuples()]
    if vcpus.note(rec):
        lines.append(vcpus.note(rec))
    w = m.get("work")
    if w:
        lines.append(f"workload pid {w.get('pid')}: {w.get('exits_total')} exits "
                     f"({', '.join(f'{x:.0f}' for x in w.get('exits_per_s_per_vcpu', []))}"
                     f" /s per vCPU), {w.get('churn_ops')} memslot ops "
                     f"({w.get('churn_ops_per_s', 0):.0f}/s)")
    return lines


def _cost_text(c):
    """A function probe's measured cost (record's cost window, bpf_stats)."""
    if not isinstance(c, dict) or not c.get("ns_per_call"):
        return ""
    return (f": {c['calls_per_s']:,.0f} calls/s, {fmt_ns(c['ns_per_call'])} a call, "
            f"{c['cpu_share']:.2%} of a CPU")


def resolution_line(manifest):
    """What kvmlockprof's own handlers add to each wait it times, as measured."""
    h = manifest.get("handler_ns") or {}
    begin, end = (h.get(tp) if isinstance(h.get(tp), dict) else {}
                  for tp in ("contention_begin", "contention_end"))
    if begin.get("ns_per_run") is None:
        return None
    return (f"resolution: every wait includes kvmlockprof's contention_begin handler, "
            f"at most {fmt_ns(begin['ns_per_run'])} on average (its stack walks, outside the "
            f"waits, counted in this average; contention_end "
            f"{fmt_ns(end.get('ns_per_run') or float('nan'))}), measured by bpf_stats over "
            f"{begin.get('runs')} runs")


def _walked_share(rec):
    aggs = rec.aggregates
    if aggs.empty or not aggs["count"].sum():
        return 1.0
    return 1 - aggs.loc[aggs["stack_id"] == locks.NO_STACK, "count"].sum() / \
        aggs["count"].sum()


def table_text(df, by):
    # the lock column as wide as its longest name (within reason)
    w = min(max([24] + [len(str(n)) for n in df.get("lock", [])]), 64)
    head = (f"{'contended':>10} {'total wait':>11} {'max wait':>10} {'avg wait':>10} "
            f"{'p50':>11} {'p99':>11} {'type':>11}  {'lock':<{w}} {'kvm':>3}  "
            f"{ {'process': 'process', 'thread': 'thread'}.get(by, 'caller')}")
    lines = [head]
    for r in df.itertuples(index=False):
        bound = not r.pct_exact
        who = f"{r.vm} ({r.tgid})" if by == "process" else \
            f"{r.comm} ({r.tid}, {r.vm})" if by == "thread" else r.caller
        n = ("~" if getattr(r, "estimated", False) else "") + str(r.contended)
        lines.append(f"{n:>10} {fmt_ns(r.total_ns):>11} {fmt_ns(r.max_ns):>10} "
                     f"{fmt_ns(r.avg_ns):>10} {fmt_ns(r.p50_ns, bound):>11} "
                     f"{fmt_ns(r.p99_ns, bound):>11} {r.type:>11}  {r.lock:<{w}} "
                     f"{'K' if r.kvm else '':>3}  {who}")
        if getattr(r, "owner", ""):
            share = f"{r.owner_share:.0%}" if r.owner_share == r.owner_share else "?"
            at = getattr(r, "owner_where", "")
            at = f" at {' -> '.join(at.split(' -> ')[-2:])}" if at else ""
            lines[-1] += f"  [{share} behind {r.owner}{at}]"
    return lines


def ns_columns(df):
    """The columns that hold nanoseconds (printed with fmt_ns)."""
    return [c for c in df.columns if c.endswith(("_ns", "_ns_bound"))]


def _frame_text(df, hex_columns=()):
    df = df.copy()
    ns = ns_columns(df)
    for c in df.columns:
        if c in ns:
            df[c] = [fmt_ns(v) for v in df[c]]
        elif c in hex_columns and pd.api.types.is_integer_dtype(df[c]):
            df[c] = [f"{v:#x}" for v in df[c]]
        elif c.endswith(("ratio", "share")):
            df[c] = [f"{v:.1%}" if v == v else "-" for v in df[c]]
    return df.to_string(index=False)


def probe_text(rec, probe, limit=20, verbose=False):
    """Just one probe's sections (`report --order`: lockorder's), text."""
    lines = summary_lines(rec, verbose)
    parts = [(sec, sec.frame(rec)) for sec in probe_sections(probe)]
    for sec, part in parts:
        lines += ["", sec.title, _frame_text(part.head(limit), sec.hex) if part is not None
                  and not part.empty else "(none)"]
    st = (rec.manifest.get("probes") or {}).get(probe, {})
    if st.get("status") != "attached":
        why = f": {st['reason']}" if st.get("reason") else ""
        lines += ["", f"probe {probe} was not attached in this recording "
                  f"({st.get('status', 'not requested')}{why})"]
    return "\n".join(lines) + "\n"


def sampled_line(rec, by, tids):
    """What a table from the samples (-t, --tid) is, or None for the aggregates'."""
    if by != "thread" and not tids:
        return None
    every, lost = locks.sampling(rec)
    who = f"threads {', '.join(map(str, tids))}" if tids else "per thread"
    how = "exact: every wait was sampled and none lost" if every == 1 and not lost else \
        f"scaled (~): 1 wait in {every} sampled, {lost} lost to a full ring buffer; " \
        "scaled to each process's in-kernel totals"
    return f"{who}: from the sampled waits ({how})"


class NoOwners(ValueError):
    """--by owner of a recording made without --lock-owner."""


def owner_text(rec, df, verbose=False):
    lines = summary_lines(rec, verbose) + ["", f"{'waits':>10} {'wait caused':>12} {'locks':>5}  "
                                  f"{'owner':<28} {'vm':<16} behind most"]
    for r in df.itertuples(index=False):
        share = f"{r.lock_share:.0%}" if r.lock_share == r.lock_share else "-"
        lines.append(f"{r.waits:>10} {fmt_ns(r.wait_ns):>12} {r.locks:>5}  {r.owner:<28} "
                     f"{r.vm:<16} {r.lock} ({share} of its wait time)")
    if df.empty:
        lines.append("(no wait began while a mutex or write-held rwsem had an owner)")
    lines.append("owner: the task holding the mutex or write-held rwsem as each wait began "
                 "(its owner word); a reader-held rwsem and spinlocks name none")
    return "\n".join(lines) + "\n"


def render_owners(rec, sort="total", limit=20, fmt="text", pids=None, verbose=False):
    """`report --by owner`: a row per owner thread (analysis.owners.by_owner); pids:
    only owners of these processes."""
    if not owners.recorded(rec):
        raise NoOwners(f"{rec.path} was recorded without --lock-owner: record with "
                       "--lock-owner for --by owner")
    df = owners.by_owner(rec, sort=sort, owner_pids=pids)
    df = df.head(limit) if limit else df
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return json.dumps({"manifest": rec.manifest, "rows": json.loads(
            df.to_json(orient="records", double_precision=15))}, indent=1)
    return owner_text(rec, df, verbose)


def with_owner(rec, df, by):
    """A lock table with its heaviest owner and that owner's share of the lock's wait
    time (owner, owner_share), when the recording has owners (--lock-owner)."""
    if by != "lock" or not owners.recorded(rec) or df.empty:
        return df
    top, at = owners.heaviest(rec), owners.slept_at(rec)
    who = [top.get(n, ("", float("nan")))[0] for n in df["lock"]]
    return df.assign(owner=who,
                     owner_share=[top.get(n, ("", float("nan")))[1] for n in df["lock"]],
                     owner_where=[at.get((n, o), "") for n, o in zip(df["lock"], who)])


def render(rec, by="lock", sort="total", limit=20, stacks=False, fmt="text", pids=None,
           filters=None, tids=None, verbose=False):
    if by == "owner":
        return render_owners(rec, sort=sort, limit=limit, fmt=fmt, pids=pids, verbose=verbose)
    df = with_owner(rec, locks.top(rec, by=by, sort=sort, limit=limit, pids=pids,
                                   filters=filters, tids=tids), by)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return json.dumps({"manifest": rec.manifest, **({"tids": tids} if tids else {}),
                           "rows": json.loads(df.to_json(orient="records",
                                                      double_precision=15))},
                      indent=1)
    sampled = sampled_line(rec, by, tids)
    lines = summary_lines(rec, verbose) + ([sampled] if sampled else []) + [""] + \
        table_text(df, by)
    if df.empty:
        lines.append("(nothing matches the filters)" if filters and any(filters.values())
                     else f"(no sampled wait of thread {', '.join(map(str, tids))})" if tids
                     else "(no contention recorded)")
    if stacks:
        for i, row in df.iterrows():
            for sid, frames in locks.top_stacks(rec, row, by=by):
                lines.append("")
                lines.append(f"#{i + 1} {row['lock']} {row['type']}  stack {sid}:")
                lines += [f"   {'K' if locks.is_kvm_frame(f) else ' '} {f}" for f in frames]
    for sec in probe_sections():
        part = sec.frame(rec)
        if part is not None and not part.empty:
            lines += ["", sec.title, _frame_text(part.head(limit), sec.hex)]
    if any(not x for x in df.get("pct_exact", [])):
        lines.append("")
        lines.append("<= : a log2 histogram bucket bound (not every wait of the row was sampled)")
    if df.get("estimated", pd.Series(dtype=bool)).any():
        lines.append("~ : an estimate: the sampled waits, scaled to their process's totals"
                     if sampled else "~ : an estimate: this caller's walked stacks, scaled "
                     "up by the waits of its lock that had no stack walked")
    lines.append("K : the stack goes through KVM")
    return "\n".join(lines) + "\n"
