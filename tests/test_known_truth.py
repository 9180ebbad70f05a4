"""Derived numbers (percentiles, per-caller and per-thread views) of made-up
recordings whose truth the test sets: each expected value is computed from the
made-up waits themselves with numpy, not with the project's rules."""
import numpy as np
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
    from kvmlockprof.recording.arrow import to_arrow
    from kvmlockprof.recording.store import Writer
    from tests_support import aggregates_of, sample_manifest, sample_stacks
    w = Writer(path)
    w.append("contention", to_arrow(ev[::every]))
    w.append("stacks", sample_stacks())
    w.snapshot("aggregates", to_arrow(aggregates_of(ev)))
    m = sample_manifest(len(ev[::every]))
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


def test_by_caller_counts_the_unwalked_waits_in_its_min_and_percentiles(tmp_path):
    """990 waits of 1 us with no stack walked and 10 walked ones of one caller, all
    alike: by caller the min and p50 are those of its 1000 waits, as by lock."""
    no = analysis.NO_STACK
    waits = [1000] * 1000
    rows = [(w, 0x1000, 7, 1, 1 if i % 100 == 0 else no) for i, w in enumerate(waits)]
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet", rows))
    rec._cache["contention"] = rec.samples.iloc[1:]           # percentiles from the hist
    lock = analysis.top(rec, by="lock").iloc[0]
    caller = analysis.top(rec, by="caller").iloc[0]
    truth = np.quantile(waits, 0.5, method=NEAREST)
    assert caller["contended"] == lock["contended"] == 1000 and caller["estimated"]
    assert caller["min_ns"] == lock["min_ns"] == min(waits)
    assert truth <= caller["p50_ns"] == lock["p50_ns"] < 2 * truth


def test_a_callers_estimated_bounds_contain_its_true_waits(tmp_path):
    """Two callers, one fast (1 us) and one slow (100 us), 1 in 20 of each walked:
    each caller's estimated min is not above its true min, max not below its true max,
    and its histogram holds its share of the lock's waits (the sums add up)."""
    no = analysis.NO_STACK
    rng = np.random.default_rng(3)
    rows, truth = [], {1: [], 2: []}
    for i in range(2000):
        sid = 1 if i % 2 else 2
        w = int(rng.integers(900, 1100) if sid == 1 else rng.integers(90_000, 110_000))
        truth[sid].append(w)
        rows.append((w, 0x1000, 7, 1, sid if i % 40 < 2 else no))
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet", rows))
    rec._cache["contention"] = rec.samples.iloc[1:]
    by = analysis.top(rec, by="caller").set_index("caller")
    rows_of = {1: "kvm_vm_ioctl+0x10", 2: "futex_wake+0x1"}
    assert by["contended"].sum() == 2000
    for sid, w in truth.items():
        r = by.loc[rows_of[sid]]
        assert r["estimated"] and r["min_ns"] <= min(w) and r["max_ns"] >= max(w)
        assert abs(r["contended"] - len(w)) <= 0.2 * len(w)


def test_per_vm_counts_each_instant_once(tmp_path):
    """A process's wait time leaves out its nested waits (begun inside another wait
    of the same task, whose time already holds theirs); they stay counted by lock."""
    import pyarrow as pa
    rows = [(10_000, 0x1000, 7, 32, 1), (300, 0x2000, 7, 1, 2), (200, 0x2000, 7, 1, 2)]
    path = small_recording(tmp_path / "n.parquet", rows)
    nested = pa.table({"lock_addr": pa.array([0x2000], pa.uint64()),
                       "tgid": pa.array([7], pa.uint32()), "irq": pa.array([0], pa.uint32()),
                       "count": pa.array([2], pa.uint64()),
                       "total_ns": pa.array([500], pa.uint64())})
    out = tmp_path / "n2.parquet"
    from kvmlockprof.recording.arrow import to_arrow
    from kvmlockprof.recording.store import Writer
    from tests_support import aggregates_of, events, sample_manifest, sample_stacks
    ev = events(rows)
    w = Writer(out)
    w.append("contention", to_arrow(ev))
    w.append("stacks", sample_stacks())
    w.snapshot("aggregates", to_arrow(aggregates_of(ev)))
    w.snapshot("nested_waits", nested)
    m = sample_manifest(len(ev))
    m["counters"].update(nested=2, irq_waits=0)
    w.finalize(m)
    rec = kvmlockprof.load(str(out))
    vm = analysis.per_vm(rec).set_index("tgid").loc[7]
    assert (vm["waits"], vm["wait_ns"], vm["nested_waits"], vm["nested_ns"]) == \
        (3, 10_000, 2, 500)
    assert analysis.top(rec)["total_ns"].sum() == 10_500       # by lock: every wait
    assert analysis.totals(rec)["nested_waits"] == 2
    assert analysis.per_vm(kvmlockprof.load(path))["nested_waits"].sum() == 0  # an old one
