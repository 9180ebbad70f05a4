"""Fuzzing the readers: damaged recordings (truncated; bytes changed in the column
chunks, the manifest, the Parquet footer; damaged `.partial` chunks and manifests)
and foreign Parquet files give a one-line RecordingError or exactly the numbers of
the undamaged recording, never other numbers, another exception or a hang. The
ring-buffer decoder, on random bytes, gives what a record-by-record reading of the
kernel's layout gives, or a one-line error."""
import contextlib
import json
import os
import re
import shutil
import signal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import kvmlockprof
from kvmlockprof.analysis import locks as analysis
from kvmlockprof.kernel.ringbuf import BUSY_BIT, DISCARD_BIT, HDR_SIZE, BatchRingBuffer
from kvmlockprof.recording.arrow import to_arrow
from kvmlockprof.recording import store
from kvmlockprof.recording.store import MANIFEST_KEY, ColumnDigest, RecordingError
from kvmlockprof.views import report
from tests_support import (EVENT, ROWS, aggregates_of, events, flush, partial_recording, rewrite,
                           small_recording)

FUZZ = settings(max_examples=300, deadline=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.function_scoped_fixture])


class Bytes(bytes):
    """A recording's bytes that do not print themselves in a failure report."""
    def __repr__(self):
        return f"<{len(self)} bytes of a small recording>"


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


def _plain(df):
    """A DataFrame as plain values (repr compares NaN and arrays by value)."""
    return repr((list(df.columns), [str(t) for t in df.dtypes], list(df.index),
                 [[v.tolist() if hasattr(v, "tolist") else v for v in df[c]] for c in df]))


def numbers(path):
    """What `report` does with a recording (load, every table, the analyses) and what
    comes out; None if it was refused with a one-line RecordingError."""
    with no_hang():
        try:
            rec = kvmlockprof.load(path)
            out = {f"table {n}": _plain(rec.table(n)) for n in rec.table_names}
            out["report"] = report.render(rec, stacks=True).replace(str(path), "PATH")
            out["top"] = _plain(analysis.top(rec, by="caller"))
            out["per_vm"] = _plain(analysis.per_vm(rec))
            out["timeline"] = _plain(analysis.timeline(rec))
            out["manifest"] = repr(rec.manifest)
            return out
        except RecordingError as e:
            assert "\n" not in str(e) and str(e)
            return None


def same_or_refused(path, good):
    got = numbers(path)
    if got is not None:
        assert got.keys() == good.keys()
        for k in good:
            assert got[k] == good[k], f"{k} differs"


@pytest.fixture(scope="module")
def good_path(tmp_path_factory):
    return small_recording(tmp_path_factory.mktemp("fuzz") / "good.parquet")


@pytest.fixture(scope="module")
def good(good_path):
    with open(good_path, "rb") as f:
        return Bytes(f.read())


@pytest.fixture(scope="module")
def good_numbers(good_path):
    return numbers(good_path)


def _regions(path):
    """Byte ranges of a recording: each column chunk, the footer, the manifest."""
    pf = pq.ParquetFile(path)
    chunks = []
    for i in range(pf.metadata.num_row_groups):
        rg = pf.metadata.row_group(i)
        for j in range(rg.num_columns):
            c = rg.column(j)
            start = c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
            chunks.append((start, start + c.total_compressed_size))
    data = open(path, "rb").read()
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    manifest = pf.metadata.metadata[MANIFEST_KEY]
    at = data.index(manifest, footer)
    return {"chunks": chunks, "manifest": [(at, at + len(manifest))],
            "footer": [(footer, at), (at + len(manifest), len(data) - 8)]}


def _damage(data, ranges, edits):
    """edits: (where, xor) pairs, `where` taken into the ranges (concatenated);
    a digit at that place becomes another digit instead (JSON that still parses)."""
    data = bytearray(data)
    total = sum(b - a for a, b in ranges)
    for where, xor in edits:
        where %= total
        for a, b in ranges:
            if where < b - a:
                pos = a + where
                break
            where -= b - a
        if chr(data[pos]).isdigit():
            data[pos] = ord("0") + (data[pos] - ord("0") + 1 + xor % 9) % 10
        else:
            data[pos] ^= xor
    return bytes(data)


