"""Recordings as a dataset (export, query, compare over a set) on small recordings built
here; the live test is tests/test_live_dataset.py."""
import json
import re

import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pytest

import kvmlockprof
from kvmlockprof.analysis import locks
from kvmlockprof.recording import dataset
from kvmlockprof.recording.arrow import to_arrow
from kvmlockprof.recording.store import Writer

from conftest import klp
from tests_support import aggregates_of, events, partial_recording, sample_manifest, sample_stacks


def recording(path, host, pid, rows, run=None, **manifest):
    """A recording of host `host` whose VM (process pid) contends kvm(pid)->slots_lock
    (0x1000, a mutex), an unnamed spinlock (0x2000), and its vCPU 0's mutex (0x3000)."""
    ev = events([(w, addr, pid, flags, sid) for w, addr, flags, sid in rows])
    w = Writer(path)
    w.append("contention", to_arrow(ev))
    w.append("stacks", sample_stacks())
    w.snapshot("aggregates", to_arrow(aggregates_of(ev)))
    names = {"0x1000": {"name": f"kvm({pid})->slots_lock", "how": "test"},
             "0x3000": {"name": f"kvm({pid})->vcpu0->mutex", "how": "test"}}
    w.finalize(sample_manifest(len(ev), host=host, lock_names=names,
                         start=f"2026-12-0{pid % 9 + 1}T10:00:00+00:00",
                         **({"run": run} if run else {}), **manifest))
    return str(path)


ROWS = {
    ("hv1", 101): [(100, 0x1000, 32, 1), (300, 0x1000, 32, 1), (50, 0x2000, 1, 2),
                   (900, 0x3000, 32, 1)],
    ("hv1", 102): [(5000, 0x1000, 32, 1), (70, 0x2000, 1, 2), (90, 0x2000, 1, 2)],
    ("hv2", 201): [(700, 0x1000, 32, 1), (800, 0x1000, 32, 1), (60, 0x3000, 32, 1),
                   (40, 0x3000, 32, 1)],
}


@pytest.fixture
def fleet(tmp_path):
    return [recording(tmp_path / f"{h}-{pid}.parquet", h, pid, rows)
            for (h, pid), rows in ROWS.items()]


PER_CLASS = ("SELECT host, lock_class, sum(count) AS waits, sum(total_ns) AS wait_ns "
             "FROM aggregates GROUP BY ALL ORDER BY host, lock_class")


def _classes(name):
    """The lock class rule stated here on its own (docs/fleet.md): the VM's pid dropped."""
    return re.sub(r"^kvm\(\d+\)->vcpu\d+->", "vcpu->", re.sub(r"^kvm\(\d+\)->(?!vcpu)", "kvm->",
                                                              name))


def reports_summed(paths):
    """Per (host, class): the waits and wait time of each recording's `report` rows."""
    rows = []
    for p in paths:
        rec = kvmlockprof.load(p)
        top = locks.top(rec, by="lock", limit=None)
        rows += [{"host": rec.manifest["host"], "lock_class": _classes(r.lock),
                  "waits": r.contended, "wait_ns": r.total_ns} for r in top.itertuples()]
    return pd.DataFrame(rows).groupby(["host", "lock_class"], as_index=False)[
        ["waits", "wait_ns"]].sum().sort_values(["host", "lock_class"]).reset_index(drop=True)


def test_query_per_lock_class_equals_the_reports_summed(fleet, tmp_path):
    got = dataset.query(PER_CLASS, fleet)
    want = reports_summed(fleet)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    # kvm(101)->slots_lock and kvm(201)->slots_lock are one class, across hosts too
    assert set(got["lock_class"]) == {"kvm->slots_lock", "vcpu->mutex", "0x2000"}
    # the same from an exported dataset, and from the CLI as JSON
    dataset.export(fleet, tmp_path / "ds")
    pd.testing.assert_frame_equal(dataset.query(PER_CLASS, [tmp_path / "ds"]), got)
    out = json.loads(klp("query", PER_CLASS, *fleet, "-F", "json").stdout)
    assert pd.DataFrame(out).equals(got.astype({"waits": "int64", "wait_ns": "int64"}))


