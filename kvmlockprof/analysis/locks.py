"""Analysis on recordings: functions that take a Recording or DataFrames and return
DataFrames (one row per event in, one row per group out), as in LISA."""
import re

from kvmlockprof import cdefs
from kvmlockprof.lazy import np, pd
from kvmlockprof.locktypes import (  # noqa: F401 (the analyses' API)
    LCB_F_MUTEX, LCB_F_PERCPU, LCB_F_READ, LCB_F_RT, LCB_F_SPIN, LCB_F_WRITE, LOCK_TYPES,
    lock_class, lock_matches, type_matches, type_name)
from kvmlockprof.quantiles import (  # noqa: F401 (the analyses' API)
    QUANTILE_METHOD, hist_bounds, hist_buckets, hist_quantile, quantile_index, quantiles)
from kvmlockprof.recording.filters import read_filters

# KVM's own functions (built in or in kvm*.ko): how a stack is known to go through KVM.
KVM_FRAME = re.compile(r"^(__)?(kvm|vcpu|vmx|svm|pvm|tdp_mmu|x86_emulate|mmu_(?!notifier))"
                       r"|\[kvm(_\w+)?\]")

NO_STACK = cdefs.define("contention.h", "KVMLP_NO_STACK")  # no stack walked (--stack-every/-budget)

# The column a `by` grouping names a row with (top() also splits locks by type).
GROUP_COLUMN = {"lock": "lock", "address": "lock_addr", "caller": "caller",
                "process": "tgid", "thread": "tid"}
SORT_KEYS = {"contended": "contended", "total": "total_ns", "max": "max_ns", "avg": "avg_ns",
             "min": "min_ns", "p50": "p50_ns", "p90": "p90_ns", "p99": "p99_ns"}
QUANTILES = {"p50_ns": 0.50, "p90_ns": 0.90, "p99_ns": 0.99}
GROUPS = ("lock", "address", "caller", "process", "thread")   # address, thread: perf's -l, -t


def _labels(codes, uniq, fn):
    """A Categorical of fn(value) for factorized values (codes, uniq): one Python
    call per distinct lock, flags or stack, not per wait, and no string per row.
    fn may return None (missing) or the same label for several values."""
    lcodes, cats = pd.factorize(pd.Series([fn(u) for u in uniq.tolist()], dtype=object))
    lcodes = np.append(lcodes, -1)          # code -1 (a missing value) stays missing
    # the narrowest codes before indexing: one small array per row, not two big ones
    lcodes = lcodes.astype(np.min_scalar_type(-max(len(cats), 1)))
    return pd.Categorical.from_codes(lcodes[codes], cats)


def _by_unique(values, fn):
    return _labels(*pd.factorize(np.asarray(values)), fn)


def lock_type(flags):
    """perf's lock type name for each LCB_F_* flags value."""
    return pd.Series(_by_unique(flags, type_name)).astype(object)


def is_kvm_frame(frame):
    return bool(KVM_FRAME.search(frame))


def caller_frame(frames, lock_frame):
    """The first frame outside the lock machinery (the innermost if all are in it)."""
    return next((f for f, lk in zip(frames, lock_frame) if not lk),
                frames[0] if len(frames) else "?")


def stack_info(stacks):
    """Per stack_id: the caller (first frame outside the lock machinery), whether
    the stack goes through KVM, and its frames."""
    if stacks is None or stacks.empty:
        return pd.DataFrame(columns=["caller", "kvm", "frames"],
                            index=pd.Index([], name="stack_id"))
    callers, kvm = [], []
    for frames, lockf in zip(stacks["frames"], stacks["lock_frame"]):
        frames = list(frames)
        callers.append(caller_frame(frames, lockf))
        kvm.append(any(is_kvm_frame(f) for f in frames))
    return pd.DataFrame({"caller": callers, "kvm": kvm, "frames": list(stacks["frames"])},
                        index=pd.Index(stacks["stack_id"].astype(int), name="stack_id"))


def _label_rules(info, lock_names):
    """Each label column as a function of one raw sample column:
    {label: (raw column, fn(raw value))}, stated once for whole tables and chunks."""
    callers, kvm = info["caller"].to_dict(), info["kvm"].to_dict()

    def caller(s):
        return callers.get(int(s), "[stack not sampled]" if s == NO_STACK else "[no stack]")
    return {"type": ("flags", type_name), "caller": ("stack_id", caller),
            "kvm": ("stack_id", lambda s: bool(kvm.get(int(s), False))),
            "lock_name": ("lock_addr", lambda a: lock_names.get(f"{int(a):#x}")),
            "lock": ("lock_addr", lambda a: lock_names.get(f"{int(a):#x}", f"{int(a):#x}")),
            "tgid": ("tgid", int)}


def with_stack_columns(df, info, lock_names):
    """type, caller, kvm, lock_name and lock columns (Categoricals; kvm a bool
    array) for each row."""
    df = df.copy(deep=False)                # copy-on-write: new columns only
    factorized = {}
    for label, (col, fn) in _label_rules(info, lock_names).items():
        if col == label:
            continue
        codes, uniq = factorized.setdefault(col, pd.factorize(df[col].to_numpy()))
        df[label] = np.append([fn(u) for u in uniq.tolist()], False)[codes] \
            if label == "kvm" else _labels(codes, uniq, fn)
    return df


def stacks_of(rec, source="contention"):
    """The stacks of one BPF module (stack ids are per module)."""
    st = rec.stacks
    if "source" in st.columns:
        st = st[st["source"] == source]
    return st


def contention_stacks(rec):
    """stack_info() of the contention stacks, computed once per recording."""
    return rec.derived("contention_stacks", lambda: stack_info(stacks_of(rec)))


