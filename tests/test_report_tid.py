"""report --tid (perf's --tid) on small recordings built here: only those threads'
waits, from the samples (the aggregates are per process), exact when every wait was
sampled and none lost, else scaled and marked `~`. The live check against an
independent BPF count per thread is tests/test_live_filters.py."""
import csv
import io
import json

from conftest import klp
from kvmlockprof.recording.arrow import to_arrow
from kvmlockprof.recording.store import Writer
from tests_support import (ROWS, aggregates_of, events, sample_manifest, sample_stacks,
                           small_recording)


def _rows(path, *args):
    return list(csv.DictReader(io.StringIO(klp("report", path, *args, "-F", "csv").stdout)))


def _recorded(path, sample_every=1, lost=0):
    """small_recording's waits with a manifest that says `record --sample-every N`
    streamed them (all of them are here: scaled to the process's aggregates, which
    hold the same waits, each thread's count stays its own)."""
    ev = events(ROWS)
    w = Writer(path)
    w.append("contention", to_arrow(ev))
    w.append("stacks", sample_stacks())
    w.snapshot("aggregates", to_arrow(aggregates_of(ev)))
    m = sample_manifest(len(ev))
    m["probes"]["contention"]["sample_every"] = sample_every
    m["losses"]["lost_ringbuf_full"] = lost
    w.finalize(m)
    return str(path)


def test_report_tid_keeps_that_threads_waits(tmp_path):
    path = small_recording(tmp_path / "r.parquet")      # tid 7: 3 waits on 0x1000, 5400 ns
    rows = _rows(path, "--tid", 7)
    assert [(r["lock"], int(r["contended"]), int(r["total_ns"]), r["estimated"])
            for r in rows] == [("0x1000", 3, 5400, "False")]
    assert sum(int(r["contended"]) for r in _rows(path, "--tid", "7,8")) == 6
    text = klp("report", path, "--tid", 7).stdout
    assert "threads 7: from the sampled waits (exact: every wait was sampled and none " \
           "lost)" in text and "~" not in text.split("threads 7")[1]
    j = json.loads(klp("report", path, "--tid", 7, "--by", "caller", "-F", "json").stdout)
    assert j["tids"] == [7] and [(r["caller"], r["contended"]) for r in j["rows"]] == \
        [("kvm_vm_ioctl+0x10", 3)]
    assert "(no sampled wait of thread 99)" in klp("report", path, "--tid", 99).stdout


def test_report_tid_scales_what_was_not_sampled(tmp_path):
    scaled = _recorded(tmp_path / "s.parquet", sample_every=4)
    (row,) = _rows(scaled, "--tid", 7)
    assert (int(row["contended"]), int(row["total_ns"]), row["estimated"]) == \
        (3, 5400, "True")
    text = klp("report", scaled, "--tid", 7).stdout
    assert "scaled (~): 1 wait in 4 sampled, 0 lost" in text and "~3" in text
    (row,) = _rows(_recorded(tmp_path / "l.parquet", lost=1), "--tid", 7)
    assert (int(row["contended"]), row["estimated"]) == (3, "True")


def test_report_tid_refuses_what_it_cannot_select(tmp_path):
    path = small_recording(tmp_path / "r.parquet")
    for args in (("-F", "folded"), ("-F", "trace-json"), ("--html", tmp_path / "x.html")):
        p = klp("report", path, "--tid", 7, *args, check=False)
        assert p.returncode != 0 and p.stdout == "" and len(p.stderr.splitlines()) == 1, p
        assert "--tid" in p.stderr
    assert not (tmp_path / "x.html").exists()
    p = klp("report", path, "--tid", "x", check=False)
    assert p.returncode != 0 and "give numbers" in p.stderr
