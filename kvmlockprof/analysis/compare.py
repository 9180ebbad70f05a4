"""Before/after comparison of recordings: per lock and per probe metric, the
change, a 95% bootstrap confidence interval for it, and a verdict.

With several runs per side the bootstrap resamples runs (each run one value
per metric: run-to-run noise is what decides), with the expanded percentile
interval that keeps 95% coverage for a handful of runs; with one run per side
it resamples within the run: waits for the wait statistics, 500 ms time bins
for rates (probe metrics then get no interval). A change is reported as improved or regressed
only when its interval excludes zero and it is at least `threshold` (relative)."""
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from scipy import special   # (scipy.stats takes 0.4 s more to import: only to resample)

from kvmlockprof.analysis import locks as analysis

LOCK_METRICS = {          # metric -> (better, unit)
    "waits/s": ("lower", "/s"), "wait/s": ("lower", "ns"), "waits/exit": ("lower", ""),
    "waits/memslot op": ("lower", ""), "mean wait": ("lower", "ns"),
    "p50 wait": ("lower", "ns"), "p99 wait": ("lower", "ns"),
}
RATE_METRICS = ("waits/s", "wait/s", "waits/exit", "waits/memslot op")
BIN_NS = 500_000_000          # time bins for a single run's rates
SAMPLE_CAP = 20_000           # waits per side resampled for a single run's mean wait
# the sample columns a comparison reads (of 10: a 10 M-sample run loads in half the time)
SAMPLE_COLUMNS = ("ts_ns", "wait_ns", "lock_addr", "flags", "stack_id")
QUANTILE_CAP = 5_000          # ... and for its percentiles
NORMAL_MIN = 1_000            # observations a side from which a mean's bootstrap is
                              # drawn from its normal limit (the CLT), not resampled
# waits a run needs before its mean / percentile of a lock means anything (the
# p99 of a dozen waits is their maximum)
MIN_WAITS = {"mean wait": 50, "p50 wait": 50, "p99 wait": 200}
MIN_RUNS = 3                  # runs per side for an interval over runs: with 2, all
                              # 2+2 orderings put both NEW above both BASE 1 time in 6
COLUMNS = ["kind", "name", "metric", "unit", "better", "base", "new", "change", "ratio",
           "ci_low", "ci_high", "ratio_ci_low", "ratio_ci_high", "verdict", "n_base", "n_new"]


class NotComparable(Exception):
    """The two sides should not be compared; str() says why and what to do."""


# --- identities -------------------------------------------------------------------

def _func(frame):
    return frame.split("+", 1)[0]


def lock_across_runs(lock):
    """A lock's name as another run knows it: without the pid (`kvm(1234)->slots_lock`
    -> `kvm->slots_lock`), `?` for a bare address (addresses are not stable)."""
    return "?" if str(lock).startswith("0x") else re.sub(r"\(\d+\)", "", str(lock)) or "?"


def lock_identity(lock, typ, caller):
    """What matches a lock across recordings: its name across runs (symbols and KVM
    field names are stable, addresses are not), its type and its caller's function
    (offsets change with any patch)."""
    return f"{lock_across_runs(lock)} {typ} @ {_func(str(caller))}"


def _with_identity(df):
    """An `identity` column: lock_identity() once per distinct (lock, type, caller)."""
    if df.empty:
        return df.assign(identity=pd.Series(dtype=str))
    codes, combos = analysis.group_codes(df, ["lock", "type", "caller"])
    names = [lock_identity(*combo) for combo in combos]
    lcodes, cats = pd.factorize(pd.Series(names, dtype=object))
    return df.assign(identity=pd.Categorical.from_codes(lcodes[codes], cats))


def _identity_chunks(rec, identities):
    """chunks(columns): (position in `identities` per sample, -1 for none; waits; end
    times, or None without ts_ns in `columns`) of a big recording's samples, chunk
    by chunk, in as many passes as it is called (analysis.Positioned)."""
    pos = {k: i for i, k in enumerate(identities)}
    samples = analysis.Positioned(rec, ["lock", "type", "caller"],
                                  lambda c: pos.get(lock_identity(*c), -1))

    def chunks(columns=SAMPLE_COLUMNS):
        for at, df in samples(columns):
            yield at, df["wait_ns"].to_numpy(), \
                df["ts_ns"].to_numpy(np.int64) if "ts_ns" in columns else None
    return chunks


