"""Before/after comparison of recordings: per lock and per probe metric, the
change, a confidence interval for it, and a verdict.

Each row tests "no change". With several runs per side: Welch's t over the runs (each
run one value per metric: run-to-run noise is what decides) on the log of the values
(ratios are what a patch changes, and run-to-run noise is multiplicative). With one run
per side, within the run: rates over 500 ms bins weighted by their length, the mean wait
by Welch's t on the waits, p50/p99 by an exact test (how many of NEW's waits are above
the pooled waits' percentile); probe metrics then get no test. A report's tests are one
family: Benjamini-Hochberg at a 5% false discovery rate, so that with no real change a
report flags anything 5% of the time at most. Intervals are at the level BH used (the
false coverage rate's), so a change counts when its interval excludes zero and it is at
least `threshold` (relative)."""
import re
from concurrent.futures import ThreadPoolExecutor

from scipy import special   # (scipy.stats takes 0.4 s more to import: only for percentiles)

from kvmlockprof.analysis import locks
from kvmlockprof.lazy import np, pd
from kvmlockprof.quantiles import hist_buckets, quantile_index

LOCK_METRICS = {          # metric -> (better, unit)
    "waits/s": ("lower", "/s"), "wait/s": ("lower", "ns"), "waits/exit": ("lower", ""),
    "waits/memslot op": ("lower", ""), "mean wait": ("lower", "ns"),
    "p50 wait": ("lower", "ns"), "p99 wait": ("lower", "ns"),
}
RATE_METRICS = ("waits/s", "wait/s", "waits/exit", "waits/memslot op")
BIN_NS = 500_000_000          # time bins for a single run's rates
SAMPLE_CAP = 20_000           # waits per identity a big recording keeps (a uniform
                              # sample) for a single run's mean and percentile tests
# the sample columns a comparison reads (of 10: a 10 M-sample run loads in half the time)
SAMPLE_COLUMNS = ("ts_ns", "wait_ns", "lock_addr", "flags", "stack_id")
# waits a run needs before its mean / percentile of a lock means anything (the
# p99 of a dozen waits is their maximum)
MIN_WAITS = {"mean wait": 50, "p50 wait": 50, "p99 wait": 200}
MIN_RUNS = 3                  # runs per side for a test over runs (Welch's t on 2 values
                              # a side rests on 1 degree of freedom)
FDR = 0.05                    # Benjamini-Hochberg's level over the rows of one report
COLUMNS = ["kind", "name", "metric", "unit", "better", "base", "new", "change", "ratio",
           "ci_low", "ci_high", "ratio_ci_low", "ratio_ci_high", "verdict", "n_base", "n_new",
           "p_value", "p_adjusted", "ci_level"]


# --- identities -------------------------------------------------------------------

def _func(frame):
    return frame.split("+", 1)[0]


def lock_across_runs(lock):
    """A lock's name as another run knows it: without the pid (`kvm(1234)->slots_lock`
    -> `kvm->slots_lock`) or the address a class by rule carries
    (`zone->lock@ffff888100055800` -> `zone->lock`), `?` for a bare address (addresses
    are not stable)."""
    if str(lock).startswith("0x"):
        return "?"
    return re.sub(r"@[0-9a-f]+$", "", re.sub(r"\(\d+\)", "", str(lock))) or "?"


def lock_distribution(recs, identity):
    """(lo_ns, hi_ns, waits) of the lock and type of a compare row's identity
    (`NAME TYPE @ CALLER`), all its callers, summed over one side's recordings: the
    in-kernel log2 histograms."""
    left, _, _ = str(identity).rpartition(" @ ")
    name, _, typ = left.rpartition(" ")
    total = np.zeros(64)
    for rec in recs:
        aggs = locks.annotated_aggregates(rec)
        if aggs.empty:
            continue
        mine = aggs[(aggs["type"] == typ) & (aggs["lock"].astype(str).map(lock_across_runs)
                                             == name)]
        if not mine.empty:
            total += np.sum(np.stack(mine["hist"].to_numpy()).astype(float), axis=0)
    return hist_buckets(total)


def lock_identity(lock, typ, caller):
    """What matches a lock across recordings: its name across runs (symbols and KVM
    field names are stable, addresses are not), its type and its caller's function
    (offsets change with any patch)."""
    return f"{lock_across_runs(lock)} {typ} @ {_func(str(caller))}"