# The sample columns top() and the reports built on it read.
TOP_SAMPLE_COLUMNS = ("wait_ns", "lock_addr", "flags", "stack_id", "tgid", "tid", "comm")


def annotate(rec, columns=None):
    """(aggregates, samples) with type, caller, kvm and lock name columns added
    (computed once per recording; treat them as read-only). columns: the sample
    columns needed, when not all (a big recording loads faster)."""
    if columns is None or rec.has_derived("annotated"):
        return rec.derived("annotated", lambda: _annotate(rec))
    return rec.derived(("annotated", tuple(columns)), lambda: _annotate(rec, columns))


def annotated_aggregates(rec):
    """annotate()'s aggregates alone (no sample is read)."""
    for key in ("annotated", ("annotated", TOP_SAMPLE_COLUMNS)):
        if rec.has_derived(key):
            return rec.derived(key, None)[0]

    def compute():
        aggs = rec.aggregates
        return aggs if aggs.empty else recorded_filters(
            rec, with_stack_columns(aggs, contention_stacks(rec), lock_names(rec)))
    return rec.derived("annotated_aggregates", compute)


def recorded_filters(rec, df):
    """df kept by the filters `record` left to the reader (a -L name glob, -S: see
    recording.filters), so every view of a recording shows the waits it asked for."""
    f = read_filters(rec.manifest)
    return apply_filters(rec, df, **f) if any(f.values()) else df


def _annotate(rec, columns=None):
    info = contention_stacks(rec)
    names = lock_names(rec)
    aggs = rec.aggregates
    samples = rec.table("contention", columns)
    if not aggs.empty:
        aggs = recorded_filters(rec, with_stack_columns(aggs, info, names))
    if not samples.empty:
        samples = recorded_filters(rec, with_stack_columns(samples, info, names))
    return aggs, samples


def spread_unwalked(aggs):
    """Aggregates with the waits whose stack was not walked (--stack-every, or
    past the per-CPU stack budget) spread over the walked stacks of the same
    lock, flags and process, each walked row taking the share of its walked count:
    count, histogram and (by the walked totals) total_ns, so a lock's sums stay
    exact and each caller gets an estimate (`estimated` True) whose percentile
    bounds count every wait. min/max of such a row become the envelope of its own
    and the unwalked waits' (a caller's true min is not below it, nor its max above).
    An unwalked row whose group has no walked stack stays, as "[stack not sampled]".
    Without unwalked rows the aggregates come back as they are (exact)."""
    unwalked = (aggs["stack_id"] == NO_STACK).to_numpy()
    if not unwalked.any():              # (spread already: its estimates stay marked)
        return aggs if "estimated" in aggs.columns else aggs.assign(estimated=False)
    group, index = group_codes(aggs, ["lock_addr", "flags", "tgid"])

    def sums(col):          # per row: its value, and its group's walked and whole sums
        v = aggs[col].to_numpy(np.float64)
        return v, np.bincount(group, np.where(unwalked, 0.0, v))[group], \
            np.bincount(group, v)[group]
    out = aggs.copy(deep=False)
    n, n_walked, n_all = sums("count")
    t, t_walked, t_all = sums("total_ns")
    spread = n_walked > 0                    # the group has walked stacks to spread over
    with np.errstate(invalid="ignore", divide="ignore"):
        fn = np.where(unwalked, 0.0, n_all / n_walked)
        ft = np.where(t_walked > 0, np.where(unwalked, 0.0, t_all / t_walked), fn)
        share = np.where(unwalked | ~spread, 0.0, n / n_walked)   # of the unwalked waits
    out["count"] = np.where(spread, n * fn, n)
    out["total_ns"] = np.where(spread, t * ft, t)
    into = ~unwalked & spread & (n_all != n_walked)
    out["estimated"] = into
    hist = np.stack(aggs["hist"].to_numpy()).astype(np.float64)
    uhist = np.zeros((len(index), hist.shape[1]))
    np.add.at(uhist, group[unwalked], hist[unwalked])
    out["hist"] = list(hist + uhist[group] * share[:, None])
    if "min_ns" not in aggs.columns:        # (a table of counts alone)
        return out[~(unwalked & spread)]
    big = np.iinfo(np.int64).max
    umin = np.full(len(index), big)
    np.minimum.at(umin, group[unwalked], aggs["min_ns"].to_numpy(np.int64)[unwalked])
    umax = np.zeros(len(index), np.int64)
    np.maximum.at(umax, group[unwalked], aggs["max_ns"].to_numpy(np.int64)[unwalked])
    mn, mx = aggs["min_ns"].to_numpy(np.int64), aggs["max_ns"].to_numpy(np.int64)
    out["min_ns"] = np.where(into, np.minimum(mn, umin[group]), mn)
    out["max_ns"] = np.where(into, np.maximum(mx, umax[group]), mx)
    return out[~(unwalked & spread)]


def apply_filters(rec, df, locks=(), types=(), callstacks=()):
    """Annotated aggregates or samples kept by -L/-Y/-S (perf's letters): each given
    list must match (a lock of it, a type of it, a frame containing one of its names).
    With -S, aggregated waits whose stack was not walked are first spread over their
    lock's walked stacks (spread_unwalked: `estimated`), as `--by caller` does; a
    sample without a walked stack is dropped."""
    if df.empty or not (locks or types or callstacks):
        return df
    if callstacks and "hist" in df.columns:
        df = spread_unwalked(df)
    keep = np.ones(len(df), bool)
    if locks:
        a = df["lock_addr"].to_numpy()
        uniq, inv = np.unique(a, return_inverse=True)
        names = lock_names(rec)
        ok = np.array([lock_matches(locks, u, names.get(f"{int(u):#x}", f"{int(u):#x}"))
                       for u in uniq.tolist()], bool)
        keep &= ok[inv]
    if types:
        # per distinct type (a Categorical's few), not per wait
        matching = [t for t in pd.unique(df["type"]) if type_matches(types, str(t))]
        keep &= df["type"].isin(matching).to_numpy(bool)
    if callstacks:
        st = stacks_of(rec)
        hit = {int(s) for s, frames in zip(st["stack_id"], st["frames"])
               if any(c in f for f in frames for c in callstacks)}
        keep &= df["stack_id"].isin(hit).to_numpy()
    return df[keep]


