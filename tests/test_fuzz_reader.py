"""Fuzzing the recording reader: truncated, bit-flipped and foreign Parquet files
give a one-line RecordingError (or a readable recording), never another
exception, never a hang. Runs the analysis the report runs, too. The ring-buffer
decoder, on random bytes, gives what a record-by-record reading of the kernel's
layout gives, or a one-line error."""
import contextlib
import json
import os
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import kvmlockprof
from kvmlockprof import analysis, report
from kvmlockprof.recording import MANIFEST_KEY, RecordingError
from kvmlockprof.ringbuf import BUSY_BIT, DISCARD_BIT, HDR_SIZE, BatchRingBuffer
from tests_support import EVENT, small_recording

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


@contextlib.contextmanager
def no_hang(seconds=20):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_all(path):
    """What `report` does with a file: load, every table, the analyses."""
    with no_hang():
        try:
            rec = kvmlockprof.load(path)
            for name in rec.table_names:
                rec.table(name)
            report.render(rec, stacks=True)
            analysis.per_vm(rec)
            analysis.timeline(rec)
        except RecordingError as e:
            assert "\n" not in str(e) and str(e)


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


# --- the ring-buffer decoder ----------------------------------------------------------

RING_DTYPES = {"event": EVENT, "small": np.dtype([("a", "<u4")])}


def ring_oracle(cons, prod, ring, dtype):
    """Record by record, as kernel/bpf/ringbuf.c lays them out: (records, new consumer
    position), or None when the pending bytes are not records of this size."""
    size, stride = len(ring), (dtype.itemsize + HDR_SIZE + 7) // 8 * 8
    if prod - cons <= 0:
        return [], cons
    if (prod - cons) % stride or prod - cons > size:
        return None
    out, pos = [], cons
    while pos < prod:
        head = [ring[(pos + i) % size] for i in range(stride)]
        hdr = int.from_bytes(bytes(head[:4]), "little")
        if hdr & BUSY_BIT:
            break
        if ((hdr & ~(BUSY_BIT | DISCARD_BIT)) + HDR_SIZE + 7) // 8 * 8 != stride:
            return None
        if not hdr & DISCARD_BIT:
            out.append(bytes(head[HDR_SIZE:HDR_SIZE + dtype.itemsize]))
        pos += stride
    return out, pos


def decode(cons, prod, ring, dtype):
    """BatchRingBuffer.consume() over `ring` (mapped twice, as the kernel maps it)."""
    rb = BatchRingBuffer.__new__(BatchRingBuffer)
    cons_pos = np.array([cons], np.uint64)
    rb._views(cons_pos, np.array([prod], np.uint64),
              np.frombuffer(bytes(ring) * 2, np.uint8), len(ring), dtype)
    with no_hang(5):
        try:
            out = rb.consume()
        except RuntimeError as e:
            assert str(e) and "\n" not in str(e)
            return None
    assert out.dtype == np.dtype(dtype)
    return [r.tobytes() for r in out], int(cons_pos[0])


def check_ring(cons, prod, ring, dtype):
    got, want = decode(cons, prod, ring, dtype), ring_oracle(cons, prod, ring, dtype)
    assert got == want
    if got:
        assert len(got[0]) * ((dtype.itemsize + HDR_SIZE + 7) // 8 * 8) <= max(0, prod - cons)


@settings(FUZZ, max_examples=2000)
@given(kind=st.sampled_from(sorted(RING_DTYPES)), log_size=st.integers(6, 12),
       cons=st.integers(0, 2**64 - 1), delta=st.integers(-2**12, 2**13),
       data=st.data())
def test_ring_random_bytes(kind, log_size, cons, delta, data):
    dtype = RING_DTYPES[kind]
    ring = data.draw(st.binary(min_size=2**log_size, max_size=2**log_size), "ring")
    prod = min(max(cons + delta, 0), 2**64 - 1)
    check_ring(cons, prod, ring, dtype)


@settings(FUZZ, max_examples=2000)
@given(kind=st.sampled_from(sorted(RING_DTYPES)), log_size=st.integers(7, 12),
       cons=st.integers(0, 2**40), data=st.data())
def test_ring_records(kind, log_size, cons, data):
    """Rings as the kernel fills them (records submitted, discarded or still in flight),
    then a few bytes damaged."""
    dtype = RING_DTYPES[kind]
    size, stride = 2**log_size, (dtype.itemsize + HDR_SIZE + 7) // 8 * 8
    flags = data.draw(st.lists(st.sampled_from([0, 0, 0, DISCARD_BIT, BUSY_BIT]),
                               max_size=size // stride), "flags")
    ring = bytearray(data.draw(st.binary(min_size=size, max_size=size), "stale bytes"))
    for i, f in enumerate(flags):
        rec = (dtype.itemsize | f).to_bytes(4, "little") + bytes(4) + \
            data.draw(st.binary(min_size=stride - HDR_SIZE, max_size=stride - HDR_SIZE))
        for j, b in enumerate(rec):
            ring[(cons + i * stride + j) % size] = b
    for pos, xor in data.draw(st.lists(st.tuples(st.integers(0, size - 1),
                                                 st.integers(1, 255)), max_size=3), "damage"):
        ring[pos] ^= xor
    check_ring(cons, cons + len(flags) * stride, ring, dtype)
