"""Long recordings, without BPF: record's snapshot policy (a snapshot table's file is
rewritten when it changed, at most every SNAPSHOT_S, and always at the end) and
the rolling merge of appended chunks in `.partial/`."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kvmlockprof
from kvmlockprof.recording import store as recording
from kvmlockprof.recording.recorder import Snapshots
from kvmlockprof.recording.arrow import to_arrow
from kvmlockprof.recording.store import RecordingError, Writer
from tests_support import events, sample_manifest


class Files:
    def __init__(self):
        self.written = []

    def snapshot(self, table, t):
        self.written.append((table, t["n"].to_pylist()))


def test_rewrites_changes_at_most_every_interval_and_at_the_end():
    w = Files()
    s = Snapshots(w, every_s=5.0)
    t = lambda n: pa.table({"n": [n]})      # noqa: E731
    assert s.put("aggregates", t(1), 0.0)               # the first: written
    assert not s.put("aggregates", t(1), 6.0)           # unchanged: never rewritten
    assert s.put("aggregates", t(2), 7.0)               # changed, 7 s after the last write
    assert not s.put("aggregates", t(3), 8.0)           # changed, but 1 s after it
    assert not s.put("aggregates", t(3), 11.9)
    assert s.put("aggregates", t(4), 12.0)
    assert s.put("aggregates", t(5), 12.5, final=True)  # the end: whatever changed
    assert not s.put("aggregates", t(5), 13.0, final=True)
    assert w.written == [("aggregates", [1]), ("aggregates", [2]), ("aggregates", [4]),
                         ("aggregates", [5])]


def _flushes(w, n, per=5, start=0):
    """n more flushes (after `start`) of `per` samples each, as record makes them;
    returns their samples."""
    ev = events([(100 + i, 0x1000 + 64 * (i % 7), 7, 32, -1000)
                 for i in range(start * per, (start + n) * per)])
    for i in range(n):
        w.append("contention", to_arrow(ev[i * per:(i + 1) * per]))
        w.manifest(sample_manifest(per * (start + i + 1)))
    return ev


def test_chunks_are_merged_as_they_pile_up(tmp_path, monkeypatch):
    monkeypatch.setattr(recording, "COMPACT_CHUNKS", 4)
    w = Writer(tmp_path / "r.parquet")
    ev = _flushes(w, 11)
    # 11 chunks: two merged files of 4, then 3 chunks not merged yet
    files = sorted(f for f in os.listdir(w.dir) if f.startswith("contention-"))
    assert len(files) == 5 and w.levels["contention"] == [1, 1, 0, 0, 0], files
    ev = np.concatenate([ev, _flushes(w, 9, start=11)])
    # 20 chunks: the first 4 merged files (16 chunks) merged again into one, and
    # the last 4 chunks into another; each merged file is one row group
    files = sorted(f for f in os.listdir(w.dir) if f.startswith("contention-"))
    assert len(files) == 2 and w.levels["contention"] == [2, 1], files
    assert [pq.ParquetFile(os.path.join(w.dir, f)).metadata.num_row_groups
            for f in w.files["contention"]] == [1, 1]
    # 64 chunks: the 16-chunk files merged once more (a level up), never re-merged later
    ev = np.concatenate([ev, _flushes(w, 44, start=20)])
    assert w.levels["contention"] == [3], w.levels
    partial = kvmlockprof.load(tmp_path / "r.parquet")     # .partial: as a killed record
    assert partial.interrupted and (partial.samples["wait_ns"].to_numpy() == ev["wait_ns"]).all()
    w.finalize(sample_manifest(len(ev)))
    rec = kvmlockprof.load(tmp_path / "r.parquet")
    assert len(rec.samples) == len(ev) == 320
    assert (rec.samples["wait_ns"].to_numpy() == ev["wait_ns"]).all()
    assert (rec.samples["lock_addr"].to_numpy() == ev["lock_addr"]).all()


def test_a_chunk_damaged_before_its_merge_fails_the_checksums(tmp_path, monkeypatch):
    monkeypatch.setattr(recording, "COMPACT_CHUNKS", 4)
    w = Writer(tmp_path / "r.parquet")
    ev = _flushes(w, 3)
    bad = to_arrow(ev[:5]).set_column(1, "wait_ns", pa.array(np.full(5, 7, np.uint64)))
    recording._atomic_write_parquet(bad, os.path.join(w.dir, w.files["contention"][0]))
    _flushes(w, 1)                                          # the fourth chunk: merged
    with pytest.raises(RecordingError, match="changed on disk"):
        w.finalize(sample_manifest(20))