def lock_names(rec):
    """{hex address: name}: kallsyms data symbols, and the KVM-aware names
    (`kvm(1234)->mmu_lock`; how each was derived is in manifest["lock_names"])."""
    m = rec.manifest
    names = dict(m.get("lock_symbols") or {})
    names.update({a: v["name"] for a, v in (m.get("lock_names") or {}).items()})
    return names


def group_keys(by):
    if by not in GROUPS:
        raise ValueError(f"--by must be one of {', '.join(GROUPS)}")
    return {"lock": ["lock", "type"], "address": ["lock_addr", "type"], "caller": ["caller"],
            "process": ["tgid"], "thread": ["tid"]}[by]


# Above this many samples top() reads them chunk by chunk, twice (exact percentiles in
# memory bounded by a chunk and the waits near each percentile), not all at once:
# 10 M samples loaded take ~1 GB.
STREAM_SAMPLES = 2_000_000
FINE_BITS = 6       # the first pass's bins: 2^6 per octave, each 1.1% wide
DENSE_CELLS = 1 << 22   # rows x bins counted in one array (32 MiB) rather than sorted


def streamed(rec):
    """Whether a recording's samples are read chunk by chunk (report, compare)."""
    return rec.manifest.get("samples", 0) > STREAM_SAMPLES and not rec.in_memory("contention")


def group_positions(df, keys, position):
    """position(group key) for each row (-1: none): one call per distinct group."""
    codes, groups = group_codes(df, keys)
    return np.array([position(g) for g in groups.tolist()], np.int64)[codes]


POSITIONS_BYTES = 32 << 20      # positions kept between passes over a big recording


class Positioned:
    """A big recording's samples chunk by chunk, each row with position(key), key its
    values of the label columns `keys` (as group_positions gives them; -1: none),
    for passes over them: passes(columns) yields (positions, chunk of `columns`).
    The positions come from the raw columns the labels follow from (_label_rules),
    position called once per distinct raw key (a cache), no label column built;
    rows whose `where` column (column, values) is not in values get -1. The first
    pass keeps the positions (the narrowest integers) while all of them fit
    POSITIONS_BYTES, and a later pass then reads only the columns it asks for."""

    def __init__(self, rec, keys, position, where=None):
        self.rec, self.where, self.kept, self.cache = rec, where, None, {}
        rules = {k: (k, lambda v: v) for k in keys}         # a raw column: itself
        rules.update(_label_rules(contention_stacks(rec), lock_names(rec)))
        self.raw = list(dict.fromkeys(rules[k][0] for k in keys))
        at = [self.raw.index(rules[k][0]) for k in keys]

        def label(values):
            values = values if len(self.raw) > 1 else (values,)
            key = tuple(rules[k][1](values[i]) for k, i in zip(keys, at))
            return position(key if len(keys) > 1 else key[0])
        self.label = label

    def positions(self, df):
        cache, label = self.cache, self.label
        pos = group_positions(df, self.raw, lambda g: cache[g] if g in cache else
                              cache.setdefault(g, label(g)))
        if self.where:
            pos[~df[self.where[0]].isin(self.where[1]).to_numpy()] = -1
        return pos

    def __call__(self, columns):
        if self.kept is not None:           # (read to its end: the checksums are checked)
            for i, df in enumerate(self.rec.chunks("contention", list(columns))):
                yield self.kept[i].astype(np.int64), df     # (callers compute with them)
            return
        extra = [self.where[0]] if self.where else []
        kept, size = [], 0
        for df in self.rec.chunks("contention",
                                  list(dict.fromkeys([*columns, *self.raw, *extra]))):
            pos = self.positions(df)
            if kept is not None:
                kept.append(pos.astype(np.min_scalar_type(-int(pos.max(initial=0)) - 1)))
                size += kept[-1].nbytes
                kept = kept if size <= POSITIONS_BYTES else None
            yield pos, df
        self.kept = kept


def _fine_bins(v):
    """A bin per value, non-decreasing in it: 0 for 0, then 2^FINE_BITS per octave."""
    m, e = np.frexp(v.astype(np.float64))
    sub = ((m * 2 - 1) * (1 << FINE_BITS)).astype(np.int64)
    return np.where(v > 0, e.astype(np.int64) * (1 << FINE_BITS) + sub + 1, 0)