def _with_identity(df):
    """An `identity` column: lock_identity() once per distinct (lock, type, caller)."""
    if df.empty:
        return df.assign(identity=pd.Series(dtype=str))
    codes, combos = locks.group_codes(df, ["lock", "type", "caller"])
    names = [lock_identity(*combo) for combo in combos]
    lcodes, cats = pd.factorize(pd.Series(names, dtype=object))
    return df.assign(identity=pd.Categorical.from_codes(lcodes[codes], cats))


def _identity_chunks(rec, identities):
    """chunks(columns): (position in `identities` per sample, -1 for none; waits; end
    times, or None without ts_ns in `columns`) of a big recording's samples, chunk
    by chunk, in as many passes as it is called (locks.Positioned)."""
    pos = {k: i for i, k in enumerate(identities)}
    samples = locks.Positioned(rec, ["lock", "type", "caller"],
                               lambda c: pos.get(lock_identity(*c), -1))

    def chunks(columns=SAMPLE_COLUMNS):
        for at, df in samples(columns):
            yield at, df["wait_ns"].to_numpy(), \
                df["ts_ns"].to_numpy(np.int64) if "ts_ns" in columns else None
    return chunks


def identified(rec):
    """locks.annotate() with the identity column, once per recording
    (lock_values and the single-run observations both need it). Identities name
    callers, so waits without a walked stack are spread over their lock's walked
    callers (locks.spread_unwalked): rates stay comparable whatever share of
    stacks the --stack-budget let through."""
    def compute():
        aggs, samples = (locks.annotated_aggregates(rec), pd.DataFrame()) \
            if locks.streamed(rec) else locks.annotate(rec, SAMPLE_COLUMNS)
        if not aggs.empty:
            aggs = locks.spread_unwalked(aggs)
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
    if locks.streamed(rec):
        st = _streamed_stats(rec)
        n = pd.Series(st["n"], st["identities"]).reindex(out.index).fillna(0)
        for i, metric in enumerate(("p50 wait", "p99 wait")):
            out[metric] = pd.Series(st["q"][:, i], st["identities"]).reindex(out.index).where(
                n >= MIN_WAITS[metric])
    elif not samples.empty:
        codes, cats = samples["identity"].cat.codes.to_numpy(), samples["identity"].cat.categories
        q = pd.DataFrame(locks.group_quantiles(codes, samples["wait_ns"].to_numpy(),
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


def _nbins(rec):
    dur = rec.manifest.get("duration_s") or np.nan
    return max(1, int(np.ceil(dur * 1e9 / BIN_NS))) if dur == dur else 1


def _exposure(rec, metric, nbins):
    """Each BIN_NS bin's exposure for a rate metric: its seconds (the last bin's as
    long as the run lasted into it), or its share of the run's work (spread evenly
    over the run); NaN without a duration."""
    dur = rec.manifest.get("duration_s") or np.nan
    if dur != dur:
        return np.full(nbins, np.nan)
    seconds = np.clip(dur - np.arange(nbins) * (BIN_NS / 1e9), 0, BIN_NS / 1e9)
    if metric in ("waits/s", "wait/s"):
        return seconds
    return seconds * _work(rec)[metric[len("waits/"):]] / dur


def _rate_observations(rec, ident, per_bin, wait_per_bin):
    """{(ident, rate metric): ("rate", counts a bin, exposure a bin)} of one run."""
    return {(ident, metric): ("rate", wait_per_bin if metric == "wait/s" else per_bin,
                              _exposure(rec, metric, len(per_bin)))
            for metric in RATE_METRICS if _has_unit(rec, metric)}


def _single_observations(rec, identities):
    """{(identity, metric): observations} of one run, what a single run's tests read.
    Rates: ("rate", counts, exposures) of its BIN_NS bins (counts scaled so that
    unsampled waits count); wait statistics: (statistic, sampled waits, value, count),
    value and count None where they are the sample's own."""
    aggs, samples = identified(rec)
    nbins = _nbins(rec)
    out = {}
    if locks.streamed(rec):
        return _streamed_observations(rec, aggs, sorted(identities), nbins)
    if samples.empty:
        return out
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
        scale = counts.get(ident, len(rows)) / len(rows)
        out.update(_rate_observations(
            rec, ident, np.bincount(b, minlength=nbins) * scale,
            np.bincount(b, weights=waits, minlength=nbins) * scale))
        for metric, stat in (("mean wait", "mean"), ("p50 wait", 0.5), ("p99 wait", 0.99)):
            if len(waits) >= MIN_WAITS[metric]:
                out[(ident, metric)] = (stat, waits, None, None)
    return out


def _streamed_stats(rec):
    """What a comparison needs of a big recording's samples, per identity of its
    aggregates, in two passes over them (once per recording): count, exact p50/p99,
    waits and wait time per BIN_NS bin and total wait (first pass), and a uniform
    sample of about SAMPLE_CAP waits (second pass, each wait kept with chance
    SAMPLE_CAP/count, no sort: a single run's tests read it)."""
    def compute():
        aggs, _ = identified(rec)
        idents = list(aggs["identity"].cat.categories) if not aggs.empty else []
        k, nbins = len(idents), _nbins(rec)
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
        q, n = locks.streamed_quantiles(chunks, k, [0.5, 0.99])
        r = np.concatenate([c[0] for c in kept]) if kept else np.array([], np.int64)
        w = np.concatenate([c[1] for c in kept]) if kept else np.array([])
        return dict(acc, r=r, w=w, identities=idents, q=q, n=n, nbins=nbins)
    return rec.derived("streamed_stats", compute)


def _read_streamed(recs):
    """_streamed_stats() of the big recordings among recs, ahead of compare()'s reads
    (whose `locks` argument hides this module's)."""
    big = list({id(r): r for r in recs if locks.streamed(r)}.values())
    if len(big) > 1:    # two at once: reading, checksums and hashing release the GIL
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(_streamed_stats, big))


def _accumulate(acc, rows, waits, ts, t0, k, nbins):
    """_streamed_stats()'s first pass over one chunk."""
    ok = rows >= 0
    rows, waits, ts = rows[ok], waits[ok].astype(np.float64), ts[ok]
    cell = rows * nbins + np.clip((ts - t0) // BIN_NS, 0, nbins - 1)
    acc["per_bin"] += np.bincount(cell, minlength=k * nbins)
    acc["wsum"] += np.bincount(cell, weights=waits, minlength=k * nbins)
    acc["total"] += np.bincount(rows, weights=waits, minlength=k)


def _streamed_observations(rec, aggs, identities, nbins):
    """_single_observations() of a recording read chunk by chunk (_streamed_stats):
    the rates' bins exactly; for the wait statistics the sample of ~SAMPLE_CAP waits,
    with the exact mean and percentiles as the values."""
    st = _streamed_stats(rec)
    pos = {ident: i for i, ident in enumerate(st["identities"])}
    counts = aggs.groupby("identity", observed=True)["count"].sum()
    nb, out = st["nbins"], {}
    for ident in identities:
        i = pos.get(ident)
        if i is None or not st["n"][i]:
            continue
        n = st["n"][i]
        scale = counts.get(ident, n) / n
        out.update(_rate_observations(rec, ident, st["per_bin"][i * nb:(i + 1) * nb] * scale,
                                      st["wsum"][i * nb:(i + 1) * nb] * scale))
        sample = st["w"][st["r"] == i]
        for metric, stat, value in (("mean wait", "mean", st["total"][i] / n),
                                    ("p50 wait", 0.5, st["q"][i, 0]),
                                    ("p99 wait", 0.99, st["q"][i, 1])):
            if n >= MIN_WAITS[metric]:
                out[(ident, metric)] = (stat, sample, value, int(n))
    return out


# --- the tests ----------------------------------------------------------------------

def _welch_df(vb, db, vn, dn):
    """Welch-Satterthwaite degrees of freedom of vb + vn (the variances of two
    estimates, on db and dn degrees of freedom)."""
    return (vb + vn) ** 2 / sum(v * v / d for v, d in ((vb, db), (vn, dn)) if v > 0)


class Welch:
    """Welch's t of NEW against BASE: diff of the two sides' estimates (of their logs
    when `log`), their variances vb, vn on db, dn degrees of freedom. The ratio's
    interval is exp(diff +- t se) on logs, the change's BASE x (ratio - 1); without
    logs (a side has a zero) the change's is diff +- t se."""

    def __init__(self, diff, vb, db, vn, dn, base, log=True):
        self.diff, self.se, self.base, self.log = diff, np.sqrt(vb + vn), base, log
        self.df = _welch_df(vb, db, vn, dn) if self.se > 0 else np.inf

    def p(self):
        if self.se == 0:                    # no spread on either side: the change is exact
            return 0.0 if self.diff else 1.0
        return float(2 * special.stdtr(self.df, -abs(self.diff) / self.se))

    def interval(self, alpha):
        """(change low, high, ratio low, high) at level 1 - alpha."""
        h = self.se * special.stdtrit(self.df, 1 - alpha / 2) if self.se > 0 else 0.0
        lo, hi = self.diff - h, self.diff + h
        if self.log:
            rlo, rhi = np.exp(lo), np.exp(hi)
            return self.base * (rlo - 1), self.base * (rhi - 1), rlo, rhi
        if self.base > 0:
            return lo, hi, max(0.0, 1 + lo / self.base), 1 + hi / self.base
        return lo, hi, np.nan, np.nan


def runs_test(b, n):
    """Welch's t over runs (a value per run): on logs when every value is positive,
    else on the values; None with fewer than MIN_RUNS values on a side."""
    b, n = np.asarray(b, np.float64), np.asarray(n, np.float64)
    if min(len(b), len(n)) < MIN_RUNS:
        return None
    base, log = b.mean(), (b > 0).all() and (n > 0).all()
    if log:
        b, n = np.log(b), np.log(n)
    return Welch(n.mean() - b.mean(), b.var(ddof=1) / len(b), len(b) - 1,
                 n.var(ddof=1) / len(n), len(n) - 1, base, log)


def rate_test(b, n):
    """A rate within one run a side: (counts, exposures) of each side's bins, the rate
    their ratio of sums and its variance the ratio estimator's over the k bins (k - 1
    degrees of freedom): a bin weighs as much as its exposure (a run's last, partial
    bin little). On logs unless a side's rate is zero."""
    est = []
    for c, e in (b, n):
        if len(e) < 2 or not np.isfinite(e).all():
            return None
        k, r = len(c), c.sum() / e.sum()
        est.append((r, k / (k - 1) * ((c - r * e) ** 2).sum() / e.sum() ** 2, k - 1))
    (rb, vb, db), (rn, vn, dn) = est
    if rb > 0 and rn > 0:
        return Welch(np.log(rn / rb), vb / rb ** 2, db, vn / rn ** 2, dn, rb)
    return Welch(rn - rb, vb, db, vn, dn, rb, log=False)


def mean_test(b, n):
    """The mean wait within one run a side: (sampled waits, mean, count) of each side
    (the sample may be a uniform part of count waits); Welch's t on the log of the
    means (their variances by the delta method: the waits' variance / (count mean^2))."""
    (bs, bm, bn), (ns, nm, nn) = b, n
    if min(len(bs), len(ns)) < 2 or not (bm > 0 and nm > 0):
        return None
    return Welch(np.log(nm / bm), bs.var(ddof=1) / (bn * bm * bm), len(bs) - 1,
                 ns.var(ddof=1) / (nn * nm * nm), len(ns) - 1, bm)


class QuantileTest:
    """The q-quantile (nearest rank) of the waits within one run a side, from samples
    of them: how many of NEW's waits are above the pooled waits' q-quantile. When both
    sides come from one distribution that count is hypergeometric, whatever the
    distribution (Mood's median test at q = 0.5): the test is exact. The interval of
    the ratio: the ratios r for which NEW's waits / r pass it."""

    def __init__(self, b, n, q, base):
        self.b, self.n = (np.sort(np.asarray(x, np.float64)) for x in (b, n))
        self.q, self.base = q, base
        self.k = int(quantile_index(len(self.b) + len(self.n), q))

    def _p(self, ratio):
        """The test of NEW's waits / ratio against BASE's."""
        from scipy.stats import hypergeom
        b, n = self.b, self.n
        t = _kth_of_two(b, n, self.k, 1 / ratio)
        above_n = len(n) - np.searchsorted(n, t * ratio, "right")
        above = above_n + len(b) - np.searchsorted(b, t, "right")
        dist = hypergeom(len(b) + len(n), above, len(n))
        return float(min(1.0, 2 * min(dist.cdf(above_n), dist.sf(above_n - 1))))

    def p(self):
        return self._p(1.0)

    def interval(self, alpha):
        """(change low, high, ratio low, high) at level 1 - alpha: the test inverted by
        bisection on log ratio (the count above falls as the ratio grows, so the
        p-value rises and falls once along it)."""
        if min(self.b[0], self.n[0]) <= 0:
            return (np.nan,) * 4
        qb, qn = (x[quantile_index(len(x), self.q)] for x in (self.b, self.n))
        start = np.log(qn / qb)            # NEW / ratio has BASE's quantile there
        span = np.log(max(self.n[-1], self.b[-1]) / min(self.n[0], self.b[0])) + 1
        ends = []
        for sign in (-1, 1):
            inside, step, out = start, 1e-3, None
            while step < 2 * span:          # outward until the test rejects
                if self._p(np.exp(start + sign * step)) <= alpha:
                    out = start + sign * step
                    break
                inside, step = start + sign * step, step * 2
            if out is None:                 # it never does: no bound on that side
                ends.append(sign * np.inf)
                continue
            for _ in range(30):
                mid = (inside + out) / 2
                if self._p(np.exp(mid)) <= alpha:
                    out = mid
                else:
                    inside = mid
            ends.append(inside)
        rlo, rhi = np.exp(ends)
        return self.base * (rlo - 1), self.base * (rhi - 1), rlo, rhi


def _kth_of_two(a, b, k, scale=1.0):
    """The (k+1)-th smallest of sorted a and sorted b * scale together (a binary
    search on how many of them are a's)."""
    lo, hi = max(0, k + 1 - len(b)), min(k + 1, len(a))
    while lo < hi:
        i = (lo + hi) // 2
        if b[k - i] * scale > a[i]:         # b's (k+1-i)-th is above a's (i+1)-th: more of a
            lo = i + 1
        else:
            hi = i
    i, j = lo, k + 1 - lo
    return max(a[i - 1] if i else -np.inf, b[j - 1] * scale if j else -np.inf)


def single_test(b, n, base):
    """The test of one metric within one run a side, from _single_observations()'s
    observations of each side; None without one."""
    if b is None or n is None:
        return None
    if b[0] == "rate":
        return rate_test(b[1:], n[1:])
    stat, sides = b[0], []
    for _, sample, value, count in (b, n):
        sides.append((sample, sample.mean() if value is None else value,
                      len(sample) if count is None else count))
    if stat == "mean":
        return mean_test(*sides)
    return QuantileTest(b[1], n[1], stat, base) if min(len(b[1]), len(n[1])) else None


def bh_adjusted(p):
    """Benjamini-Hochberg's adjusted p-values (a row is rejected at FDR q when its
    adjusted p-value is <= q)."""
    p = np.asarray(p, np.float64)
    m = len(p)
    order = np.argsort(p)
    adj = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


NEW, GONE = "new in NEW", "gone in NEW"     # a probe metric seen on one side only


def _verdict(better, significant, change, ratio, threshold):
    """significant: whether the row's test rejects no change after the family's
    adjustment (None: the row has no test)."""
    if better == "none":
        return "(context)"
    if significant is None:
        return "no CI (too few runs)"
    if not significant:
        return "no significant change"
    rel = abs(ratio - 1) if np.isfinite(ratio) else np.inf
    if rel < threshold:
        return "no significant change"
    worse = change > 0 if better == "lower" else change < 0
    return "regressed" if worse else "improved"


def judge(rows, threshold=0.05, fdr=FDR):
    """The verdicts of a report: rows are dicts (base, new, change, ratio, better, the
    row's `test` or None, and a `verdict` where it is already known). Benjamini-Hochberg
    at `fdr` over the rows with a test; every interval at the level BH used, 1 - R fdr / m
    for R rejections of m tests (1 - fdr / m for none): the false coverage rate's level,
    at which a row's interval excludes no change exactly when BH rejects it."""
    tested = [r for r in rows if r.get("test") is not None and r["better"] != "none"
              and "verdict" not in r]
    p = np.array([r["test"].p() for r in tested])
    adj = bh_adjusted(p)
    rejected = adj <= fdr
    alpha = fdr * max(int(rejected.sum()), 1) / max(len(tested), 1)
    for r, pv, pa, rej in zip(tested, p, adj, rejected):
        r["ci_low"], r["ci_high"], r["ratio_ci_low"], r["ratio_ci_high"] = \
            r["test"].interval(alpha)
        r.update(p_value=pv, p_adjusted=pa, ci_level=1 - alpha,
                 verdict=_verdict(r["better"], bool(rej), r["change"], r["ratio"], threshold))
    for r in rows:
        r.setdefault("verdict", _verdict(r["better"], None, r["change"], r["ratio"],
                                         threshold))
    return sort_by_effect(pd.DataFrame(rows, columns=COLUMNS))


# --- the comparison -----------------------------------------------------------------

def _row(kind, name, metric, better, unit, bv, nv, n_base, n_new):
    return {"kind": kind, "name": name, "metric": metric, "unit": unit, "better": better,
            "base": bv, "new": nv, "change": nv - bv,
            "ratio": nv / bv if bv else (np.inf if nv else 1.0),
            "ci_low": np.nan, "ci_high": np.nan, "ratio_ci_low": np.nan,
            "ratio_ci_high": np.nan, "n_base": n_base, "n_new": n_new,
            "p_value": np.nan, "p_adjusted": np.nan, "ci_level": np.nan}


def compare_values(rows, threshold=0.05, fdr=FDR):
    """compare() from the runs' values: rows of (kind, name, metric, better, unit,
    BASE's values, NEW's values), one value a run (NaN: that run has none). Each side's
    value is the mean of its runs'; the test is runs_test()'s."""
    out = []
    for kind, name, metric, better, unit, b, n in rows:
        b, n = (np.asarray(x, np.float64) for x in (b, n))
        b, n = b[~np.isnan(b)], n[~np.isnan(n)]
        row = _row(kind, name, metric, better, unit, b.mean() if len(b) else np.nan,
                   n.mean() if len(n) else np.nan, len(b), len(n))
        row["test"] = runs_test(b, n) if better != "none" else None
        # a probe metric only one side has (a lock order edge a patch adds): one line
        if kind == "probe" and better != "none" and bool(len(b)) != bool(len(n)):
            row["verdict"] = NEW if len(n) else GONE
        out.append(row)
    return judge(out, threshold, fdr)


def compare(base, new, threshold=0.05, limit=20, fdr=FDR, locks=(), metrics=()):
    """One row per (lock identity or probe, metric): base and new values, change, its
    interval (absolute and ratio), p-values, verdict; sorted by effect size.

    base, new: lists of Recordings (one or several runs each). locks (globs on the
    identity, `kvm->slots_lock*`) and metrics (of LOCK_METRICS) narrow the family the
    false discovery rate is held over to the rows a reviewer asks about beforehand (a
    patch to one lock): fewer tests, more power. Given either, probe rows are left out."""
    import fnmatch
    unknown = sorted(set(metrics) - set(LOCK_METRICS))
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}: one of {', '.join(LOCK_METRICS)}")
    lock_metrics = {m: v for m, v in LOCK_METRICS.items() if not metrics or m in metrics}
    probes = not (locks or metrics)
    _read_streamed((*base, *new))
    bl = [lock_values(r) for r in base]
    nl = [lock_values(r) for r in new]
    pooled = pd.concat([*bl, *nl]).groupby("identity")["total_ns"].sum()
    ranked = [i for i in pooled.sort_values(ascending=False).index
              if not locks or any(fnmatch.fnmatchcase(str(i), p) for p in locks)]
    identities = ranked[:limit]
    bt, nt = ([t.set_index("identity").to_dict("index") for t in side] for side in (bl, nl))
    if len(base) > 1 or len(new) > 1:
        rows = []
        for ident in identities:
            for metric, (better, unit) in lock_metrics.items():
                b = [_run_value(t, r, ident, metric) for t, r in zip(bt, base)]
                n = [_run_value(t, r, ident, metric) for t, r in zip(nt, new)]
                if not (np.isnan(b).all() and np.isnan(n).all()):
                    rows.append(("lock", ident, metric, better, unit, b, n))
        bp, np_ = ([probe_values(r) for r in side] if probes else [] for side in (base, new))
        for key in sorted(set().union(*bp, *np_)):
            rows.append(("probe", key[0], "", key[1], key[2], [p.get(key, np.nan) for p in bp],
                         [p.get(key, np.nan) for p in np_]))
        return compare_values(rows, threshold, fdr)
    return judge(_single_rows(base[0], new[0], bt[0], nt[0], identities, lock_metrics,
                              probes), threshold, fdr)


def _single_rows(base, new, bt, nt, identities, lock_metrics=LOCK_METRICS, probes=True):
    """compare()'s rows for one run a side, each with its single_test()."""
    bo, no = (_single_observations(r, set(identities)) for r in (base, new))
    rows = []
    for ident in identities:
        for metric, (better, unit) in lock_metrics.items():
            b, n = bo.get((ident, metric)), no.get((ident, metric))
            if b is None and n is None:     # no samples: the point values, no test
                bv, nv = _run_value(bt, base, ident, metric), _run_value(nt, new, ident, metric)
                if not (np.isnan(bv) and np.isnan(nv)):
                    rows.append(dict(_row("lock", ident, metric, better, unit, bv, nv, 1, 1),
                                     verdict="no CI (no samples)"))
                continue
            if metric in RATE_METRICS:      # a run that did not contend: rate 0
                b, n = (o or ("rate", np.zeros(_nbins(r)), _exposure(r, metric, _nbins(r)))
                        if _has_unit(r, metric) else o for o, r in ((b, base), (n, new)))
            values = [observed_value(o) for o in (b, n)]
            row = _row("lock", ident, metric, better, unit, *(v for v, _ in values),
                       *(c for _, c in values))
            row["test"] = single_test(b, n, row["base"])
            if row["test"] is None:
                row["verdict"] = "no CI" if metric in RATE_METRICS else "no CI (too few waits)"
            rows.append(row)
    bp, np_ = (probe_values(r) if probes else {} for r in (base, new))
    for key in sorted(set(bp) | set(np_)):
        bv, nv = bp.get(key, np.nan), np_.get(key, np.nan)
        row = _row("probe", key[0], "", key[1], key[2], bv, nv, int(bv == bv), int(nv == nv))
        if key[1] != "none":
            row["verdict"] = (NEW if nv == nv else GONE) if (bv == bv) != (nv == nv) else \
                "no CI (one run per side)"
        rows.append(row)
    return rows


def observed_value(obs):
    """(value, count) of one side's single-run observations (NaN, 0 without)."""
    if obs is None:
        return np.nan, 0
    if obs[0] == "rate":
        return obs[1].sum() / obs[2].sum(), len(obs[1])
    stat, sample, value, count = obs
    if value is None:
        value = sample.mean() if stat == "mean" else \
            np.quantile(sample, stat, method=locks.QUANTILE_METHOD)
    return value, len(sample) if count is None else count


def _run_value(table, rec, ident, metric):
    """One run's value of a lock metric ({identity: {metric: value}}); a lock the run
    did not contend has rate 0 (where the rate's unit exists in that run) and no wait
    statistics."""
    row = table.get(ident)
    if row is not None:
        return float(row[metric])
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


def work_rate(rec, unit):
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
        per_run = {name: np.array([work_rate(r, unit) for r in recs])
                   for name, recs in sides.items()}
        rates = {name: v.mean() for name, v in per_run.items()}
        lo, hi = sorted(rates.values())
        if hi and (lo == 0 or hi / lo > WORK_FOLD or _work_differs(*per_run.values())):
            warn.append(f"the work done differs: {unit}s/s BASE {rates['BASE']:,.0f}, NEW "
                        f"{rates['NEW']:,.0f}: per-second rates and wait times mix workload "
                        f"and locking, read the waits/{unit} rows")
    return refuse, warn


def _work_differs(base, new, threshold=0.05):
    """Whether the runs' work rates differ beyond their run-to-run noise (Welch's t
    on their logs rejects no change at 5%, by `threshold` or more): the sides did not
    carry the same load, whatever the locks did. Same-workload runs on a noisy host
    do this too (memslot churn ran at 15-30k ops per run on one side and 20-48k on
    the other in an A/A pair of 6 runs each), and then every lock the load drives
    moves with it."""
    if min(len(base), len(new)) < MIN_RUNS or not (base.all() and new.all()):
        return False
    change, ratio = new.mean() - base.mean(), new.mean() / base.mean()
    return _verdict("higher", runs_test(base, new).p() < 0.05, change, ratio,
                    threshold) in ("improved", "regressed")
