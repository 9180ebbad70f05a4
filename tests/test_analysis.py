"""Pure analysis on small arrays built here (the live tests cover real data)."""
import numpy as np
import pytest

import kvmlockprof
from kvmlockprof.analysis import locks as analysis
from tests_support import events, small_recording


def test_lock_types_match_perf():
    assert list(analysis.lock_type([1, 5, 3, 32, 33, 2, 4])) == [
        "spinlock", "rwlock:W", "rwlock:R", "mutex", "mutex-spin", "rwsem:R", "rwsem:W"]


def test_top_by_lock_exact_percentiles(tmp_path):
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    top = analysis.top(rec, by="lock")
    first = top.iloc[0]
    assert first["lock"] == "0x1000" and first["type"] == "mutex"
    assert first["contended"] == 3 and first["total_ns"] == 5400 and first["max_ns"] == 5000
    waits = np.array([100, 300, 5000])
    assert first["p50_ns"] == np.percentile(waits, 50, method="inverted_cdf")
    assert first["p99_ns"] == np.percentile(waits, 99, method="inverted_cdf")
    assert first["pct_exact"]
    assert first["caller"] == "kvm_vm_ioctl+0x10" and first["kvm"]
    second = top.iloc[1]
    assert second["caller"] == "futex_wake+0x1" and not second["kvm"]


def test_percentiles_fall_back_to_histogram_bounds(tmp_path):
    path = small_recording(tmp_path / "r.parquet")
    rec = kvmlockprof.load(path)
    # Drop one sample: the row is no longer complete, so p50/p99 come from the hist.
    rec._cache["contention"] = rec.samples.iloc[1:]
    top = analysis.top(rec, by="lock")
    row = top[top["lock"] == "0x1000"].iloc[0]
    assert not row["pct_exact"]
    assert row["p50_ns"] == 512.0        # 300 ns lies in [256, 512)
    assert row["p99_ns"] == 8192.0       # 5000 ns lies in [4096, 8192)


def test_hist_quantile_bounds():
    h = np.zeros(64)
    h[3] = 10                            # bpf_log2l() of [4, 8) ns
    assert analysis.hist_quantile(h, 0.5) == 8.0
    assert np.isnan(analysis.hist_quantile(np.zeros(64), 0.5))


@pytest.mark.parametrize("by", ["lock", "caller", "process"])
def test_group_by_and_sort(tmp_path, by):
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    top = analysis.top(rec, by=by, sort="contended")
    assert top["contended"].sum() == 6
    assert list(top["contended"]) == sorted(top["contended"], reverse=True)


def test_pid_filter_in_report(tmp_path):
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    top = analysis.top(rec, by="process", pids=[8])
    assert list(top["tgid"]) == [8]


def test_to_arrow_keeps_layout():
    from kvmlockprof.recording.arrow import to_arrow
    t = to_arrow(events([(1, 2, 3, 4, 5)]))
    assert t.column("comm").to_pylist() == ["vcpu"]
    assert t.column("wait_ns").to_pylist() == [1]


def test_timeline_bins_and_histogram(tmp_path):
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    rec.manifest["start_monotonic_ns"] = 0
    tl = analysis.timeline(rec, bin_ms=0.002)            # 2 us bins: samples are 1 us apart
    assert tl["waits"].sum() == 6
    assert tl.groupby("lock")["wait_ns"].sum().to_dict() == {"0x1000": 5400, "0x2000": 210}
    h = analysis.wait_histogram(rec)
    one = h[h["lock"] == "0x1000"].set_index("lo_ns")["count"].to_dict()
    assert one == {64: 1, 256: 1, 4096: 1}               # 100, 300, 5000 ns


def test_rates_per_unit_of_work(tmp_path):
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    rec.manifest["work"] = {"exits_total": 300, "churn_ops": 3}
    r = analysis.rates(rec).set_index("lock")
    assert r.loc["0x1000", "waits_per_s"] == 3.0          # duration 1 s
    assert r.loc["0x1000", "waits_per_exit"] == 0.01
    assert r.loc["0x1000", "wait_ns_per_memslot_op"] == 1800.0
    t = analysis.per_thread(rec)
    assert set(t["tgid"]) == {7, 8} and t["waits"].sum() == 6


def test_group_quantiles_are_numpys_nearest_rank_per_group():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 5, 1000)
    codes[codes == 3] = 4                          # an empty group gives NaN
    values = rng.integers(0, 10**6, 1000).astype(np.uint64)
    q = analysis.group_quantiles(codes, values, 5, [0.5, 0.9, 0.99])
    for g in (0, 1, 2, 4):
        assert list(q[g]) == list(np.quantile(values[codes == g], [0.5, 0.9, 0.99],
                                             method="inverted_cdf"))
    assert np.isnan(q[3]).all()


