"""compare's statistics and checks on small inputs built here (no BPF)."""
import numpy as np
import pytest

from kvmlockprof.analysis import compare
from kvmlockprof.recording.store import Recording


def test_expanded_level_widens_for_few_runs():
    assert compare.confidence_level(1000) == pytest.approx(0.95, abs=0.002)
    assert compare.confidence_level(5) > 0.99          # a handful of runs: much wider
    assert np.isnan(compare.confidence_level(1))


def test_interval_covers_an_exact_shift_and_refuses_one_value():
    rng = np.random.default_rng(1)
    base = rng.normal(100, 5, 400)
    new = base + 20                                     # the change is exactly +20
    lo, hi, rlo, rhi = compare._interval(base, new, "mean", rng, 2000)
    assert lo < 20 < hi and lo > 0
    assert rlo < np.mean(new) / np.mean(base) < rhi
    assert all(np.isnan(compare._interval(np.array([1.0]), new, "mean", rng, 100)))


def test_resampled_quantiles_are_drawn_as_resampling_draws_them():
    """quantile_resamples() against the bootstrap done the long way (numpy's quantile
    of explicit resamples), ties and both ends included."""
    from scipy import stats
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.lognormal(7, 1.2, 90).round(), [500.0] * 11])   # ties
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        ours = compare.quantile_resamples(x, q, rng, 20000)
        long = np.quantile(rng.choice(x, (20000, len(x))), q, axis=1, method="inverted_cdf")
        assert stats.ks_2samp(ours, long).pvalue > 1e-3, q
        assert np.isin(ours, long).mean() > 0.95 or q not in (0.0, 1.0)


@pytest.mark.parametrize("stat", ["mean", 0.5, 0.99])
def test_interval_matches_scipy_bootstrap(stat):
    """The interval of a change between two big samples of skewed waits, against
    scipy's own percentile bootstrap (resampling) and, for the mean, Welch's
    interval: endpoints within a tenth of the width (the bootstraps' own noise)."""
    from scipy import stats
    rng = np.random.default_rng(3)
    n = 4000 if stat == "mean" else compare.QUANTILE_CAP
    base, new = rng.lognormal(8, 1.0, n), rng.lognormal(8.05, 1.0, n)
    ours = np.array(compare._interval(base, new, stat, rng, 4000))
    fn = (lambda b, m, axis=-1: np.mean(m, axis) - np.mean(b, axis)) if stat == "mean" else \
        (lambda b, m, axis=-1: np.quantile(m, stat, axis=axis, method="inverted_cdf") -
         np.quantile(b, stat, axis=axis, method="inverted_cdf"))
    ref = stats.bootstrap((base, new), fn, n_resamples=4000, method="percentile",
                          vectorized=True, rng=rng, batch=200,
                          confidence_level=compare.confidence_level(n)).confidence_interval
    width = ref.high - ref.low
    assert abs(ours[0] - ref.low) < 0.1 * width and abs(ours[1] - ref.high) < 0.1 * width
    if stat == "mean":
        welch = stats.ttest_ind(new, base, equal_var=False).confidence_interval(
            compare.confidence_level(n))
        assert abs(ours[0] - welch.low) < 0.1 * width and abs(ours[1] - welch.high) < 0.1 * width


def test_verdicts():
    v = compare._verdict
    assert v("lower", 5, 10, 7, 1.5, 0.05) == "regressed"
    assert v("lower", -10, -5, -7, 0.5, 0.05) == "improved"
    assert v("higher", -10, -5, -7, 0.5, 0.05) == "regressed"      # a hit ratio fell
    assert v("lower", -1, 5, 2, 1.2, 0.05) == "no significant change"
    assert v("lower", 1, 2, 1.5, 1.01, 0.05) == "no significant change"   # below threshold
    assert v("lower", np.nan, np.nan, 1, 2, 0.05).startswith("no CI")


def test_identity_drops_addresses_pids_and_offsets():
    a = compare.lock_identity("0xffff888100de9008", "mutex", "kvm_vm_ioctl+0xb19")
    b = compare.lock_identity("0xffff888102ece008", "mutex", "kvm_vm_ioctl+0xa00")
    assert a == b == "? mutex @ kvm_vm_ioctl"
    assert compare.lock_identity("kvm(1234)->mmu_lock", "rwlock:W", "x+0x1") == \
        compare.lock_identity("kvm(99)->mmu_lock", "rwlock:W", "x+0x2")


def _rec(probes, end=1000, lost=0, work=None):
    return Recording("r", {"duration_s": 2.0, "probes": probes, "counters": {"end": end},
                           "losses": {"lost_ringbuf_full": lost}, "work": work or {}}, {})


TP = {"contention": {"status": "attached", "method": "tracepoint", "sample_every": 1}}


def test_check_refuses_different_probes_and_losses():
    fentry = dict(TP, gpc={"status": "attached", "method": "fentry"})
    refuse, _ = compare.check([_rec(TP)], [_rec(fentry)])
    assert refuse and "different probes" in refuse[0]
    kprobe = dict(TP, gpc={"status": "attached", "method": "kprobe"})
    refuse, _ = compare.check([_rec(kprobe)], [_rec(fentry)])      # same probe, other method
    assert refuse and "attach methods" in refuse[0]
    refuse, _ = compare.check([_rec(TP)], [_rec(TP, lost=300)])
    assert refuse and "loss rates differ" in refuse[0]
    assert compare.check([_rec(TP)], [_rec(TP, lost=5)]) == ([], [])


def test_check_warns_when_work_differs():
    _, warn = compare.check([_rec(TP, work={"exits_total": 1000})],
                            [_rec(TP, work={"exits_total": 9000})])
    assert warn and "waits/exit" in warn[0]


def test_check_warns_when_runs_carried_different_loads():
    """Less than 2x apart, but beyond the runs' own noise: the sides did not carry
    the same load (an A/A pair of 6 runs each saw this), so every verdict on a lock
    the load drives is confounded; within the noise, no warning."""
    def side(ops):
        return [_rec(TP, work={"exits_total": 1000, "churn_ops": o}) for o in ops]
    _, warn = compare.check(side([29878, 17778, 20563, 16261, 23988, 14678]),
                            side([35326, 48106, 36252, 34481, 19861, 37256]))
    assert len(warn) == 1 and "memslot ops/s" in warn[0] and "waits/memslot op" in warn[0]
    _, warn = compare.check(side([20000, 21000, 19500, 20500]),
                            side([20800, 19700, 20300, 21100]))
    assert warn == []