def streamed_quantiles(chunks, nrows, qs):
    """The quantiles qs (QUANTILE_METHOD) of each row's values, as an (nrows, len(qs)) array,
    and each row's count: exact, from chunks of (row per value, -1 for none; values)
    given twice (a callable returning a fresh iterator). The first pass counts values
    per fine bin (1.1% wide), which says the bin of each order statistic a quantile
    needs; the second keeps only the values in those bins. Memory: the bins' counts
    and those values, never all values."""
    nb = 66 << FINE_BITS
    keys, counts = np.array([], np.int64), np.array([], np.int64)
    dense = np.zeros(nrows * nb, np.int64) if nrows * nb <= DENSE_CELLS else None
    for rows, v in chunks():
        ok = rows >= 0
        cell = rows[ok] * nb + _fine_bins(v[ok])
        if dense is not None:           # a count per cell: no sort
            dense += np.bincount(cell, minlength=len(dense))
            continue
        k, c = np.unique(cell, return_counts=True)
        keys, inv = np.unique(np.concatenate([keys, k]), return_inverse=True)
        counts = np.bincount(inv, weights=np.concatenate([counts, c]),
                             minlength=len(keys)).astype(np.int64)
    if dense is not None:
        keys = np.flatnonzero(dense)
        counts = dense[keys]
    row_of_key = keys // nb
    n = np.bincount(row_of_key, weights=counts, minlength=nrows).astype(np.int64)
    out = np.full((nrows, len(qs)), np.nan)
    if not len(keys):
        return out, n
    cum = np.cumsum(counts)
    start = np.concatenate([[0], np.cumsum(n)])[:-1]        # global rank of a row's first
    has = n > 0
    # the global rank of each row's quantile: its first value's plus its own rank
    ranks = quantile_index(n[has, None], np.asarray(qs)[None, :]) + start[has][:, None]
    at = np.searchsorted(cum, ranks, side="right")          # the key holding each rank
    within = ranks - (cum[at] - counts[at])
    wanted = np.unique(keys[at])
    got_k, got_v = [], []
    for rows, v in chunks():
        ok = rows >= 0
        k = rows[ok] * nb + _fine_bins(v[ok])
        m = np.isin(k, wanted)
        got_k.append(k[m])
        got_v.append(v[ok][m])
    got_k, got_v = np.concatenate(got_k), np.concatenate(got_v)
    order = np.lexsort((got_v, got_k))
    got_k, got_v = got_k[order], got_v[order]
    first = np.searchsorted(got_k, keys[at])
    val = got_v[first + within].astype(np.float64)
    out[has] = val
    return out, n


def top(rec, by="lock", sort="total", limit=None, pids=None, filters=None, tids=None):
    """perf-lock-contention-style table: one row per lock, caller or task.

    count/total/max/min come from the in-kernel aggregates (nothing lost to the
    ring buffer); p50/p99 (nearest rank) are exact where the samples of
    a row are complete, else the upper bound of a log2 bucket (`pct_exact` False).
    By caller, waits whose stack was not walked are spread over their lock's walked
    callers (spread_unwalked: `estimated` True). filters: apply_filters()'s
    {locks, types, callstacks} (perf's -L/-Y/-S). By thread, or with tids (perf's
    --tid), the table comes from the samples (_from_samples)."""
    chunked = streamed(rec)
    keys = group_keys(by)
    cols = ["contended", "total_ns", "max_ns", "min_ns", "avg_ns", "p50_ns", "p90_ns",
            "p99_ns", "pct_exact", "type", "lock", "caller", "tgid", "comm", "vm", "kvm",
            "estimated"] + {"address": ["lock_addr"], "thread": ["tid"]}.get(by, [])
    if by == "thread" or tids:      # (reads every sample, even of a big recording)
        return _from_samples(rec, by, sort, limit, pids, tids, filters, cols)
    aggs, samples = (annotated_aggregates(rec), pd.DataFrame()) if chunked else \
        annotate(rec, TOP_SAMPLE_COLUMNS)
    if aggs.empty:
        return pd.DataFrame(columns=cols)
    if pids:
        aggs = aggs[aggs["tgid"].isin(pids)]
        samples = samples[samples["tgid"].isin(pids)] if not samples.empty else samples
    if filters and any(filters.values()):
        aggs, samples = (apply_filters(rec, d, **filters) for d in (aggs, samples))
        if aggs.empty:
            return pd.DataFrame(columns=cols)
    aggs = spread_unwalked(aggs) if by == "caller" else \
        aggs if "estimated" in aggs.columns else aggs.assign(estimated=False)
    comm = _comm_by_tgid(rec)
    g = aggs.groupby(keys, sort=False)
    out = g.agg(contended=("count", "sum"), total_ns=("total_ns", "sum"),
                max_ns=("max_ns", "max"), min_ns=("min_ns", "min"), kvm=("kvm", "any"),
                estimated=("estimated", "any"))
    for c in ("contended", "total_ns"):                 # estimates: whole waits and ns
        out[c] = out[c].round().astype(np.int64)
    # The row's dominant lock/caller/task: the one with the most wait in the group.
    # (a known stack before "[stack not sampled]", whatever their weights)
    weight = aggs["total_ns"].astype("float64").where(aggs["stack_id"] != NO_STACK, -1.0)
    dom = aggs.loc[weight.groupby([aggs[k] for k in keys], sort=False,
                                  observed=True).idxmax()].set_index(keys)
    for c in ("type", "lock", "caller", "tgid"):
        if c not in keys:
            out[c] = dom[c]
    out = out.reset_index()
    if by == "address":             # a lock's name where it has one, else its address
        out["lock"] = _address_labels(out)
    out["avg_ns"] = out["total_ns"] / out["contended"]
    # (object: an empty mapping would give float NaNs, which refuse a str fill)
    out["comm"] = out["tgid"].map(comm).astype(object).fillna("?")
    out["vm"] = out["tgid"].map(vm_labels(rec)).astype(object).fillna(out["comm"])
    # (a filtered big recording: the log2 bounds of the filtered aggregates, as the
    # streamed samples are not filtered)
    exact = None if chunked and filters and any(filters.values()) else \
        _streamed_percentiles(rec, out, keys, pids) if chunked else \
        _sample_percentiles(samples, keys)
    out = _percentiles(out, keys, exact, g["hist"])
    if sort not in SORT_KEYS:
        raise ValueError(f"--sort must be one of {', '.join(SORT_KEYS)}")
    out = out.sort_values(SORT_KEYS[sort], ascending=False, kind="stable")
    if limit:
        out = out.head(limit)
    return out[cols].reset_index(drop=True)


