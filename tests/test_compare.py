"""compare's statistics and checks on small inputs built here (no BPF)."""
import numpy as np
import pandas as pd
import pytest

from kvmlockprof.analysis import compare
from kvmlockprof.recording.store import Recording


def test_runs_test_is_welchs_t_on_logs():
    """runs_test() against scipy's Welch test of the runs' log values, and its interval
    of the ratio against the same test's interval of the difference of the logs."""
    from scipy import stats
    rng = np.random.default_rng(1)
    base, new = rng.lognormal(5, 0.3, 5), rng.lognormal(5.4, 0.5, 4)
    t = compare.runs_test(base, new)
    ref = stats.ttest_ind(np.log(new), np.log(base), equal_var=False)
    assert t.p() == pytest.approx(ref.pvalue, rel=1e-9)
    lo, hi, rlo, rhi = t.interval(0.01)
    ci = ref.confidence_interval(0.99)
    assert (np.log(rlo), np.log(rhi)) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert (lo, hi) == pytest.approx((base.mean() * (rlo - 1), base.mean() * (rhi - 1)))
    assert compare.runs_test(base[:2], new) is None                 # < MIN_RUNS runs
    zero = compare.runs_test([0.0, 1, 2], [3.0, 4, 5])              # a run without: no logs
    assert zero.p() == pytest.approx(stats.ttest_ind([3, 4, 5], [0, 1, 2],
                                                     equal_var=False).pvalue)
    same = compare.runs_test([2.0, 2, 2], [3.0, 3, 3])              # no spread: exact
    assert same.p() == 0 and same.interval(0.05)[2:] == pytest.approx((1.5, 1.5))


def test_bh_adjusted_is_scipys():
    from scipy import stats
    p = np.random.default_rng(2).uniform(0, 0.2, 40) ** 2
    np.testing.assert_allclose(compare.bh_adjusted(p), stats.false_discovery_control(p))


def test_verdicts():
    v = compare._verdict
    assert v("lower", True, 7, 1.5, 0.05) == "regressed"
    assert v("lower", True, -7, 0.5, 0.05) == "improved"
    assert v("higher", True, -7, 0.5, 0.05) == "regressed"      # a hit ratio fell
    assert v("lower", False, 2, 1.2, 0.05) == "no significant change"
    assert v("lower", True, 1.5, 1.01, 0.05) == "no significant change"   # below threshold
    assert v("lower", None, 1, 2, 0.05).startswith("no CI")


def test_intervals_are_at_the_level_bh_rejects():
    """A row's interval excludes no change exactly when Benjamini-Hochberg flags it,
    at the level 1 - R x 5% / m it used (R flagged of m)."""
    rng = np.random.default_rng(4)
    rows = [("lock", f"l{i}", "mean wait", "lower", "ns", rng.lognormal(0, 0.2, 5),
             rng.lognormal(1.0 if i < 4 else 0, 0.2, 5)) for i in range(30)]
    df = compare.compare_values(rows, threshold=0)
    flagged = df["verdict"].isin(["improved", "regressed"])
    assert 0 < flagged.sum() < 30
    assert (df["ci_level"] == 1 - 0.05 * flagged.sum() / 30).all()
    excludes = (df["ratio_ci_low"] > 1) | (df["ratio_ci_high"] < 1)
    assert (excludes == flagged).all()
    assert (excludes == ((df["ci_low"] > 0) | (df["ci_high"] < 0))).all()
    assert (flagged == (df["p_adjusted"] <= 0.05)).all()


# --- calibration, against simulated runs whose truth the test sets -----------------

def _report_values(rng, runs, locks=20, cv=0.2, changed=None):
    """Per run, per lock, the 7 lock metrics' values as real runs have them: lognormal
    run-to-run noise at `cv` (each lock's a little more or less), half of it a host
    factor every lock of a run shares, the waits/s, /exit and /memslot op of a lock
    one count over different work, wait/s its count times its mean wait, p50 and p99
    moving with the mean. changed: (factor, cv) of lock 0's waits on the NEW side
    (the mean, p50, p99 and wait/s scale with it) and of their noise."""
    sd = lambda c: np.sqrt(np.log1p(c * c))                       # noqa: E731
    n = sum(runs)
    spread = np.exp(rng.normal(0, 0.3, (2, locks)))
    sc, sw = sd(cv) * spread
    if changed:
        sw[0] = sd(changed[1])
    host, host_w = rng.normal(size=n), rng.normal(size=n)
    count = sc[:, None] * (np.sqrt(0.5) * host + np.sqrt(0.5) * rng.normal(size=(locks, n)))
    wait = sw[:, None] * (np.sqrt(0.5) * (host + host_w) / np.sqrt(2) +
                          np.sqrt(0.5) * rng.normal(size=(locks, n)))
    if changed:
        wait[0, runs[0]:] += np.log(changed[0])
    exits = sd(0.1) * (np.sqrt(0.5) * host + np.sqrt(0.5) * rng.normal(size=n))
    ops = sd(0.2) * (np.sqrt(0.5) * host + np.sqrt(0.5) * rng.normal(size=n))
    count, mean = np.exp(7 + count), np.exp(8 + wait)
    return {"waits/s": count, "wait/s": count * mean, "waits/exit": count / np.exp(2 + exits),
            "waits/memslot op": count / np.exp(1 + ops), "mean wait": mean,
            "p50 wait": mean * 0.5 * np.exp(0.5 * sw[:, None] * rng.normal(size=(locks, n))),
            "p99 wait": mean * 9 * np.exp(0.7 * sw[:, None] * rng.normal(size=(locks, n)))}


