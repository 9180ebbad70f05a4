"""Fuzzing the recording reader: truncated, bit-flipped and foreign Parquet files
give a one-line RecordingError (or a readable recording), never another
exception, never a hang. Runs the analysis the report runs, too."""
import json
import os
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import kvmlockprof
from kvmlockprof import analysis, report
from kvmlockprof.recording import MANIFEST_KEY, RecordingError
from tests_support import small_recording

FUZZ = settings(max_examples=300, deadline=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.function_scoped_fixture])


class Bytes(bytes):
    """A recording's bytes that do not print themselves in a failure report."""
    def __repr__(self):
        return f"<{len(self)} bytes of a small recording>"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = small_recording(tmp_path_factory.mktemp("fuzz") / "good.parquet")
    with open(path, "rb") as f:
        return Bytes(f.read())


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def read_all(path):
    """What `report` does with a file: load, every table, the analyses."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    try:
        rec = kvmlockprof.load(path)
        for name in rec.table_names:
            rec.table(name)
        report.render(rec, stacks=True)
        analysis.per_vm(rec)
        analysis.timeline(rec)
    except RecordingError as e:
        assert "\n" not in str(e) and str(e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@FUZZ
@given(cut=st.integers(min_value=0))
def test_truncated(good, tmp_path, cut):
    p = tmp_path / "t.parquet"
    p.write_bytes(good[:cut % len(good)])
    read_all(p)


@FUZZ
@example(flips=[5265])              # a null in aggregates.total_ns (found by this test)
@given(flips=st.lists(st.integers(min_value=0), min_size=1, max_size=8))
def test_bit_flipped(good, tmp_path, flips):
    data = bytearray(good)
    for f in flips:
        bit = f % (len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    p = tmp_path / "f.parquet"
    p.write_bytes(bytes(data))
    read_all(p)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() |
                           st.text(max_size=10),
                           lambda c: st.lists(c, max_size=4) |
                           st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=10)


@FUZZ
@given(cols=st.dictionaries(st.sampled_from(["table", "contention", "aggregates", "stacks",
                                             "x", "ts_ns"]),
                            st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=5),
                            min_size=1, max_size=4),
       manifest=st.one_of(st.none(), json_values,
                          st.fixed_dictionaries({"format": st.just("kvmlockprof-recording"),
                                                 "version": st.just(1)},
                                                optional={"tables": json_values,
                                                          "duration_s": json_values,
                                                          "counters": json_values,
                                                          "losses": json_values,
                                                          "probes": json_values,
                                                          "lock_names": json_values,
                                                          "processes": json_values,
                                                          "work": json_values})))
def test_foreign_parquet(tmp_path, cols, manifest):
    n = min(len(v) for v in cols.values())
    t = pa.table({k: v[:n] for k, v in cols.items()})
    if manifest is not None:
        t = t.replace_schema_metadata({MANIFEST_KEY: json.dumps(manifest)})
    p = tmp_path / "foreign.parquet"
    pq.write_table(t, p)
    read_all(p)