def sampling(rec):
    """(1 in how many waits was streamed, waits lost to a full ring buffer): a table
    from the samples is exact only when (1, 0)."""
    m = rec.manifest
    every = int((m.get("probes", {}).get("contention") or {}).get("sample_every") or 1)
    return every, (m.get("losses") or {}).get("lost_ringbuf_full", 0)


def sample_weights(rec, samples, aggs):
    """(waits, wait ns, estimated): what each sample stands for. 1 and 1, exact, when
    every wait was streamed and none lost; else, per process, its aggregates' waits
    and wait time over its samples' (the aggregates are complete per process): a
    view from the samples (per thread, per time bin) then adds up to the process's
    aggregates under --sample-every N or ring-buffer losses."""
    every, lost = sampling(rec)
    if every == 1 and not lost:
        return np.ones(len(samples)), samples["wait_ns"].to_numpy(np.float64), False
    a = aggs.groupby("tgid")[["count", "total_ns"]].sum() if not aggs.empty else \
        pd.DataFrame(columns=["count", "total_ns"], dtype=np.float64)
    s = samples.groupby("tgid", observed=True)["wait_ns"].agg(["size", "sum"])
    per = pd.DataFrame({"n": (a["count"] / s["size"]), "t": a["total_ns"] / s["sum"]}
                       ).reindex(s.index).astype(np.float64)
    per["n"] = per["n"].fillna(float(every))     # (a process without aggregates)
    per["t"] = per["t"].where(np.isfinite(per["t"]), per["n"])
    tgid = samples["tgid"].to_numpy()
    return per["n"].reindex(tgid).to_numpy(), \
        samples["wait_ns"].to_numpy(np.float64) * per["t"].reindex(tgid).to_numpy(), True


def _from_samples(rec, by, sort, limit, pids, tids, filters, cols):
    """perf's -t (a row per thread) and --tid (only these threads' waits): from the
    samples, as the aggregates are per process: exact when every wait was streamed
    (--sample-every 1, no ring buffer loss), else scaled (sample_weights) and marked
    `estimated`. By caller, a wait whose stack was not walked stays under
    "[stack not sampled]" (only the aggregates can spread it)."""
    aggs, samples = annotate(rec, TOP_SAMPLE_COLUMNS)
    if samples.empty:
        return pd.DataFrame(columns=cols)
    if pids:
        samples = samples[samples["tgid"].isin(pids)]
        aggs = aggs[aggs["tgid"].isin(pids)]
    if filters and any(filters.values()):
        samples, aggs = (apply_filters(rec, d, **filters) for d in (samples, aggs))
    n, t, estimated = sample_weights(rec, samples, aggs)     # (before --tid: per process)
    samples = samples.assign(_n=n, _t=t)
    if tids:
        samples = samples[samples["tid"].isin(tids)]
    if samples.empty:
        return pd.DataFrame(columns=cols)
    keys = group_keys(by)
    g = samples.groupby(keys, sort=False, observed=True)
    out = g.agg(contended=("_n", "sum"), total_ns=("_t", "sum"),
                max_ns=("wait_ns", "max"), min_ns=("wait_ns", "min"), kvm=("kvm", "any"))
    for c in ("contended", "total_ns"):
        out[c] = out[c].round().astype(np.int64)
    out["estimated"] = estimated
    # the row's dominant lock/caller/process: the one with the most sampled wait
    others = [c for c in ("type", "lock", "caller", "tgid") if c not in keys]
    weight = samples.groupby(keys + others, observed=True)["wait_ns"].sum()
    dom = weight.reset_index().sort_values("wait_ns", kind="stable").groupby(
        keys, observed=True).last()
    for c in others:
        out[c] = dom[c]
    if by == "thread":
        out["comm"] = g["comm"].last()
    out = out.reset_index()
    if by == "address":
        out["lock"] = _address_labels(out)
    out["avg_ns"] = out["total_ns"] / out["contended"]
    out["vm"] = out["tgid"].map(vm_labels(rec)).astype(object)
    if by == "thread":
        out["vm"] = out["vm"].fillna(out["comm"])
        out["comm"] = _vcpu_comms(rec, out)
    else:
        out["comm"] = out["tgid"].map(_comm_by_tgid(rec)).astype(object).fillna("?")
        out["vm"] = out["vm"].fillna(out["comm"])
    # the samples' own percentiles: exact when every wait was streamed
    out = out.merge(_sample_percentiles(samples, keys).reset_index(), on=keys,
                    how="left").drop(columns="n")
    out["pct_exact"] = not out["estimated"].any()
    out = out.sort_values(SORT_KEYS[sort], ascending=False, kind="stable")
    return (out.head(limit) if limit else out)[cols].reset_index(drop=True)


def _address_labels(out):
    """--by address: a lock's name where it has one, else its address."""
    return [f"{int(a):#x}" if n == f"{int(a):#x}" else f"{n} {int(a):#x}"
            for a, n in zip(out["lock_addr"], out["lock"].astype(str))]


def _sample_percentiles(samples, keys):
    """p50/p90/p99 (QUANTILE_METHOD) and the count of each group's samples, or None."""
    if samples.empty:
        return None
    codes, index = group_codes(samples, keys)
    q = group_quantiles(codes, samples["wait_ns"].to_numpy(), len(index),
                        list(QUANTILES.values()))
    return pd.DataFrame(q, index=index, columns=list(QUANTILES)).assign(
        n=np.bincount(codes, minlength=len(index)))