edits = st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)),
                 min_size=1, max_size=6)


@FUZZ
@given(cut=st.integers(min_value=0))
def test_truncated(good, good_numbers, tmp_path, cut):
    p = tmp_path / "t.parquet"
    p.write_bytes(good[:cut % len(good)])
    same_or_refused(p, good_numbers)


@FUZZ
@example(flips=[5265])              # a null in aggregates.total_ns (found by this test)
@given(flips=st.lists(st.integers(min_value=0), min_size=1, max_size=8))
def test_bit_flipped(good, good_numbers, tmp_path, flips):
    data = bytearray(good)
    for f in flips:
        bit = f % (len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    p = tmp_path / "f.parquet"
    p.write_bytes(bytes(data))
    same_or_refused(p, good_numbers)


@pytest.mark.parametrize("region", ["chunks", "manifest", "footer"])
def test_damaged_inside(good, good_path, good_numbers, tmp_path, region):
    """Bytes changed inside the file (its ends intact): in the row groups' column
    chunks, in the manifest's JSON (digits too), in the rest of the Parquet footer."""
    ranges = _regions(good_path)[region]

    @FUZZ
    @given(edits=edits)
    def damaged(edits):
        p = tmp_path / "d.parquet"
        p.write_bytes(_damage(good, ranges, edits))
        same_or_refused(p, good_numbers)
    damaged()


# --- .partial directories --------------------------------------------------------------

@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """An interrupted recording after two flushes, and what it reads as."""
    d, _, _ = partial_recording(tmp_path_factory.mktemp("partial") / "r.parquet")
    return d, numbers(d)


def test_partial_layout(partial):
    d, good = partial
    assert sorted(os.listdir(d)) == ["aggregates-000002.parquet", "contention-000001.parquet",
                                     "contention-000002.parquet", "manifest.json",
                                     "stacks-000001.parquet"]
    assert good is not None and "contended waits 4" in good["report"]


@pytest.mark.parametrize("name", ["manifest.json", "contention-000002.parquet",
                                  "aggregates-000002.parquet", "stacks-000001.parquet"])
def test_partial_damaged(partial, tmp_path, name):
    d, good = partial
    size = os.path.getsize(os.path.join(d, name))
    middle = [(0, size)] if name.endswith(".json") else [(4, size - 4)]

    @FUZZ
    @given(edits=edits)
    def damaged(edits):
        copy = tmp_path / "c.parquet.partial"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(d, copy)
        f = copy / name
        f.write_bytes(_damage(f.read_bytes(), middle, edits))
        same_or_refused(copy, good)
    damaged()


def test_partial_killed_after_a_chunk(tmp_path):
    """A kill -9 between a flush's data files and its manifest: the files the last
    manifest lists are read (the numbers it describes), the later ones left out with
    a warning; a kill after the manifest but before the replaced snapshot is deleted
    leaves that snapshot, which is ignored."""
    d, w, ev = partial_recording(tmp_path / "r.parquet")        # 4 of the 6 samples
    before = numbers(d)
    w.append("contention", to_arrow(ev[4:]))        # the next flush, killed before
    w.snapshot("aggregates", to_arrow(aggregates_of(ev)))  # its manifest
    shutil.copy(os.path.join(d, "aggregates-000002.parquet"),
                os.path.join(d, "aggregates-000001.parquet"))
    assert numbers(d) == before
    rec = kvmlockprof.load(d)
    assert rec.warnings == ["2 file(s) of a flush cut short (written after the last "
                            "manifest) were left out: aggregates-000003.parquet, "
                            "contention-000003.parquet"]
    flush(w, ev, len(ev))
    rec = kvmlockprof.load(d)
    assert rec.warnings == [] and len(rec.samples) == len(ev)
    assert not os.path.exists(os.path.join(d, "aggregates-000002.parquet"))


def test_partial_listed_file_missing(partial, tmp_path):
    d, _ = partial
    shutil.copytree(d, tmp_path / "c.partial")
    os.unlink(tmp_path / "c.partial" / "contention-000001.parquet")
    with pytest.raises(RecordingError, match="contention-000001.parquet is missing: the file "
                                             "is damaged"):
        kvmlockprof.load(tmp_path / "c.partial")


# --- the integrity record ---------------------------------------------------------------

def test_fixed_size_lists_stored_as_lists(good_path, tmp_path):
    """The aggregates' histogram (a fixed-size list of 64) is stored as a list, so the
    other tables' row groups hold it null for their offsets alone (a null fixed-size
    list holds its 64 values: 39 MiB of zeros beside a 75k-row group of samples), and
    is read back as the fixed-size list it was, equal row by row; a row of another
    length is refused as damage."""
    rec = kvmlockprof.load(good_path)
    assert rec.manifest["fixed_size_lists"] == {"aggregates": {"hist": 64}}
    stored = pq.ParquetFile(good_path).schema_arrow.field("aggregates").type
    assert pa.types.is_list(stored.field("hist").type)
    ev = events(ROWS)
    want = to_arrow(aggregates_of(ev)).column("hist")
    got = pq.read_table(good_path).column("aggregates")  # (read raw, as stored)
    assert pa.types.is_list(got.type.field("hist").type)
    t = pa.concat_tables(rec._tables["aggregates"]())
    assert t.column("hist").type == want.type
    assert t.column("hist").to_pylist() == want.to_pylist()
    # a manifest that says another length (sealed again): the cast fails, one line
    def k63(m):
        m["fixed_size_lists"]["aggregates"]["hist"] = 63
        m["integrity"]["manifest"] = store._manifest_digest(m)
        return m
    bad = rewrite(good_path, tmp_path / "k.parquet", manifest=k63)
    assert len(kvmlockprof.load(bad).samples) == len(ev)     # (sealed: read otherwise)
    with pytest.raises(RecordingError, match="table 'aggregates' is corrupt") as e:
        kvmlockprof.load(bad).aggregates
    assert "\n" not in str(e.value)


def test_integrity_recorded(good_path):
    m = kvmlockprof.load(good_path).manifest
    assert m["version"] == 3
    t = m["integrity"]["tables"]
    assert {n: e["rows"] for n, e in t.items()} == {"aggregates": 2, "contention": 6,
                                                    "stacks": 2}
    assert set(t["contention"]["columns"]) == set(EVENT.names)
    assert re.fullmatch("[0-9a-f]{64}", m["integrity"]["manifest"])


def _digest(*chunks):
    d = ColumnDigest()
    for c in chunks:
        d.update(c)
    return d.hexdigest()


def test_digest_is_of_values_and_types():
    """The checksum of a column does not depend on how Arrow holds it (chunks, a
    dictionary's order and unused entries, list offsets); it does on values, nulls
    and types."""
    s = pa.array(["x", "y", "x", None, "z"])
    d = pa.DictionaryArray.from_arrays(pa.array([2, 0, 2, None, 1], pa.int8()),
                                       pa.array(["y", "z", "x", "unused"]))
    assert _digest(pc.dictionary_encode(s)) == _digest(d) == _digest(d[:2], d[2:])
    assert _digest(s) == _digest(s[:1], s[1:]) != _digest(d)
    lists = pa.array([[1, 2], [3, 4], [5, 6]], pa.list_(pa.uint64()))
    fixed = pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3, 4, 5, 6], pa.uint64()), 2)
    assert _digest(lists) == _digest(fixed) == _digest(lists[:1], lists[1:])
    assert _digest(lists[1:]) != _digest(lists) != _digest(
        pa.array([[1], [2, 3, 4], [5, 6]], pa.list_(pa.uint64())))
    u = pa.array([1, 2, 3], pa.uint64())
    assert _digest(u) == _digest(u[:2], u[2:]) != _digest(u.cast(pa.int64()))
    assert _digest(pa.array([1, None, 3], pa.uint64())) != _digest(pa.array([1, 0, 3],
                                                                            pa.uint64()))