def identified(rec):
    """analysis.annotate() with the identity column, once per recording
    (lock_values and the single-run observations both need it). Identities name
    callers, so waits without a walked stack are spread over their lock's walked
    callers (analysis.spread_unwalked): rates stay comparable whatever share of
    stacks the --stack-budget let through."""
    def compute():
        aggs, samples = (analysis.annotated_aggregates(rec), pd.DataFrame()) \
            if analysis.streamed(rec) else analysis.annotate(rec, SAMPLE_COLUMNS)
        if not aggs.empty:
            aggs = analysis.spread_unwalked(aggs)
        return _with_identity(aggs), _with_identity(samples)
    return rec.derived("identified", compute)


# --- what one recording says --------------------------------------------------------

def _work(rec):
    w = rec.manifest.get("work") or {}
    return {"exit": w.get("exits_total") or 0, "memslot op": w.get("churn_ops") or 0}


def lock_values(rec):
    """Per lock identity, this run's value of every lock metric (rates from the
    in-kernel aggregates, percentiles from the samples or bucket bounds)."""
    aggs, samples = identified(rec)
    if aggs.empty:
        return pd.DataFrame(columns=["identity", *LOCK_METRICS, "total_ns"])
    dur = rec.manifest.get("duration_s") or np.nan
    g = aggs.groupby("identity")
    out = pd.DataFrame({"count": g["count"].sum(), "total_ns": g["total_ns"].sum()})
    out["waits/s"] = out["count"] / dur
    out["wait/s"] = out["total_ns"] / dur
    for unit, n in _work(rec).items():
        out[f"waits/{unit}"] = out["count"] / n if n else np.nan
    out["mean wait"] = (out["total_ns"] / out["count"]).where(
        out["count"] >= MIN_WAITS["mean wait"])
    if analysis.streamed(rec):
        st = _streamed_stats(rec)
        n = pd.Series(st["n"], st["identities"]).reindex(out.index).fillna(0)
        for i, metric in enumerate(("p50 wait", "p99 wait")):
            out[metric] = pd.Series(st["q"][:, i], st["identities"]).reindex(out.index).where(
                n >= MIN_WAITS[metric])
    elif not samples.empty:
        codes, cats = samples["identity"].cat.codes.to_numpy(), samples["identity"].cat.categories
        q = pd.DataFrame(analysis.group_quantiles(codes, samples["wait_ns"].to_numpy(),
                                                  len(cats), [0.5, 0.99]), index=cats)
        n = pd.Series(np.bincount(codes, minlength=len(cats)), cats).reindex(out.index).fillna(0)
        for i, metric in enumerate(("p50 wait", "p99 wait")):
            out[metric] = q[i].reindex(out.index).where(n >= MIN_WAITS[metric])
    else:
        out["p50 wait"] = out["p99 wait"] = np.nan
    return out.reset_index()[["identity", *LOCK_METRICS, "total_ns"]]


def probe_values(rec):
    """{(probe metric name, better, unit): value} of every probe's compare hook, one run."""
    from kvmlockprof.catalog import CATALOG
    out = {}
    for probe in CATALOG:
        if probe.compare:
            out.update(probe.compare(rec))
    return out


# --- single-run observations ----------------------------------------------------------

def _has_unit(rec, metric):
    """Whether a rate metric is defined for this run (per memslot op needs memslot ops)."""
    if not metric.startswith("waits/") or metric == "waits/s":
        return True
    return bool(_work(rec).get(metric[len("waits/"):]))


