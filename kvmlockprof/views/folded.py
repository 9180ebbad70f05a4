"""Folded stacks (Brendan Gregg's format, one `root;...;leaf value` line per stack),
which flamegraph.pl, inferno and speedscope read: `report --format folded`.

A line is the process (its VM name), the kernel stack outermost first down to the
caller of the lock (the lock machinery's own frames left out), and the lock with its
type as the leaf; its value is the wait time in ns or the number of waits, from the
in-kernel aggregates (every wait, not only the sampled ones). Waits whose stack was
not walked (--stack-every, the stack budget) are spread over their lock's walked
stacks, as `report --by caller` does, so each lock's total stays exact.
`compare --format folded` writes the two-column differential form
(`stack base new`, as difffolded.pl makes for flamegraph.pl), its locks named as
compare matches them across runs (no pid, no address)."""

from kvmlockprof.analysis import locks
from kvmlockprof.analysis.compare import lock_across_runs
from kvmlockprof.lazy import np

VALUES = {"wait": "total_ns", "count": "count"}


def _clean(frame):
    """A frame as one folded token: `;` splits frames (the value follows the last
    space, so spaces inside a frame, as in `kvm_set_memslot+0x32 [kvm]`, stay)."""
    return frame.replace(";", ":").replace("\n", " ")


def stacks(rec, value="wait", pids=None, filters=None, matched=False):
    """{folded stack: value} of a recording (filters: -L/-Y/-S, locks.apply_filters);
    matched: locks named as compare matches them (a differential graph's sides meet)."""
    aggs = locks.annotated_aggregates(rec)
    if aggs.empty:
        return {}
    if pids:
        aggs = aggs[aggs["tgid"].isin(pids)]
    aggs = locks.apply_filters(rec, aggs, **(filters or {}))
    if aggs.empty:
        return {}
    aggs = locks.spread_unwalked(aggs)
    st = locks.stacks_of(rec)
    paths = {}
    for sid, frames, lockf in zip(st["stack_id"], st["frames"], st["lock_frame"]):
        kept = [_clean(f) for f, lk in zip(frames, lockf) if not lk] or \
            [_clean(f) for f in list(frames)[:1]]
        paths[int(sid)] = ";".join(reversed(kept))
    vm = locks.vm_labels(rec)
    out = {}
    col = VALUES[value]
    for tgid, sid, lock, typ, v in zip(aggs["tgid"].tolist(), aggs["stack_id"].tolist(),
                                      aggs["lock"].astype(str).tolist(),
                                      aggs["type"].astype(str).tolist(),
                                      aggs[col].to_numpy(np.float64).tolist()):
        path = paths.get(int(sid), "[stack not sampled]" if sid == locks.NO_STACK
                         else "[no stack]")
        lock = lock_across_runs(lock) if matched else lock
        key = f"{_clean(str(vm.get(tgid, tgid)))};{path};{_clean(f'{lock} ({typ})')}"
        out[key] = out.get(key, 0.0) + v
    return out


def text(rec, value="wait", pids=None, filters=None):
    lines = [f"{k} {round(v)}" for k, v in sorted(stacks(rec, value, pids, filters).items())
             if round(v) > 0]
    return "\n".join(lines) + ("\n" if lines else "")


def diff_text(base, new, value="wait"):
    """Two-column folded stacks (`stack base new`), each side summed over its runs
    and divided by the number of runs (a mean run: sides of 3 and 5 runs compare)."""
    sides = []
    for recs in (base, new):
        total = {}
        for rec in recs:
            for k, v in stacks(rec, value, matched=True).items():
                total[k] = total.get(k, 0.0) + v / len(recs)
        sides.append(total)
    keys = sorted(set(sides[0]) | set(sides[1]))
    lines = [f"{k} {round(sides[0].get(k, 0))} {round(sides[1].get(k, 0))}" for k in keys]
    return "\n".join(lines) + ("\n" if lines else "")
