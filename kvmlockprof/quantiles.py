"""The one quantile definition of every view (exact, streamed, log2 bound, compare,
top, HTML) and the in-kernel log2 histograms' buckets: below every layer, as the
probes' analyses need them too."""
from kvmlockprof.lazy import np


def hist_bounds(slots):
    """(lo, hi) ns of in-kernel log2 histogram slots: the rule of bcc's bpf_log2l(),
    which fills them (bpf/contention.h): slot s holds [2^(s-1), 2^s), slot 1 from 0."""
    slots = np.asarray(slots, dtype=np.int64)
    return np.where(slots > 1, 2 ** np.maximum(slots - 1, 0), 0), 2 ** slots


def hist_buckets(hist):
    """(lo_ns, hi_ns, count) of a histogram's non-empty slots."""
    hist = np.asarray(hist)
    slots = np.flatnonzero(hist)
    lo, hi = hist_bounds(slots)
    return lo, hi, hist[slots]


# One quantile definition everywhere (exact, streamed, log2 bound, compare, top, HTML):
# nearest rank, numpy's "inverted_cdf": the smallest wait that at least a fraction q
# of the waits do not exceed. It is always a wait that happened, and the log2 bucket
# holding it bounds it whatever the other waits are (an interpolated quantile can lie
# in a bucket no wait fell into).
QUANTILE_METHOD = "inverted_cdf"


def quantile_index(n, q):
    """The 0-based order statistic of the q-quantile of n values (nearest rank),
    computed as numpy's inverted_cdf computes it."""
    return np.clip(np.ceil(np.asarray(n, np.float64) * q - 1), 0,
                   np.maximum(np.asarray(n) - 1, 0)).astype(np.int64)


def quantiles(values, qs):
    """The nearest-rank quantiles qs of values (QUANTILE_METHOD)."""
    return np.quantile(values, qs, method=QUANTILE_METHOD)


def hist_quantile(hist, q):
    """Upper bound of the log2 bucket holding the q-quantile (QUANTILE_METHOD) of the
    waits the histogram counts: the quantile is below it and (past 2 ns) at least half of it."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total == 0:
        return np.nan
    rank = quantile_index(np.ceil(total - 1e-9), q) + 1    # (a spread histogram is fractional)
    slot = int(np.searchsorted(np.cumsum(hist), rank - 1e-9, side="left"))
    return float(hist_bounds(min(slot, len(hist) - 1))[1])
