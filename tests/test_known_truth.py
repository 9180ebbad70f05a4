"""Derived numbers (percentiles, per-caller and per-thread views) of made-up
recordings whose truth the test sets: each expected value is computed from the
made-up waits themselves with numpy, not with the project's rules."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import kvmlockprof
from kvmlockprof.analysis import locks as analysis
from tests_support import small_recording

NEAREST = "inverted_cdf"        # numpy's nearest-rank quantile: the truth's definition
QS = {"p50_ns": 0.5, "p90_ns": 0.9, "p99_ns": 0.99}


def _top_row(tmp_path, waits, drop=0, name="r"):
    """top()'s one row of a lock whose waits are `waits`, the first `drop` samples lost."""
    rows = [(int(w), 0x1000, 7, 1, 1) for w in waits]
    rec = kvmlockprof.load(small_recording(tmp_path / f"{name}.parquet", rows))
    if drop:
        rec._cache["contention"] = rec.samples.iloc[drop:]
    top = analysis.top(rec, by="lock")
    assert len(top) == 1
    return top.iloc[0]


def test_a_bound_bounds_the_exact_percentile(tmp_path):
    """198 waits of 1 us and 2 of 1 ms: p99 is 1 us by nearest rank, with every
    sample (exact) and with one lost (the log2 bound, which must not be below it)."""
    waits = np.array([1000] * 198 + [1_000_000] * 2)
    exact = _top_row(tmp_path, waits)
    bound = _top_row(tmp_path, waits, drop=1, name="lost")
    assert exact["pct_exact"] and not bound["pct_exact"]
    for col, q in QS.items():
        truth = np.quantile(waits, q, method=NEAREST)
        assert exact[col] == truth, col
        assert truth <= bound[col] < 2 * truth, (col, truth, bound[col])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 10**9), min_size=1, max_size=400),
       st.integers(0, 3))
def test_bounds_bound_exact_percentiles_of_any_waits(tmp_path_factory, waits, drop):
    waits = np.array(waits)
    drop = min(drop, len(waits) - 1)
    row = _top_row(tmp_path_factory.mktemp("q"), waits, drop=drop)
    assert bool(row["pct_exact"]) == (drop == 0)
    for col, q in QS.items():
        truth = np.quantile(waits, q, method=NEAREST)
        if drop == 0:
            assert row[col] == truth
        else:                       # the upper end of the power-of-two bucket holding it
            assert truth < row[col] <= max(2 * truth, 2), (col, truth, row[col])


def _sampled_recording(path, ev, every):
    """A recording of waits ev whose aggregates hold them all and whose samples are
    every `every`-th of them, as record --sample-every writes it."""
    from kvmlockprof.recording.store import Writer, to_arrow
    from tests_support import _manifest, _stacks, aggregates_of
    w = Writer(path)
    w.append("contention", to_arrow(ev[::every]))
    w.append("stacks", _stacks())
    w.snapshot("aggregates", to_arrow(aggregates_of(ev)))
    m = _manifest(len(ev[::every]))
    m["probes"]["contention"]["sample_every"] = every
    w.finalize(m)
    return kvmlockprof.load(str(path))


def test_views_from_samples_stand_for_every_wait_under_sample_every(tmp_path):
    """1000 waits of one process, thread 11 600 of them and thread 12 400, streamed
    one in 10: per_vm, per_thread, top --by thread and the timeline all say 1000."""
    from tests_support import events
    rng = np.random.default_rng(5)
    tids = rng.permutation([11] * 600 + [12] * 400)
    waits = rng.integers(100, 10_000, 1000)
    ev = events([(int(w), 0x1000, 7, 1, 1) for w in waits])
    ev["tid"] = tids
    ev["ts_ns"] = np.sort(rng.integers(0, 10**9, 1000))
    rec = _sampled_recording(tmp_path / "s.parquet", ev, 10)
    truth = {t: (int((tids == t).sum()), int(waits[tids == t].sum())) for t in (11, 12)}
    assert analysis.per_vm(rec)["waits"].sum() == 1000
    pt = analysis.per_thread(rec).set_index("tid")
    assert pt["waits"].sum() == 1000 and pt["wait_ns"].sum() == waits.sum()
    assert pt["estimated"].all()
    by_thread = analysis.top(rec, by="thread").set_index("tid")
    assert by_thread["contended"].sum() == 1000
    for t, (n, ns) in truth.items():        # a 1-in-10 sample's estimate of each thread
        assert abs(pt.loc[t, "waits"] - n) <= 0.2 * n, (t, pt.loc[t, "waits"], n)
        assert abs(pt.loc[t, "wait_ns"] - ns) <= 0.25 * ns
        assert by_thread.loc[t, "contended"] == pt.loc[t, "waits"]
    tl = analysis.timeline(rec, bin_ms=100)
    assert tl["waits"].sum() == 1000 and tl["wait_ns"].sum() == waits.sum()
    # every wait streamed: exact, nothing scaled
    exact = _sampled_recording(tmp_path / "e.parquet", ev, 1)
    pt = analysis.per_thread(exact).set_index("tid")
    assert not pt["estimated"].any()
    assert {t: (pt.loc[t, "waits"], pt.loc[t, "wait_ns"]) for t in (11, 12)} == truth