def _single_observations(rec, identities):
    """({(identity, metric): (observations, statistic)}, bins): what the bootstrap
    resamples when there is one run per side. Rates: per 500 ms bin (scaled so
    that unsampled waits count); wait statistics: the sampled waits."""
    aggs, samples = identified(rec)
    dur = rec.manifest.get("duration_s") or np.nan
    nbins = max(1, int(np.ceil(dur * 1e9 / BIN_NS))) if dur == dur else 1
    out = {}
    if analysis.streamed(rec):
        return _streamed_observations(rec, aggs, sorted(identities), dur, nbins), nbins
    if samples.empty:
        return out, nbins
    t0 = rec.manifest.get("start_monotonic_ns", int(samples["ts_ns"].min()))
    counts = aggs.groupby("identity", observed=True)["count"].sum()
    # each identity's rows as one slice of a sort by its code (groupby's take() of
    # every column costs seconds on 10 M rows)
    codes, cats = samples["identity"].cat.codes.to_numpy(), samples["identity"].cat.categories
    order = np.argsort(codes.astype(np.int32), kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(cats) + 1))
    all_waits, all_ts = samples["wait_ns"].to_numpy(), samples["ts_ns"].to_numpy(np.int64)
    for i, ident in enumerate(cats):
        rows = order[bounds[i]:bounds[i + 1]]
        if ident not in identities or not len(rows):
            continue
        waits = all_waits[rows].astype(np.float64)
        b = np.clip((all_ts[rows] - t0) // BIN_NS, 0, nbins - 1)
        scale = counts.get(ident, len(rows)) / len(rows) * 1e9 / BIN_NS
        per_bin = np.bincount(b, minlength=nbins) * scale
        out[(ident, "waits/s")] = (per_bin, "mean")
        out[(ident, "wait/s")] = (np.bincount(b, weights=waits, minlength=nbins) * scale, "mean")
        for unit, n in _work(rec).items():
            if n:
                out[(ident, f"waits/{unit}")] = (per_bin * dur / n, "mean")
        for metric, stat in (("mean wait", "mean"), ("p50 wait", 0.5), ("p99 wait", 0.99)):
            if len(waits) >= MIN_WAITS[metric]:
                out[(ident, metric)] = (waits, stat)
    return out, nbins


def _streamed_stats(rec):
    """What a comparison needs of a big recording's samples, per identity of its
    aggregates, in two passes over them (once per recording): count, exact p50/p99,
    waits and wait time per BIN_NS bin and total wait (first pass), and a uniform
    sample of about SAMPLE_CAP waits (second pass, each wait kept with chance
    SAMPLE_CAP/count: what the bootstrap would draw from all of them, no sort)."""
    def compute():
        aggs, _ = identified(rec)
        idents = list(aggs["identity"].cat.categories) if not aggs.empty else []
        k, dur = len(idents), rec.manifest.get("duration_s") or np.nan
        nbins = max(1, int(np.ceil(dur * 1e9 / BIN_NS))) if dur == dur else 1
        t0 = rec.manifest.get("start_monotonic_ns")
        samples = _identity_chunks(rec, idents)
        if t0 is None:
            t0 = min((int(ts.min()) for _, _, ts in samples()), default=0)
        acc = dict(per_bin=np.zeros(k * nbins), wsum=np.zeros(k * nbins), total=np.zeros(k))
        rng = np.random.default_rng(0)
        kept, chance = [], None             # chance per identity: set after the first pass

        def chunks():
            nonlocal chance
            # (the second pass needs no end times)
            for rows, waits, ts in samples(SAMPLE_COLUMNS if chance is None else ("wait_ns",)):
                if chance is None:
                    _accumulate(acc, rows, waits, ts, t0, k, nbins)
                else:
                    m = (rows >= 0) & (rng.random(len(rows)) < chance[rows])
                    kept.append((rows[m], waits[m].astype(np.float64)))
                yield rows, waits
            if chance is None:              # the counts are whole: the second pass samples
                n = acc["per_bin"].reshape(k, nbins).sum(axis=1)
                chance = np.minimum(1.0, SAMPLE_CAP / np.maximum(n, 1))
        q, n = analysis.streamed_quantiles(chunks, k, [0.5, 0.99])
        r = np.concatenate([c[0] for c in kept]) if kept else np.array([], np.int64)
        w = np.concatenate([c[1] for c in kept]) if kept else np.array([])
        return dict(acc, r=r, w=w, identities=idents, q=q, n=n, nbins=nbins)
    return rec.derived("streamed_stats", compute)


def _accumulate(acc, rows, waits, ts, t0, k, nbins):
    """_streamed_stats()'s first pass over one chunk."""
    ok = rows >= 0
    rows, waits, ts = rows[ok], waits[ok].astype(np.float64), ts[ok]
    cell = rows * nbins + np.clip((ts - t0) // BIN_NS, 0, nbins - 1)
    acc["per_bin"] += np.bincount(cell, minlength=k * nbins)
    acc["wsum"] += np.bincount(cell, weights=waits, minlength=k * nbins)
    acc["total"] += np.bincount(rows, weights=waits, minlength=k)


def _streamed_observations(rec, aggs, identities, dur, nbins):
    """_single_observations() of a recording read chunk by chunk (_streamed_stats):
    the rates' bins exactly; for the wait statistics the sample of ~SAMPLE_CAP waits,
    with the exact mean and percentiles as the values (a third item)."""
    st = _streamed_stats(rec)
    pos = {ident: i for i, ident in enumerate(st["identities"])}
    counts = aggs.groupby("identity", observed=True)["count"].sum()
    nb, out = st["nbins"], {}
    for ident in identities:
        i = pos.get(ident)
        if i is None or not st["n"][i]:
            continue
        n = st["n"][i]
        scale = counts.get(ident, n) / n * 1e9 / BIN_NS
        bins = st["per_bin"][i * nb:(i + 1) * nb] * scale
        out[(ident, "waits/s")] = (bins, "mean")
        out[(ident, "wait/s")] = (st["wsum"][i * nb:(i + 1) * nb] * scale, "mean")
        for unit, units in _work(rec).items():
            if units:
                out[(ident, f"waits/{unit}")] = (bins * dur / units, "mean")
        sample = st["w"][st["r"] == i]
        for metric, stat, value in (("mean wait", "mean", st["total"][i] / n),
                                    ("p50 wait", 0.5, st["q"][i, 0]),
                                    ("p99 wait", 0.99, st["q"][i, 1])):
            if n >= MIN_WAITS[metric]:
                out[(ident, metric)] = (sample, stat, value, int(n))
    return out


# --- the bootstrap ------------------------------------------------------------------

def _stat(x, stat, axis=-1):
    return np.mean(x, axis=axis) if stat == "mean" else \
        np.quantile(x, stat, axis=axis, method=analysis.QUANTILE_METHOD)


def confidence_level(n, level=0.95):
    """The level to ask the percentile bootstrap for so that its interval covers
    `level` with n observations: Hesterberg's expanded percentile interval (the
    plain one is too narrow for small n, as in a handful of runs)."""
    if n < 2:
        return np.nan
    alpha = 1 - level
    z = np.sqrt(n / (n - 1)) * special.stdtrit(n - 1, 1 - alpha / 2)   # Student's t quantile
    return 1 - 2 * special.ndtr(-z)


def _interval(base, new, stat, rng, resamples):
    """95% CI of stat(new) - stat(base) and of stat(new) / stat(base)."""
    n = min(len(base), len(new))
    if n < 2:                               # one value per side: no spread to go on
        return (np.nan,) * 4
    if np.ptp(base) == 0 and np.ptp(new) == 0:         # no spread: the change is exact
        d, r = new[0] - base[0], (new[0] / base[0] if base[0] else np.inf)
        return d, d, r, r
    cap = SAMPLE_CAP if stat == "mean" else QUANTILE_CAP
    base = base if len(base) <= cap else rng.choice(base, cap, replace=False)
    new = new if len(new) <= cap else rng.choice(new, cap, replace=False)
    level = confidence_level(n)
    if stat != "mean":                      # each side's resampled quantile, drawn exactly
        sb, sn = (quantile_resamples(x, stat, rng, resamples) for x in (base, new))
    elif n >= NORMAL_MIN:                   # a resampled mean is normal to within the
        sb, sn = (rng.normal(x.mean(), x.std(ddof=1) / np.sqrt(len(x)), resamples)
                  for x in (base, new))    # noise of the resampling itself at this n
    else:
        from scipy.stats import bootstrap

        def both(b, n, axis=-1):            # one resampling for the difference and ratio
            sb, sn = _stat(b, stat, axis), _stat(n, stat, axis)
            return np.stack([sn - sb, sn / sb])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bootstrap((base, new), both, n_resamples=resamples, method="percentile",
                            vectorized=True, rng=rng, batch=100, confidence_level=level)
        lo, hi = res.confidence_interval
        return lo[0], hi[0], lo[1], hi[1]
    tails = [50 * (1 - level), 50 * (1 + level)]
    with np.errstate(all="ignore"):
        (lo, hi), (rlo, rhi) = (np.percentile(d, tails) for d in (sn - sb, sn / sb))
    return lo, hi, rlo, rhi


def quantile_resamples(x, q, rng, size):
    """The q-quantile (nearest rank) of `size` bootstrap resamples r of x (drawn with
    replacement, len(x) values each), without drawing them: it is r's (k+1)-th
    smallest (k = quantile_index(n, q)), which is x's ceil(nU)-th smallest, U the
    (k+1)-th smallest of n uniforms, Beta(k+1, n-k). One sort of x and one draw a
    resample, where resampling sorts n values a resample."""
    x = np.sort(np.asarray(x, np.float64))
    n = len(x)
    k = int(analysis.quantile_index(n, q))
    u = rng.beta(k + 1, n - k, size)
    return x[np.clip(np.ceil(u * n).astype(np.int64) - 1, 0, n - 1)]


NEW, GONE = "new in NEW", "gone in NEW"     # a probe metric seen on one side only


def _verdict(better, lo, hi, change, ratio, threshold):
    if better == "none":
        return "(context)"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no CI (too few runs)" if np.isnan(lo) else "no CI"
    if lo <= 0 <= hi:
        return "no significant change"
    rel = abs(ratio - 1) if np.isfinite(ratio) else np.inf
    if rel < threshold:
        return "no significant change"
    worse = change > 0 if better == "lower" else change < 0
    return "regressed" if worse else "improved"


# --- the comparison -----------------------------------------------------------------

RESAMPLES = {"runs": 4000, "single": 1000}   # the expanded interval needs far tails;
                                             # a single run's resamples are large arrays


def compare(base, new, threshold=0.05, limit=20, resamples=None, seed=0):
    """One row per (lock identity or probe, metric): base and new values, change,
    95% CI of the change (absolute and ratio), verdict; sorted by effect size.

    base, new: lists of Recordings (one or several runs each)."""
    rng = np.random.default_rng(seed)
    runs_mode = len(base) > 1 or len(new) > 1
    big = list({id(r): r for r in (*base, *new) if analysis.streamed(r)}.values())
    if len(big) > 1:    # two at once: reading, checksums and hashing release the GIL
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(_streamed_stats, big))
    resamples = resamples or RESAMPLES["runs" if runs_mode else "single"]
    bl = [lock_values(r) for r in base]
    nl = [lock_values(r) for r in new]
    pooled = pd.concat([*bl, *nl]).groupby("identity")["total_ns"].sum()
    identities = list(pooled.sort_values(ascending=False).index[:limit])
    rows = []

    def add(kind, name, metric, better, b_obs, n_obs, stat="mean", unit="", values=None):
        """values: (value, count) of each side (or None) whose observations are a
        sample of the waits they stand for."""
        b_obs = np.asarray(b_obs, np.float64)
        n_obs = np.asarray(n_obs, np.float64)
        b_obs, n_obs = b_obs[~np.isnan(b_obs)], n_obs[~np.isnan(n_obs)]
        bv = _stat(b_obs, stat) if len(b_obs) else np.nan
        nv = _stat(n_obs, stat) if len(n_obs) else np.nan
        nb_, nn_ = len(b_obs), len(n_obs)
        if values:                          # (value, count) per side, or None
            (bv, nb_), (nv, nn_) = (v if v is not None else (x, c) for v, x, c in
                                    zip(values, (bv, nv), (nb_, nn_)))
        if runs_mode and min(len(b_obs), len(n_obs)) < MIN_RUNS:
            lo = hi = rlo = rhi = np.nan
        else:
            lo, hi, rlo, rhi = _interval(b_obs, n_obs, stat, rng, resamples)
        change = nv - bv
        ratio = nv / bv if bv else (np.inf if nv else 1.0)
        rows.append({"kind": kind, "name": name, "metric": metric, "unit": unit,
                     "better": better,
                     "base": bv, "new": nv, "change": change, "ratio": ratio,
                     "ci_low": lo, "ci_high": hi, "ratio_ci_low": rlo, "ratio_ci_high": rhi,
                     "verdict": _verdict(better, lo, hi, change, ratio, threshold),
                     "n_base": nb_, "n_new": nn_})
        # a probe metric only one side has (a lock order edge a patch adds): one line
        if kind == "probe" and better != "none" and bool(len(b_obs)) != bool(len(n_obs)):
            rows[-1]["verdict"] = NEW if len(n_obs) else GONE

    if runs_mode:
        for ident in identities:
            for metric, (better, unit) in LOCK_METRICS.items():
                b = [_run_value(t, r, ident, metric) for t, r in zip(bl, base)]
                n = [_run_value(t, r, ident, metric) for t, r in zip(nl, new)]
                if not (np.isnan(b).all() and np.isnan(n).all()):
                    add("lock", ident, metric, better, b, n, unit=unit)
        bp, np_ = [probe_values(r) for r in base], [probe_values(r) for r in new]
        for key in sorted(set().union(*bp, *np_)):
            add("probe", key[0], "", key[1], [p.get(key, np.nan) for p in bp],
                [p.get(key, np.nan) for p in np_], unit=key[2])
    else:
        (bo, bbins), (no, nbins) = (_single_observations(r[0], set(identities))
                                    for r in (base, new))
        for ident in identities:
            for metric, (better, unit) in LOCK_METRICS.items():
                b, n = bo.get((ident, metric)), no.get((ident, metric))
                if b is None and n is None:     # no samples: the point values, no CI
                    bv = _run_value(bl[0], base[0], ident, metric)
                    nv = _run_value(nl[0], new[0], ident, metric)
                    if not (np.isnan(bv) and np.isnan(nv)):
                        add("lock", ident, metric, better, [bv], [nv], unit=unit)
                        rows[-1]["verdict"] = "no CI (no samples)"
                    continue
                stat = (b or n)[1]

                def missing(rec, bins):     # not contended in that run
                    return np.zeros(bins) if metric in RATE_METRICS and \
                        _has_unit(rec, metric) else []
                add("lock", ident, metric, better, b[0] if b else missing(base[0], bbins),
                    n[0] if n else missing(new[0], nbins), stat, unit,
                    values=[o[2:] if o and len(o) > 2 else None for o in (b, n)])
        bp, np_ = probe_values(base[0]), probe_values(new[0])
        for key in sorted(set(bp) | set(np_)):
            add("probe", key[0], "", key[1], [bp.get(key, np.nan)], [np_.get(key, np.nan)],
                unit=key[2])
            if key[1] != "none" and rows[-1]["verdict"] not in (NEW, GONE):
                rows[-1]["verdict"] = "no CI (one run per side)"
    df = pd.DataFrame(rows, columns=COLUMNS)
    return sort_by_effect(df)


def _run_value(table, rec, ident, metric):
    """One run's value of a lock metric; a lock the run did not contend has rate 0
    (where the rate's unit exists in that run) and no wait statistics."""
    row = table[table["identity"] == ident]
    if not row.empty:
        return float(row[metric].iloc[0])
    return 0.0 if metric in RATE_METRICS and _has_unit(rec, metric) else np.nan


def sort_by_effect(df):
    """Significant changes (and probe metrics only one side has) first, then by |log2
    ratio| (a change from zero first)."""
    if df.empty:
        return df
    with np.errstate(divide="ignore", invalid="ignore"):
        effect = np.abs(np.log2(df["ratio"].astype(float).replace(0, np.nan)))
    effect = effect.fillna(0).replace(np.inf, 1e9)
    sig = df["verdict"].isin(["improved", "regressed", NEW, GONE])
    order = np.lexsort((-effect.to_numpy(), ~sig.to_numpy()))
    return df.iloc[order].reset_index(drop=True)


# --- are the two sides comparable? -----------------------------------------------------

LOSS_GAP = 0.01          # loss fractions that differ by more than this bias the result
WORK_FOLD = 2.0          # work rates that differ more than this: warn loudly


def _attached(rec):
    return tuple(sorted((name, st.get("method")) for name, st in
                        rec.manifest.get("probes", {}).items()
                        if st.get("status") == "attached"))


def loss_fraction(rec):
    """Share of contended waits whose event or aggregate was lost."""
    m = rec.manifest
    end = (m.get("counters") or {}).get("end", 0)
    lost = sum(v for k, v in (m.get("losses") or {}).items() if k != "stack_failures")
    return lost / end if end else 0.0


def _work_rate(rec, unit):
    w = _work(rec)[unit]
    return w / rec.manifest["duration_s"] if w and rec.manifest.get("duration_s") else 0.0


def check(base, new):
    """(refusals, warnings): one-line reasons the sides should not be compared."""
    refuse, warn = [], []
    sides = {"BASE": base, "NEW": new}
    probes = {name: {_attached(r) for r in recs} for name, recs in sides.items()}
    for name, sets in probes.items():
        if len(sets) > 1:
            refuse.append(f"the {name} runs attached different probes: {sorted(sets)}")
    if len(probes["BASE"]) == 1 and probes["BASE"] != probes["NEW"]:
        b, n = next(iter(probes["BASE"])), next(iter(probes["NEW"]))
        refuse.append("different probes or attach methods: BASE " +
                      (", ".join(f"{p} ({m})" for p, m in b) or "none") + "; NEW " +
                      (", ".join(f"{p} ({m})" for p, m in n) or "none"))
    losses = {name: max(loss_fraction(r) for r in recs) for name, recs in sides.items()}
    if abs(losses["BASE"] - losses["NEW"]) > LOSS_GAP:
        refuse.append(f"loss rates differ (BASE {losses['BASE']:.1%}, NEW {losses['NEW']:.1%} "
                      "of waits lost): record again with a bigger --ringbuf-mb or "
                      "--map-nr-entries, or --sample-every")
    every = {name: {r.manifest.get("probes", {}).get("contention", {}).get("sample_every")
                    for r in recs} for name, recs in sides.items()}
    if every["BASE"] != every["NEW"]:
        warn.append(f"--sample-every differs (BASE {sorted(every['BASE'], key=str)}, NEW "
                    f"{sorted(every['NEW'], key=str)}): percentiles may be exact on one side "
                    "and bucket bounds on the other")
    for unit in ("exit", "memslot op"):
        per_run = {name: np.array([_work_rate(r, unit) for r in recs])
                   for name, recs in sides.items()}
        rates = {name: v.mean() for name, v in per_run.items()}
        lo, hi = sorted(rates.values())
        if hi and (lo == 0 or hi / lo > WORK_FOLD or _work_differs(*per_run.values())):
            warn.append(f"the work done differs: {unit}s/s BASE {rates['BASE']:,.0f}, NEW "
                        f"{rates['NEW']:,.0f}: per-second rates and wait times mix workload "
                        f"and locking, read the waits/{unit} rows")
    return refuse, warn


def _work_differs(base, new, threshold=0.05):
    """Whether the runs' work rates differ beyond their run-to-run noise (the
    interval of the change excludes zero, by `threshold` or more): the sides did not
    carry the same load, whatever the locks did. Same-workload runs on a noisy host
    do this too (memslot churn ran at 15-30k ops per run on one side and 20-48k on
    the other in an A/A pair of 6 runs each), and then every lock the load drives
    moves with it."""
    if min(len(base), len(new)) < MIN_RUNS or not (base.all() and new.all()):
        return False
    lo, hi, _, _ = _interval(base, new, "mean", np.random.default_rng(0), RESAMPLES["runs"])
    change, ratio = new.mean() - base.mean(), new.mean() / base.mean()
    return _verdict("higher", lo, hi, change, ratio, threshold) in ("improved", "regressed")