def test_engines_read_the_dataset_without_our_views(fleet, tmp_path):
    """pyarrow.dataset and DuckDB's read_parquet on the exported files, as Spark would
    read them: the same numbers, with no code of ours in the way."""
    dataset.export(fleet, tmp_path / "ds")
    want = reports_summed(fleet)
    t = ds.dataset(tmp_path / "ds" / "aggregates").to_table() \
        .group_by(["host", "lock_class"]).aggregate([("count", "sum"), ("total_ns", "sum")])
    got = t.to_pandas().rename(columns={"count_sum": "waits", "total_ns_sum": "wait_ns"})
    got = got[["host", "lock_class", "waits", "wait_ns"]].sort_values(
        ["host", "lock_class"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    con = duckdb.connect()
    got = con.sql(f"SELECT host, lock_class, sum(count) AS waits, sum(total_ns) AS wait_ns "
                  f"FROM '{tmp_path}/ds/aggregates/*.parquet' GROUP BY ALL "
                  f"ORDER BY host, lock_class").df()
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_duckdb_reads_the_recording_files_themselves(fleet):
    """Design (a), checked: DuckDB alone reads a recording file's tables (the `table`
    column, the struct column unnested) and its manifest (the footer's key-value
    metadata, JSON), lock names included."""
    files = "[" + ", ".join(f"'{f}'" for f in fleet) + "]"
    sql = f"""
    WITH m AS (SELECT file_name, decode(value) AS j FROM parquet_kv_metadata({files})
               WHERE decode(key) = 'kvmlockprof.manifest'),
         a AS (SELECT filename AS file_name, unnest(aggregates)
               FROM read_parquet({files}, filename = true) WHERE "table" = 'aggregates'),
         n AS (SELECT file_name, '0x' || lower(hex(lock_addr)) AS h, * FROM a)
    SELECT m.j->>'host' AS host,
           regexp_replace(regexp_replace(coalesce(m.j->'lock_names'->n.h->>'name', n.h),
                          '^kvm\\(\\d+\\)->vcpu\\d+->', 'vcpu->'), '^kvm\\(\\d+\\)->', 'kvm->')
               AS lock_class,
           sum(count) AS waits, sum(total_ns) AS wait_ns
    FROM n JOIN m USING (file_name) GROUP BY ALL ORDER BY host, lock_class"""
    got = duckdb.connect().sql(sql).df()
    pd.testing.assert_frame_equal(got, reports_summed(fleet), check_dtype=False)


def test_export_writes_the_documented_schema(fleet, tmp_path):
    from kvmlockprof import cli
    dataset.export(fleet, tmp_path / "ds")
    for t in dataset.TABLES:
        files = sorted((tmp_path / "ds" / t).glob("*.parquet"))
        assert len(files) == 3, t
        for f in files:
            assert ds.dataset(f).schema.remove_metadata() == dataset.schema(t), t
    # `query --help` lists every view with exactly its columns
    listed = {}
    for line in cli.EPILOG_QUERY.split("Examples:")[0].splitlines():
        m = re.match(r"^  (\w+)\s{2,}(.*)$", line)
        if m:
            cur = m.group(1)
            listed[cur] = m.group(2)
        elif line.startswith("      ") and listed:
            listed[cur] += " " + line.strip()
    assert set(listed) == set(dataset.TABLES)
    for t, text in listed.items():
        cols = [c.split()[0] for c in re.sub(r"\(.*?\)", "", text).split(",")]
        assert cols == [n for n, _, _ in dataset.SCHEMA[t]], t
    r = dataset.query("SELECT * FROM recordings ORDER BY host, run", [tmp_path / "ds"])
    assert list(r["host"]) == ["hv1", "hv1", "hv2"] and r["waits"].tolist() == [4, 3, 4]
    lk = dataset.query("SELECT lock_addr, lock, lock_class, lock_name FROM locks "
                       "WHERE host = 'hv2' ORDER BY lock_addr", [tmp_path / "ds"])
    assert lk.values.tolist() == [[0x1000, "kvm(201)->slots_lock", "kvm->slots_lock",
                                   "kvm(201)->slots_lock"],
                                  [0x3000, "kvm(201)->vcpu0->mutex", "vcpu->mutex",
                                   "kvm(201)->vcpu0->mutex"]]
    s = dataset.query("SELECT lock_class, type, caller, count(*) n, sum(wait_ns) w "
                      "FROM samples GROUP BY ALL ORDER BY w", fleet)
    assert s.values.tolist() == [["0x2000", "spinlock", "futex_wake+0x1", 3, 210],
                                 ["vcpu->mutex", "mutex", "kvm_vm_ioctl+0x10", 3, 1000],
                                 ["kvm->slots_lock", "mutex", "kvm_vm_ioctl+0x10", 5, 6900]]


def test_run_and_host_labels_and_partial_recordings(tmp_path):
    a = recording(tmp_path / "a.parquet", "hv9", 5, ROWS[("hv1", 101)], run="nightly-3")
    d, w, ev = partial_recording(tmp_path / "killed.parquet")
    r = dataset.query("SELECT host, run, interrupted, waits FROM recordings ORDER BY host",
                      [a, tmp_path / "killed.parquet"])
    assert r.values.tolist() == [["hv9", "nightly-3", False, 4], ["test", "?", True, 4]]


def test_recorded_read_filters_apply_as_in_report(tmp_path):
    """A -L glob on a KVM-aware name is applied where the recording is read: the
    dataset holds what report shows."""
    filt = {"lock": {"where": "read", "values": ["kvm->slots_lock"]}}
    p = recording(tmp_path / "f.parquet", "hv1", 7, ROWS[("hv1", 101)], filters=filt)
    got = dataset.query("SELECT DISTINCT lock_class FROM aggregates UNION ALL "
                        "SELECT DISTINCT lock_class FROM samples", [p])
    assert set(got["lock_class"]) == {"kvm->slots_lock"}
    assert set(reports_summed([p])["lock_class"]) == {"kvm->slots_lock"}


def test_export_refuses_to_overwrite_and_a_recording_twice(fleet, tmp_path):
    out = tmp_path / "ds"
    klp("export", "--dataset", out, *fleet)
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*.parquet"))
    p = klp("export", "--dataset", out, fleet[0], check=False)
    assert p.returncode == 1 and "--force" in p.stderr and len(p.stderr.splitlines()) == 1
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*.parquet")) == before
    klp("export", "--dataset", out, "--force", fleet[0])
    p = klp("export", "--dataset", tmp_path / "ds2", fleet[0], fleet[0], check=False)
    assert p.returncode == 1 and "same recording" in p.stderr
    p = klp("export", "--dataset", tmp_path / "ds3", "--tables", "aggregates,nope", fleet[0],
            check=False)
    assert p.returncode == 1 and "unknown table 'nope'" in p.stderr


@pytest.mark.parametrize("sql,says", [
    ("SELECT * FROM nope", "Table with name nope does not exist"),
    ("SELEC 1", "syntax error"),
    ("SELECT no_such_column FROM aggregates", "no_such_column"),
])
def test_bad_sql_is_one_line(fleet, sql, says):
    p = klp("query", sql, *fleet, check=False)
    assert p.returncode == 1 and not p.stdout
    assert len(p.stderr.strip().splitlines()) == 1 and says in p.stderr, p.stderr
    if "nope" in sql:
        assert "aggregates" in p.stderr and "samples" in p.stderr     # the views named


def test_bad_files_are_one_line(tmp_path, fleet):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not really")
    foreign = tmp_path / "foreign.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, says in ((junk, "truncated"), (foreign, "not a kvmlockprof recording"),
                      (tmp_path / "missing.parquet", "does not exist"),
                      (empty, "holds no *.parquet")):
        p = klp("query", "SELECT count(*) FROM aggregates", fleet[0], bad, check=False)
        assert p.returncode == 1 and not p.stdout, bad
        assert len(p.stderr.strip().splitlines()) == 1 and says in p.stderr, p.stderr
    out = tmp_path / "out.csv"
    out.write_text("keep")
    p = klp("query", "SELECT 1", fleet[0], "-o", out, check=False)
    assert p.returncode == 1 and out.read_text() == "keep"
    klp("query", "SELECT 1 AS one", fleet[0], "-o", out, "--force", "-F", "csv")
    assert out.read_text() == "one\n1\n"


def test_compare_takes_a_dataset_and_a_condition_per_side(fleet, tmp_path):
    """compare over a dataset split by host equals compare over the files."""
    from kvmlockprof.analysis import compare
    from kvmlockprof.views.compare_report import load_side
    dataset.export(fleet, tmp_path / "ds")
    d = str(tmp_path / "ds")
    base, new = load_side([d], "host = 'hv1'"), load_side([d], "host = 'hv2'")
    assert [r.manifest["host"] for r in base + new] == ["hv1", "hv1", "hv2"]
    files_base, files_new = load_side(fleet[:2]), load_side(fleet[2:])
    a = compare.compare(base, new)
    b = compare.compare(files_base, files_new)
    cols = ["metric", "base", "new"] if "metric" in a.columns else list(a.columns[:3])
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True),
                                  b[cols].reset_index(drop=True))
    # the same split given to the files themselves, and from the CLI
    assert len(load_side(fleet, "host = 'hv1'")) == 2
    p = klp("compare", d, d, "--base-where", "host = 'hv1'", "--new-where", "host = 'nope'",
            check=False)
    assert p.returncode == 1 and "no recording" in p.stderr


def test_a_format_1_recording_exports(fleet, tmp_path):
    """Recordings made before the checksums (format 1) are read and exported too."""
    from tests_support import rewrite
    old = rewrite(fleet[0], tmp_path / "v1.parquet", manifest=lambda m: {
        k: v for k, v in dict(m, version=1).items() if k != "integrity"})
    assert kvmlockprof.load(old).manifest["version"] == 1
    got = dataset.query("SELECT format_version, waits FROM recordings", [old])
    assert got.values.tolist() == [[1, 4]]
    assert dataset.query(PER_CLASS, [old]).equals(dataset.query(PER_CLASS, fleet[:1]))