@pytest.mark.parametrize("dense_cells", [analysis.DENSE_CELLS, 0])
def test_streamed_quantiles_are_numpys_nearest_rank_per_row(dense_cells, monkeypatch):
    """Two passes over chunks give numpy's own quantiles per row, bit for bit: ties,
    zeros, one-value rows, values past 2^40, rows no value belongs to (-1); with
    the first pass's counts in one array and, for many rows, sorted."""
    monkeypatch.setattr(analysis, "DENSE_CELLS", dense_cells)
    rng = np.random.default_rng(2)
    n = 50_000
    rows = rng.integers(-1, 6, n)
    rows[rows == 4] = 5                            # row 4: no values
    values = np.concatenate([rng.integers(0, 2**12, n // 2),        # many ties
                             rng.lognormal(12, 3, n - n // 2).astype(np.int64)]
                            ).astype(np.uint64)
    values[:100] = 0
    values[100] = 2**45 + 3
    rows[101] = 6                                  # row 6: one value
    qs = [0.0, 0.5, 0.9, 0.99, 1.0]
    cuts = [0, 7, 9000, 9001, 31000, n]            # uneven chunks

    def chunks():
        for a, b in zip(cuts, cuts[1:]):
            yield rows[a:b], values[a:b]
    q, count = analysis.streamed_quantiles(chunks, 7, qs)
    for r in range(7):
        mine = values[rows == r]
        assert count[r] == len(mine)
        if len(mine):
            np.testing.assert_array_equal(q[r], np.quantile(mine, qs, method="inverted_cdf"))
        else:
            assert np.isnan(q[r]).all()


def test_unwalked_waits_spread_over_their_locks_walked_callers():
    """A stack budget leaves some waits without a stack: per lock the sums stay
    exact, per caller they are shared out in proportion, marked as estimates."""
    import pandas as pd
    no = analysis.NO_STACK
    aggs = pd.DataFrame({"lock_addr": [1, 1, 1, 2, 3], "flags": [1] * 5, "tgid": [9] * 5,
                         "stack_id": [7, 8, no, no, 10], "count": [3, 1, 4, 5, 2],
                         "total_ns": [30, 10, 80, 50, 20], "min_ns": [10] * 5,
                         "max_ns": [10] * 5, "hist": [np.eye(64)[4] * c for c in
                                                     [3, 1, 4, 5, 2]]},
                        index=[5, 6, 7, 8, 9])
    out = analysis.spread_unwalked(aggs)
    assert list(out["stack_id"]) == [7, 8, no, 10]   # lock 2 had no walked stack: kept
    assert list(out["count"]) == [6, 2, 5, 2] and list(out["total_ns"]) == [90, 30, 50, 20]
    assert list(out["estimated"]) == [True, True, False, False]
    whole = aggs.assign(stack_id=[7, 8, 11, 12, 10])          # every stack walked
    assert analysis.spread_unwalked(whole)["count"].tolist() == [3, 1, 4, 5, 2]


def test_waits_in_progress_in_the_report(tmp_path):
    import pyarrow as pa
    from kvmlockprof.views import report
    stuck = pa.table({"tid": pa.array([71, 72], pa.uint32()), "tgid": pa.array([7, 7], pa.uint32()),
                      "lock_addr": pa.array([0x1000, 0x2000], pa.uint64()),
                      "flags": pa.array([32, 1], pa.uint32()),
                      "stack_id": pa.array([1, -1000], pa.int32()),
                      "began_ns": pa.array([0, 0], pa.uint64()),
                      "age_ns": pa.array([2_500_000_000, 7_000_000_000], pa.uint64())})
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet", in_progress=stuck))
    w = analysis.waits_in_progress(rec)
    assert list(w["tid"]) == [72, 71]                       # longest first
    assert list(w["caller"]) == ["[stack not sampled]", "kvm_vm_ioctl+0x10"]
    text = "\n".join(report.summary_lines(rec))
    assert "2 waits still in progress at the stop, begun at least 1.00 s before" in text
    assert "tid 71 (vcpu, pid 7) waiting 2.50 s on 0x1000 (mutex) from kvm_vm_ioctl+0x10" in text


def test_perf_filters_on_a_small_recording(tmp_path):
    """-L by address, glob and KVM class; -Y by type and family; -S by frame, with
    unwalked waits spread over the lock's walked stacks (estimates)."""
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    top = lambda **f: analysis.top(rec, filters=f)        # noqa: E731
    assert set(top(locks=("0x1000",))["lock"]) == {"0x1000"}
    assert set(top(locks=("0x2*",))["lock"]) == {"0x2000"}
    assert set(top(types=("mutex",))["type"]) == {"mutex"}
    assert top(types=("rwlock",)).empty
    assert set(top(callstacks=("futex_wake",))["lock"]) == {"0x2000"}
    assert analysis.lock_matches(("kvm->mmu_lock",), 1, "kvm(42)->mmu_lock")
    assert analysis.lock_matches(("vcpu->mutex",), 1, "kvm(42)->vcpu3->mutex")
    assert analysis.lock_matches(("kvm->vcpu*->mutex",), 1, "kvm(42)->vcpu3->mutex")
    assert not analysis.lock_matches(("kvm->slots_lock",), 1, "kvm(42)->mmu_lock")
    assert analysis.type_matches(("rwlock",), "rwlock:W")
    assert analysis.type_matches(("mutex",), "mutex-spin")
    assert not analysis.type_matches(("rwsem",), "rwlock:R")
    rows = [(100, 0x1000, 7, 32, 1), (300, 0x1000, 7, 32, analysis.NO_STACK)]
    rec = kvmlockprof.load(small_recording(tmp_path / "u.parquet", rows))
    got = analysis.top(rec, filters={"callstacks": ("kvm_vm_ioctl",)})
    assert got.iloc[0]["contended"] == 2 and got.iloc[0]["estimated"]