def test_changed_value_refused(good_path, tmp_path):
    """A file that reads well but holds another number than was recorded."""
    def slower(name, t):
        if name != "contention":
            return t
        i = t.schema.get_field_index("wait_ns")
        return t.set_column(i, "wait_ns", pa.array(t.column(i).to_numpy() + 1))
    p = rewrite(good_path, tmp_path / "x.parquet", table=slower)
    rec = kvmlockprof.load(p)
    assert len(rec.table("contention", ["ts_ns"])) == 6      # the other columns check
    with pytest.raises(RecordingError, match=r"column contention.wait_ns does not match "
                                             r"its checksum: the file is damaged"):
        rec.table("contention", ["wait_ns"])


def test_changed_manifest_refused(good_path, tmp_path):
    p = rewrite(good_path, tmp_path / "x.parquet", manifest=lambda m: dict(m, duration_s=2.0))
    with pytest.raises(RecordingError, match="the manifest does not match its checksum"):
        kvmlockprof.load(p)
    p = rewrite(good_path, tmp_path / "y.parquet",
                manifest=lambda m: {k: v for k, v in m.items() if k != "integrity"})
    with pytest.raises(RecordingError, match="the manifest has no integrity record"):
        kvmlockprof.load(p)


def test_version_1_read_unchecked(good_path, good_numbers, tmp_path):
    """Recordings made before the integrity record still load (and are not checked)."""
    def v1(m):
        return dict({k: v for k, v in m.items() if k != "integrity"}, version=1)
    p = rewrite(good_path, tmp_path / "v1.parquet", manifest=v1)
    got = numbers(p)
    assert {k: v for k, v in got.items() if k != "manifest"} == \
        {k: v for k, v in good_numbers.items() if k != "manifest"}


