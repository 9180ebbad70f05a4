"""Bad input gets one line that says what to do, a non-zero exit, nothing lost."""

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kvmlockprof
from conftest import klp


def one_line_error(p):
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmlockprof: "), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


@pytest.fixture
def recording(tmp_path):
    """A small real-format recording written by the package's own writer."""
    from tests_support import small_recording
    return small_recording(tmp_path / "r.parquet")


def test_not_parquet(tmp_path):
    f = tmp_path / "notes.parquet"
    f.write_text("hello, not a recording\n")
    assert "not a Parquet file" in one_line_error(klp("report", f, check=False))


def test_foreign_parquet(tmp_path):
    f = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), f)
    assert "not a kvmlockprof recording" in one_line_error(klp("report", f, check=False))


def test_truncated(recording, tmp_path):
    data = open(recording, "rb").read()
    f = tmp_path / "trunc.parquet"
    f.write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error(klp("report", f, check=False))


def test_missing_file(tmp_path):
    assert "does not exist" in one_line_error(klp("report", tmp_path / "nope.parquet",
                                                  check=False))


def test_report_output_not_overwritten(recording, tmp_path):
    out = tmp_path / "report.txt"
    out.write_text("keep me")
    assert "--force" in one_line_error(klp("report", recording, "-o", out, check=False))
    assert out.read_text() == "keep me"
    klp("report", recording, "-o", out, "--force")
    assert "contended" in out.read_text()


def test_record_refuses_to_overwrite(recording):
    before = open(recording, "rb").read()
    p = klp("record", "-o", recording, "--duration", 1, check=False)
    msg = one_line_error(p)
    assert "--force" in msg or "root" in msg
    assert open(recording, "rb").read() == before


def test_workload_without_kvm():
    from kvmlockprof.workload import kvmapi
    with pytest.raises(kvmapi.KvmError, match="does not exist"):
        kvmapi.open_kvm("/nonexistent/kvm")


def test_loads_without_root_api(recording):
    rec = kvmlockprof.load(recording)
    assert set(rec.table_names) >= {"contention", "aggregates", "stacks"}
    assert len(rec.samples) == 6


def test_html_report_is_self_contained(recording, tmp_path):
    out = tmp_path / "r.html"
    klp("report", recording, "--html", out)
    page = out.read_text()
    assert "<h2>Top locks</h2>" in page and "Wait-time histogram" in page
    assert "Plotly.newPlot" in page and len(page) > 1_000_000      # plotly.js inline
    assert not re.findall(r"<script[^>]*\bsrc=", page)               # nothing fetched
    assert "--force" in one_line_error(klp("report", recording, "--html", out, check=False))


def test_compare_bad_input(recording, tmp_path):
    f = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1]}), f)
    assert "not a kvmlockprof recording" in one_line_error(
        klp("compare", recording, f, check=False))
    assert "two recordings" in one_line_error(klp("compare", recording, check=False))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no *.parquet" in one_line_error(klp("compare", recording, empty, check=False))
    out = tmp_path / "keep.txt"
    out.write_text("mine")
    assert "exists" in one_line_error(klp("compare", recording, recording, "-o", out,
                                          check=False))
    assert out.read_text() == "mine"


def test_ab_refuses_same_sides(tmp_path):
    assert "the two sides are the same" in one_line_error(
        klp("ab", "--dir", tmp_path / "x", check=False))


def test_damaged_recording(recording, tmp_path):
    """A file that reads well but whose numbers are not those recorded: ts_ns's
    checksum differs. The text report does not read ts_ns and runs; --html does and
    gets one line, with no page written."""
    from tests_support import rewrite

    def later(name, t):
        if name != "contention":
            return t
        i = t.schema.get_field_index("ts_ns")
        return t.set_column(i, "ts_ns", pa.array(t.column(i).to_numpy() + 1))
    bad = rewrite(recording, tmp_path / "bad.parquet", table=later)
    assert "contention" in klp("report", bad).stdout
    line = one_line_error(klp("report", bad, "--html", tmp_path / "r.html", check=False))
    assert "column contention.ts_ns does not match its checksum: the file is damaged" in line
    assert not (tmp_path / "r.html").exists()


def test_flush_cut_short_is_left_out(tmp_path):
    """An interrupted recording whose last flush was cut short before its manifest:
    reported as of the manifest, with a warning that names what was left out."""
    from kvmlockprof.recording.arrow import to_arrow
    from tests_support import partial_recording
    d, w, ev = partial_recording(tmp_path / "r.parquet")
    w.append("contention", to_arrow(ev[4:]))
    p = klp("report", tmp_path / "r.parquet")
    assert "contended waits 4" in p.stdout
    assert "kvmlockprof: warning: " + d + ": 1 file(s) of a flush cut short (written after " \
        "the last manifest) were left out: contention-000003.parquet" in p.stderr.splitlines()