def _simulated_compare(monkeypatch, rng, runs, reports, focus=None, **kw):
    """compare.compare() on simulated runs (their lock_values), `reports` times: the
    verdicts of each report's 20 locks x 7 metrics, as a list of DataFrames."""
    runs_of = {}
    monkeypatch.setattr(compare, "lock_values", lambda rec: runs_of[id(rec)])
    monkeypatch.setattr(compare, "probe_values", lambda rec: {})
    work = {"exits_total": 1000, "churn_ops": 100}
    out = []
    for _ in range(reports):
        values = _report_values(rng, runs, **kw)
        recs = [_rec(TP, work=work) for _ in range(sum(runs))]
        for i, rec in enumerate(recs):
            table = pd.DataFrame({m: v[:, i] for m, v in values.items()})
            table.insert(0, "identity", [f"lock{j}" for j in range(len(table))])
            runs_of[id(rec)] = table.assign(total_ns=table["wait/s"])
        out.append(compare.compare(recs[:runs[0]], recs[runs[0]:], **(focus or {})))
    return out


def test_a_a_flags_nothing_in_95_of_100_reports(monkeypatch):
    """Calibration: 300 simulated A/A reports of 5 runs a side (20 locks x 7 metrics,
    run-to-run CV 20%): the share of reports that flag anything is the family's 5% at
    most (bench/compare_calibration.py: 2.8% of 4000); 21 of 300 or more would happen
    0.3% of the time at 5%. The bootstrap this replaced flagged 17 of 20 such reports."""
    rng = np.random.default_rng(5)
    reports = _simulated_compare(monkeypatch, rng, (5, 5), 300)
    assert all(len(df) == 140 and df["p_value"].notna().all() for df in reports)
    flagged = [df for df in reports if df["verdict"].isin(["improved", "regressed"]).any()]
    assert len(flagged) <= 20, len(flagged)


def test_a_known_change_is_found(monkeypatch):
    """Power: lock 0's waits twice as long on the NEW side (mean, p50, p99 and wait/s
    with them) at run-to-run CV 40%: with 15 runs a side its mean wait is flagged as
    regressed in 65% of reports or more (bench/compare_calibration.py: 81% of 1000;
    with 5 runs a side 4%, with 10 44%), and the false discovery rate holds."""
    rng = np.random.default_rng(6)
    reports = _simulated_compare(monkeypatch, rng, (15, 15), 100, cv=0.4, changed=(2.0, 0.4))
    found = [df.loc[(df["name"] == "lock0") & (df["metric"] == "mean wait"), "verdict"].item()
             == "regressed" for df in reports]
    assert sum(found) >= 65, sum(found)
    false = [((df["name"] != "lock0") | ~df["metric"].isin(
        ["mean wait", "p50 wait", "p99 wait", "wait/s"])) & df["verdict"].isin(
        ["improved", "regressed"]) for df in reports]
    fdp = [f.sum() / max(df["verdict"].isin(["improved", "regressed"]).sum(), 1)
           for f, df in zip(false, reports)]
    assert np.mean(fdp) <= 0.1, np.mean(fdp)


def test_a_family_narrowed_beforehand_finds_a_known_change_at_5_runs(monkeypatch):
    """compare -L lock0 --metric 'mean wait': the family is the one row a reviewer
    asked about beforehand, so at 5 runs a side a 2x mean wait at CV 40% is found in
    55 of 100 reports or more (bench: 68% of 4000), and with no change flagged in 10 of
    100 at most (bench: 5%)."""
    focus = dict(locks=("lock0",), metrics=("mean wait",))
    rng = np.random.default_rng(8)
    found = _simulated_compare(monkeypatch, rng, (5, 5), 100, focus, cv=0.4,
                               changed=(2.0, 0.4))
    assert all(len(df) == 1 for df in found)
    assert sum(df["verdict"].item() == "regressed" for df in found) >= 55
    same = _simulated_compare(monkeypatch, rng, (5, 5), 100, focus, cv=0.4)
    assert sum(df["verdict"].item() in ("improved", "regressed") for df in same) <= 10
    with pytest.raises(ValueError, match="unknown metric"):
        compare.compare([], [], metrics=("p42 wait",))


# --- one run a side --------------------------------------------------------------