def test_version_1_partial_read_unchecked(partial, tmp_path):
    """So are interrupted ones: every chunk in the directory, the snapshot unnumbered."""
    d, good = partial
    old = tmp_path / "v1.parquet.partial"
    shutil.copytree(d, old)
    m = json.loads((old / "manifest.json").read_text())
    del m["integrity"]
    (old / "manifest.json").write_text(json.dumps(dict(m, version=1)))
    os.rename(old / "aggregates-000002.parquet", old / "aggregates.parquet")
    got = numbers(old)
    assert {k: v for k, v in got.items() if k != "manifest"} == \
        {k: v for k, v in good.items() if k != "manifest"}


def test_chunk_changed_before_finalize(tmp_path):
    """finalize() checks what it merges against the checksums taken when each chunk
    was written, and keeps the chunks if they differ."""
    d, w, ev = partial_recording(tmp_path / "r.parquet")
    f = os.path.join(d, "contention-000001.parquet")
    t = pq.read_table(f)
    pq.write_table(t.set_column(1, "wait_ns", pa.array(t.column(1).to_numpy() * 2)), f)
    with pytest.raises(RecordingError, match="the contention chunks changed on disk"):
        w.finalize({})
    assert os.path.isdir(d) and not os.path.exists(tmp_path / "r.parquet")


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
                                                 "version": st.sampled_from([1, 2, 3])},
                                                optional={"tables": json_values,
                                                          "duration_s": json_values,
                                                          "counters": json_values,
                                                          "losses": json_values,
                                                          "probes": json_values,
                                                          "lock_names": json_values,
                                                          "processes": json_values,
                                                          "work": json_values,
                                                          "integrity": json_values,
                                                          "fixed_size_lists": json_values})))
def test_foreign_parquet(tmp_path, cols, manifest):
    n = min(len(v) for v in cols.values())
    t = pa.table({k: v[:n] for k, v in cols.items()})
    if manifest is not None:
        t = t.replace_schema_metadata({MANIFEST_KEY: json.dumps(manifest)})
    p = tmp_path / "foreign.parquet"
    pq.write_table(t, p)
    numbers(p)


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
    """BatchRingBuffer.consume() over `ring` (mapped once, as record maps it)."""
    rb = BatchRingBuffer.__new__(BatchRingBuffer)
    cons_pos = np.array([cons], np.uint64)
    rb._views(cons_pos, np.array([prod], np.uint64),
              np.frombuffer(bytes(ring), np.uint8), len(ring), dtype)
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