def _streamed_percentiles(rec, out, keys, pids):
    """_sample_percentiles() of top()'s rows, the samples read chunk by chunk."""
    arrays = [np.asarray(out[k]) for k in keys]             # (as group_codes gives them)
    index = pd.MultiIndex.from_arrays(arrays, names=keys) if len(keys) > 1 else \
        pd.Index(arrays[0], name=keys[0])
    row_of = {k: i for i, k in enumerate(index.tolist())}
    samples = Positioned(rec, keys, lambda k: row_of.get(k, -1),
                         ("tgid", list(pids)) if pids else None)

    def chunks():
        for pos, df in samples(["wait_ns"]):
            yield pos, df["wait_ns"].to_numpy()
    q, n = streamed_quantiles(chunks, len(index), list(QUANTILES.values()))
    return pd.DataFrame(q, index=index, columns=list(QUANTILES)).assign(n=n)[n > 0]


def _percentiles(out, keys, exact, hists):
    """p50/p90/p99 per row (QUANTILE_METHOD): of the row's samples when every wait of
    the row was sampled, else the bound of the log2 bucket holding it."""
    if exact is not None:
        out = out.merge(exact.reset_index(), on=keys, how="left")
    else:
        out = out.assign(n=np.nan, **{c: np.nan for c in QUANTILES})
    out["pct_exact"] = out["n"] == out["contended"]
    summed = hists.apply(lambda h: np.sum(np.stack(h.to_numpy()), axis=0))
    for i in out.index[~out["pct_exact"]]:
        key = tuple(out.loc[i, k] for k in keys)
        h = summed.loc[key if len(keys) > 1 else key[0]]
        for c, q in QUANTILES.items():
            out.loc[i, c] = hist_quantile(h, q)
    return out.drop(columns="n")


