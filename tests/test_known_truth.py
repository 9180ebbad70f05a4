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