def _single_aa(stat, n, pairs=200, seed=7):
    """The p-values of `pairs` A/A pairs of single runs, n waits a side drawn from one
    distribution (lognormal, sigma 1.2), for a wait statistic."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(pairs):
        b, m = rng.lognormal(9, 1.2, n).round(), rng.lognormal(9, 1.2, n).round()
        obs = [(stat, x, None, None) for x in (b, m)]
        value = b.mean() if stat == "mean" else np.quantile(b, stat, method="inverted_cdf")
        out.append(compare.single_test(*obs, value).p())
    return np.array(out)


@pytest.mark.parametrize("stat,n", [(0.99, 300), (0.99, 3000), (0.5, 1000), ("mean", 60),
                                    ("mean", 3000)])
def test_single_runs_from_one_distribution_are_flagged_at_most_5_percent(stat, n):
    """Two single runs whose waits come from one distribution: a percentile's or the
    mean's test rejects at 5% in at most 5% of 200 pairs (+ binomial slack: 18 or
    more of 200 would happen 1.3% of the time at 5%), before the report's FDR
    adjustment makes it rarer still."""
    p = _single_aa(stat, n)
    assert (p <= 0.05).sum() <= 17, np.sort(p)[:20]


def test_quantile_interval_inverts_its_test():
    """A single run's percentile interval: excludes no change exactly when the test
    rejects at its level, and covers the ratio of the two distributions' true
    quantiles (NEW's waits 1.3 x BASE's) at about its level."""
    rng = np.random.default_rng(8)
    cover = 0
    for i in range(60):
        b, n = rng.lognormal(9, 1.2, 2000), 1.3 * rng.lognormal(9, 1.2, 2000)
        q = (0.5, 0.99)[i % 2]
        t = compare.QuantileTest(b, n, q, np.quantile(b, q, method="inverted_cdf"))
        _, _, rlo, rhi = t.interval(0.1)
        assert (t.p() <= 0.1) == (not rlo <= 1 <= rhi), (t.p(), rlo, rhi)
        cover += rlo <= 1.3 <= rhi
    assert cover >= 48                      # 90% nominal: 54 of 60


def _single_recording(path, rate, seconds, rng, waits=(9, 1.2)):
    """One run: waits on one lock (mutex under kvm_vm_ioctl) arriving at `rate`/s
    (Poisson) for `seconds`, lognormal wait times."""
    from kvmlockprof.recording.arrow import to_arrow
    from kvmlockprof.recording.store import Writer
    from tests_support import aggregates_of, events, sample_manifest, sample_stacks
    n = rng.poisson(rate * seconds)
    ts = np.sort(rng.uniform(0, seconds * 1e9, n)).astype(np.uint64)
    ev = events([(int(w), 0x1000, 7, 32, 1) for w in rng.lognormal(*waits, n).round() + 1])
    ev["ts_ns"] = ts
    w = Writer(path)
    w.append("contention", to_arrow(ev))
    w.append("stacks", sample_stacks())
    w.snapshot("aggregates", to_arrow(aggregates_of(ev)))
    w.finalize(sample_manifest(len(ev), duration_s=seconds, start_monotonic_ns=0))
    import kvmlockprof
    return kvmlockprof.load(path)


def test_single_runs_of_different_lengths_have_the_same_rate(tmp_path):
    """2.0 s and 2.05 s at the same 2000 waits/s: the 2.05 s run's last bin is 50 ms
    long and weighs as much, so waits/s reads the same (it read 2000 vs 1640 when
    each bin counted as 500 ms, and was flagged) and is not flagged."""
    rng = np.random.default_rng(9)
    base = _single_recording(tmp_path / "b.parquet", 2000, 2.0, rng)
    new = _single_recording(tmp_path / "n.parquet", 2000, 2.05, rng)
    df = compare.compare([base], [new]).set_index("metric")
    assert df["p_value"].notna().sum() == 5                 # no work: no per-work rates
    row = df.loc["waits/s"]
    assert row["ratio"] == pytest.approx(1, abs=0.03) and (row["n_base"], row["n_new"]) == (4, 5)
    assert row["verdict"] == "no significant change" and row["p_value"] > 0.2


def test_single_runs_find_a_real_change(tmp_path):
    """The same lock waiting 1.5x as long and twice as often in NEW: every one of its
    metrics but the per-work rates (no work recorded) is flagged as regressed."""
    rng = np.random.default_rng(10)
    base = _single_recording(tmp_path / "b.parquet", 1000, 2.0, rng)
    new = _single_recording(tmp_path / "n.parquet", 2000, 2.0, rng, waits=(9 + np.log(1.5), 1.2))
    df = compare.compare([base], [new]).set_index("metric")
    assert (df["verdict"] == "regressed").all(), df["verdict"]
    assert df.loc["mean wait", "ratio_ci_low"] > 1.2 and df.loc["waits/s", "ratio_ci_low"] > 1.5


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


def test_classes_by_rule_match_across_runs_without_their_address():
    assert compare.lock_across_runs("zone->lock@ffff888100055800") == "zone->lock"
    assert compare.lock_across_runs("futex_hash_bucket(77)->lock@ffff8881133cd0c4") == \
        "futex_hash_bucket->lock"
    assert compare.lock_across_runs("rq(cpu 3)->__lock") == "rq(cpu 3)->__lock"
    assert compare.lock_across_runs("0xffff888100055800") == "?"