def group_codes(df, keys):
    """(a group code per row, the groups' keys as an Index): what groupby's ngroup()
    gives, from the columns' own codes (categoricals) folded into one integer,
    several times faster on millions of rows. The key columns hold no missing
    values (the reader refuses them; labels always have a value)."""
    combined = np.zeros(len(df), np.int64)
    parts, span = [], 1
    for k in keys:
        codes, uniq = _codes(df[k], (1 << 62) // span)
        span *= len(uniq) + 1
        combined = combined * (len(uniq) + 1) + (codes + 1)     # 0: a missing value
        parts.append(np.asarray(uniq))
    gcodes, groups = pd.factorize(combined)
    arrays = []
    for uniq in reversed(parts):                # unfold each group's integer
        groups, code = np.divmod(groups, len(uniq) + 1)
        arrays.append(uniq[code - 1])
    arrays = arrays[::-1]
    index = pd.MultiIndex.from_arrays(arrays, names=keys) if len(keys) > 1 else \
        pd.Index(arrays[0], name=keys[0])
    return gcodes, index


RANGE_CODES = 1 << 16       # an integer column spanning fewer values is coded by value


def _codes(c, room):
    """(codes, uniques) of a column: a categorical's own; an integer column of a
    narrow range (flags, stack ids) its values less the smallest, which costs no
    hashing (every value in the range a unique, used or not, while fewer than
    `room`); else pd.factorize."""
    if isinstance(c.dtype, pd.CategoricalDtype):
        return c.cat.codes.to_numpy(np.int64), c.cat.categories
    v = c.to_numpy()
    if v.dtype.kind in "iu" and len(v):
        lo, hi = v.min(), v.max()
        if int(hi) - int(lo) < min(RANGE_CODES, room - 1):
            return (v - lo).astype(np.int64), np.arange(int(hi) - int(lo) + 1).astype(
                v.dtype) + lo
    return pd.factorize(v)


def group_quantiles(codes, values, ngroups, qs):
    """The quantiles qs (QUANTILE_METHOD) of values per group code 0..ngroups-1, as an
    (ngroups, len(qs)) array: one radix sort of the codes and a partition per group,
    not a sort of all values (pandas' groupby quantile sorts them)."""
    small = np.int16 if ngroups < 2**15 else np.int32     # radix sort for 16-bit keys
    order = np.argsort(codes.astype(small), kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(ngroups + 1))
    vals = values[order]
    out = np.full((ngroups, len(qs)), np.nan)
    for i in range(ngroups):
        if bounds[i + 1] > bounds[i]:
            out[i] = quantiles(vals[bounds[i]:bounds[i + 1]], qs)
    return out


def _comm_by_tgid(rec):
    """The most frequent comm of each process's sampled waits (once per recording)."""
    def compute():
        parts = []
        for samples in rec.chunks("contention", ["tgid", "comm"]):     # (a big one too)
            codes, pairs = group_codes(samples, ["tgid", "comm"])
            parts.append(pd.Series(np.bincount(codes), index=pairs))
        if not parts:
            return {}
        counts = pd.concat(parts).groupby(level=["tgid", "comm"]).sum()
        return counts.sort_values(ascending=False, kind="stable").reset_index().drop_duplicates(
            "tgid").set_index("tgid")["comm"].to_dict()
    return rec.derived("comm_by_tgid", compute)


def top_stacks(rec, row, by="lock", n=1):
    """The n stacks with the most wait inside one `top()` row."""
    aggs = annotated_aggregates(rec)
    keys = group_keys(by)
    sel = np.logical_and.reduce([aggs[k] == row[k] for k in keys])
    info = contention_stacks(rec)
    part = aggs[sel & aggs["stack_id"].isin(info.index)].groupby("stack_id")["total_ns"] \
        .sum().sort_values(ascending=False)
    return [(int(sid), list(info["frames"][sid])) for sid in part.index[:n]]


def waits_in_progress(rec):
    """The waits still in progress when the recording stopped, begun at least
    manifest["in_progress_min_ns"] before (a deadlock, or a very long wait): who,
    on which lock, from where, for how long. Longest first."""
    w = rec.table("in_progress")
    cols = ["tid", "tgid", "comm", "lock", "type", "caller", "age_ns", "stack_id"]
    if w.empty:
        return pd.DataFrame(columns=cols)
    w = with_stack_columns(w, contention_stacks(rec), lock_names(rec))
    w["comm"] = w["tgid"].map(_comm_by_tgid(rec)).astype(object).fillna("?")
    return w.sort_values("age_ns", ascending=False)[cols].reset_index(drop=True)


def nested_waits(rec):
    """Per process: the waits that began inside another wait of their task (a mutex's
    wait_lock, an interrupt over a waiting task) and their time, which lies inside
    the outer wait's: counted by lock as perf counts them, never added again to a
    process's or a vCPU's total. Empty for recordings made before it was kept."""
    n = rec.table("nested_waits")
    if n.empty or "tgid" not in n.columns:
        return pd.DataFrame({"waits": pd.Series(dtype=np.int64),
                             "wait_ns": pd.Series(dtype=np.int64)}, index=pd.Index(
                                 [], name="tgid"))
    return n.groupby("tgid")[["count", "total_ns"]].sum().rename(
        columns={"count": "waits", "total_ns": "wait_ns"}).astype(np.int64)


def totals(rec):
    """What was seen and what was lost, from the manifest's in-kernel counters, and
    the nested waits (whose time is inside another wait's)."""
    m = rec.manifest
    c = m.get("counters", {})
    nested = nested_waits(rec)
    return {"contention_end_seen": c.get("end", 0),
            "nested_waits": int(nested["waits"].sum()) if "nested" in c else None,
            "nested_ns": int(nested["wait_ns"].sum()),
            "irq_waits": c.get("irq_waits"),
            "waits_paired": c.get("end", 0) - c.get("end_without_begin", 0),
            # a wait whose end never came (0 unless the kernel left one unpaired)
            "begins_unended": c.get("begin_without_end", 0),
            # (not m.get's default: that would load every sample to count them)
            "samples": m["samples"] if "samples" in m else len(rec.table("contention",
                                                                          ["wait_ns"])),
            "losses": m.get("losses", {})}


def timeline(rec, bin_ms=100, by="lock", top_n=5):
    """Contention over time: waits and wait time per `bin_ms` bin (from the samples,
    scaled as sample_weights says), for the `top_n` heaviest groups of `by`; one row
    per (bin, group)."""
    aggs, samples = annotate(rec)
    if samples.empty:
        return pd.DataFrame(columns=["t_s", by, "waits", "wait_ns"])
    key = GROUP_COLUMN[by]
    n, t, _ = sample_weights(rec, samples, aggs)
    samples = samples.assign(_n=n, _t=t)
    top_keys = samples.groupby(key, observed=True)["_t"].sum().nlargest(top_n).index
    s = samples[samples[key].isin(top_keys)]
    t0 = rec.manifest.get("start_monotonic_ns", int(samples["ts_ns"].min()))
    bins = ((s["ts_ns"].astype("int64") - t0) // (bin_ms * 1_000_000)).rename("bin")
    out = s.groupby([bins, s[key]], observed=True)[["_n", "_t"]].sum().round().astype(
        np.int64).rename(columns={"_n": "waits", "_t": "wait_ns"}).reset_index()
    out["t_s"] = out["bin"] * bin_ms / 1000
    return out[["t_s", key, "waits", "wait_ns"]].rename(columns={key: by})


def wait_histogram(rec, by="lock", top_n=5):
    """Wait-time distribution per group from the in-kernel log2 histograms:
    one row per (group, bucket), bucket = [lo_ns, hi_ns)."""
    aggs, _ = annotate(rec)
    if aggs.empty:
        return pd.DataFrame(columns=[by, "lo_ns", "hi_ns", "count"])
    key = GROUP_COLUMN[by]
    heavy = aggs.groupby(key)["total_ns"].sum().nlargest(top_n).index
    rows = []
    for k, part in aggs[aggs[key].isin(heavy)].groupby(key):
        lo, hi, n = hist_buckets(np.sum(np.stack(part["hist"].to_numpy()), axis=0))
        rows += [{by: k, "lo_ns": a, "hi_ns": b, "count": c}
                 for a, b, c in zip(lo.tolist(), hi.tolist(), n.tolist())]
    return pd.DataFrame(rows)


def processes(rec):
    """One row per process the recording saw: tgid, comm, the VM name from its
    command line (QEMU's -name) or libvirt's scope if any, `vm_tgid`: the VMM it works
    for (itself, or the VMM a helper such as vhost-<pid> is named after), and `vm`:
    that VMM's name, else its comm."""
    known = rec.manifest.get("processes", {})
    comm = _comm_by_tgid(rec)
    tgids = set(int(t) for t in known) | set(comm)
    rows = []
    for t in sorted(tgids):
        info = known.get(str(t), {})
        c = info.get("comm") or comm.get(t, "?")
        rows.append({"tgid": t, "comm": c, "vm_name": info.get("vm_name"),
                     "vm_tgid": int(info.get("vm_tgid") or t),
                     "cmdline": info.get("cmdline", "")})
    cols = ["tgid", "comm", "vm_name", "vm_tgid", "vm", "cmdline"]
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows)
    own = dict(zip(df["tgid"], df["vm_name"].fillna(df["comm"])))
    df["vm"] = [own.get(o) or f"{o}" if o != t else own[t]
                for t, o in zip(df["tgid"], df["vm_tgid"])]
    return df[cols]


def vm_labels(rec):
    p = processes(rec)
    return dict(zip(p["tgid"], p["vm"]))


# vCPU threads by their names: QEMU's "CPU 3/KVM", the built-in workload's kvmlp-vcpu3
_VCPU_COMM = re.compile(r"^(?:CPU (\d+)/KVM|kvmlp-vcpu(\d+))$")


def vcpu_labels(rec, comms):
    """{tid: "VM/vcpuN"} of the vCPU threads among comms ({tid: comm}): the vCPU
    registry's index where the vms probe saw KVM_RUN, else the thread's name."""
    vm = vm_labels(rec)
    v = rec.table("vcpus")
    if not {"tid", "tgid", "vcpu_idx"} <= set(v.columns):     # (no vms probe)
        v = pd.DataFrame({"tid": [], "tgid": [], "vcpu_idx": []})
    idx = dict(zip(v["tid"].tolist(), v["vcpu_idx"].tolist()))
    tgid = dict(zip(v["tid"].tolist(), v["tgid"].tolist()))
    out = {}
    for t, (p, c) in comms.items():
        m = _VCPU_COMM.match(str(c))
        n = idx.get(t, next((int(g) for g in m.groups() if g), None) if m else None)
        if n is not None:
            out[t] = f"{vm.get(tgid.get(t, p), p)}/vcpu{n}"
    return out


def _vcpu_comms(rec, rows):
    """rows' comm column with the vCPU threads' as VM/vcpuN (vcpu_labels)."""
    label = vcpu_labels(rec, {t: (p, c) for t, p, c in
                              zip(rows["tid"], rows["tgid"], rows["comm"])})
    return [label.get(t, c) for t, c in zip(rows["tid"], rows["comm"].astype(str))]


def per_vm(rec):
    """Contention per process (VM): waits and wait time from the in-kernel
    aggregates (complete), how much of it went through KVM, threads that waited.
    wait_ns is the time its threads waited: without the nested waits' (nested_ns,
    inside another wait's time), so it never counts an instant twice."""
    aggs, samples = annotate(rec)
    cols = ["tgid", "vm", "waits", "wait_ns", "kvm_waits", "kvm_wait_ns", "threads",
            "nested_waits", "nested_ns"]
    if aggs.empty:
        return pd.DataFrame(columns=cols)
    # a helper thread's waits (vhost-<pid>, ...) are its VM's
    p = processes(rec)
    owner = dict(zip(p["tgid"], p["vm_tgid"]))
    aggs = aggs.assign(tgid=aggs["tgid"].map(lambda t: owner.get(t, t)))
    if not samples.empty:
        samples = samples.assign(tgid=samples["tgid"].map(lambda t: owner.get(t, t)))
    kvm = aggs[aggs["kvm"]]
    g = aggs.groupby("tgid")
    out = pd.DataFrame({"waits": g["count"].sum(), "wait_ns": g["total_ns"].sum(),
                        "kvm_waits": kvm.groupby("tgid")["count"].sum(),
                        "kvm_wait_ns": kvm.groupby("tgid")["total_ns"].sum()})
    nested = nested_waits(rec)
    nested.index = nested.index.map(lambda t: owner.get(t, t))
    nested = nested.groupby(level=0).sum()
    out["nested_waits"], out["nested_ns"] = nested["waits"], nested["wait_ns"]
    out = out.fillna(0).astype("int64")
    out["wait_ns"] -= out["nested_ns"]
    out["threads"] = samples.groupby("tgid")["tid"].nunique() if not samples.empty else 0
    out = out.reset_index()
    out["threads"] = out["threads"].fillna(0).astype(int)
    out["vm"] = out["tgid"].map(vm_labels(rec)).fillna("?")
    return out[cols].sort_values("wait_ns", ascending=False, ignore_index=True)


def per_thread(rec):
    """Contention per process and thread (vCPU threads are named kvmlp-vcpuN by the
    built-in workload; QEMU names them "CPU N/KVM"): waits and wait time, from the
    samples, scaled to the aggregates where not every wait was streamed (sample_weights:
    `estimated`)."""
    aggs, samples = annotate(rec)
    cols = ["tgid", "vm", "tid", "comm", "waits", "wait_ns", "kvm_waits", "estimated"]
    if samples.empty:
        return pd.DataFrame(columns=cols)
    n, t, estimated = sample_weights(rec, samples, aggs)
    samples = samples.assign(_n=n, _t=t, _k=np.where(samples["kvm"], n, 0.0))
    g = samples.groupby(["tgid", "tid", "comm"], observed=True)
    out = pd.DataFrame({"waits": g["_n"].sum(), "wait_ns": g["_t"].sum(),
                        "kvm_waits": g["_k"].sum()}).round().astype(np.int64).reset_index()
    out["estimated"] = estimated
    out["vm"] = out["tgid"].map(vm_labels(rec)).fillna("?")
    out["comm"] = _vcpu_comms(rec, out)
    return out[cols].sort_values("wait_ns", ascending=False, ignore_index=True)


def rates(rec, by="lock", limit=None):
    """`top()` plus rates: waits and wait time per second of recording and, when the
    recording knows the built-in workload's work, per vCPU exit and per memslot op."""
    df = top(rec, by=by, limit=limit)
    dur = rec.manifest.get("duration_s") or np.nan
    df["waits_per_s"] = df["contended"] / dur
    df["wait_ns_per_s"] = df["total_ns"] / dur
    work = rec.manifest.get("work") or {}
    for unit, n in (("exit", work.get("exits_total")), ("memslot_op", work.get("churn_ops"))):
        if n:
            df[f"waits_per_{unit}"] = df["contended"] / n
            df[f"wait_ns_per_{unit}"] = df["total_ns"] / n
    return df


def hist_frame(rows):
    """log2-bucket rows {label, hist} -> (label, lo_ns, hi_ns, count) rows."""
    out = []
    for label, hist in rows:
        lo, hi, n = hist_buckets(hist)
        out += [{"what": label, "lo_ns": a, "hi_ns": b, "count": c}
                for a, b, c in zip(lo.tolist(), hi.tolist(), n.tolist())]
    return pd.DataFrame(out)
