"""Recordings of two hosts as one dataset, live: 3 real recordings of the built-in
workload, labelled hv1 (2 runs) and hv2 (1 run), queried per lock class with
`kvmlockprof query`; checked against each recording's own `report`, against DuckDB and
pyarrow.dataset reading the files with no code of ours, and the waits against an
independent BPF count of the kernel's contention_end events."""
import json
import re

import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pytest

from conftest import ends_counter, klp, workload_argv

pytestmark = pytest.mark.live

RUNS = [("hv1", "r1"), ("hv1", "r2"), ("hv2", "r1")]
PER_CLASS = ("SELECT host, lock_class, sum(count) AS waits, sum(total_ns) AS wait_ns "
             "FROM aggregates GROUP BY ALL ORDER BY host, lock_class")


def _class(name):
    """The lock class as docs/fleet.md states it: the VM's pid (and vCPU index), the CPU,
    the process or the zone dropped, and a class name's address."""
    name = re.sub(r"^(\w+)\(cpu \d+\)(?!->)", r"\1", name)           # a per-CPU variable
    name = re.sub(r"@[0-9a-f]+$", "", re.sub(r"^(rq|mm|zone|futex_hash_bucket)\([^)]*\)->",
                                             r"\1->", name))
    return re.sub(r"^kvm\(\d+\)->vcpu\d+->", "vcpu->",
                  re.sub(r"^kvm\(\d+\)->(?!vcpu)", "kvm->", name))


@pytest.fixture(scope="module")
def fleet(live, tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    counter = ends_counter()
    try:
        files = []
        for host, run in RUNS:
            f = d / f"{host}-{run}.parquet"
            klp("record", "-q", "--host", host, "--run", run, "-o", f, "--",
                *workload_argv("--duration", 2, "--vcpus", 2, "--churn"))
            files.append(str(f))
        ends = {k.value: v.value for k, v in counter["ends"].items()}
    finally:
        counter.cleanup()
    return d, files, ends


def reports_summed(files):
    rows = []
    for f in files:
        rep = json.loads(klp("report", f, "--format", "json", "--limit", 100000).stdout)
        rows += [{"host": rep["manifest"]["host"], "lock_class": _class(r["lock"]),
                  "waits": r["contended"], "wait_ns": r["total_ns"]} for r in rep["rows"]]
    return pd.DataFrame(rows).groupby(["host", "lock_class"], as_index=False)[
        ["waits", "wait_ns"]].sum().sort_values(["host", "lock_class"]).reset_index(drop=True)


def test_sql_per_lock_class_equals_the_reports_summed(fleet):
    d, files, _ = fleet
    got = pd.DataFrame(json.loads(klp("query", PER_CLASS, *files, "-F", "json").stdout))
    want = reports_summed(files)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert set(got["host"]) == {"hv1", "hv2"}
    # KVM's locks of three VMs (three pids) meet in one class per host
    slots = got[got["lock_class"] == "kvm->slots_lock"]
    assert list(slots["host"]) == ["hv1", "hv2"] and (slots["waits"] > 100).all()
    # across hosts, per class: the SQL's own sum equals the reports'
    across = json.loads(klp("query", "SELECT lock_class, sum(count) AS waits FROM aggregates "
                            "WHERE lock_class LIKE 'kvm->%' GROUP BY ALL ORDER BY 1",
                            *files, "-F", "json").stdout)
    want_across = want[want["lock_class"].str.startswith("kvm->")].groupby("lock_class")[
        "waits"].sum()
    assert {r["lock_class"]: r["waits"] for r in across} == want_across.to_dict()
    print("per host and class:\n" + got.to_string(index=False))


def test_engines_without_our_views_give_the_same(fleet, tmp_path):
    d, files, _ = fleet
    want = reports_summed(files)
    out = tmp_path / "ds"
    klp("export", "--dataset", out, *files)
    # pyarrow.dataset on the exported directory
    t = ds.dataset(out / "aggregates").to_table().group_by(["host", "lock_class"]).aggregate(
        [("count", "sum"), ("total_ns", "sum")]).to_pandas()
    t = t.rename(columns={"count_sum": "waits", "total_ns_sum": "wait_ns"})[
        ["host", "lock_class", "waits", "wait_ns"]].sort_values(["host", "lock_class"])
    pd.testing.assert_frame_equal(t.reset_index(drop=True), want, check_dtype=False)
    # DuckDB on the exported files
    con = duckdb.connect()
    got = con.sql(PER_CLASS.replace("FROM aggregates",
                                    f"FROM '{out}/aggregates/*.parquet'")).df()
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    # DuckDB on the recording files themselves: the struct column and the footer's manifest
    fl = "[" + ", ".join(f"'{f}'" for f in files) + "]"
    got = con.sql(f"""
        WITH m AS (SELECT file_name, decode(value) AS j FROM parquet_kv_metadata({fl})
                   WHERE decode(key) = 'kvmlockprof.manifest'),
             a AS (SELECT filename AS file_name, unnest(aggregates)
                   FROM read_parquet({fl}, filename = true) WHERE "table" = 'aggregates'),
             n AS (SELECT '0x' || lower(hex(lock_addr)) AS h, * FROM a)
        SELECT m.j->>'host' AS host,
               regexp_replace(regexp_replace(regexp_replace(regexp_replace(regexp_replace(
                   coalesce(m.j->'lock_names'->n.h->>'name', m.j->'lock_symbols'->>n.h, n.h),
                   '^kvm\\(\\d+\\)->vcpu\\d+->', 'vcpu->'), '^kvm\\(\\d+\\)->', 'kvm->'),
                   '^(rq|mm|zone|futex_hash_bucket)\\([^)]*\\)->', '\\1->'),
                   '^(\\w+)\\(cpu \\d+\\)([.\\[])', '\\1\\2'), '@[0-9a-f]+$', '')
                   AS lock_class, sum(count) AS waits, sum(total_ns) AS wait_ns
        FROM n JOIN m USING (file_name) GROUP BY ALL ORDER BY host, lock_class""").df()
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    # and `query` over the dataset directory reads it as it reads the recordings
    q = pd.DataFrame(json.loads(klp("query", PER_CLASS, out, "-F", "json").stdout))
    pd.testing.assert_frame_equal(q, want, check_dtype=False)


def test_waits_per_recording_equal_an_independent_count(fleet):
    """The workload's waits in SQL (aggregates) against a BPF program of the test's own
    counting contention_end per process while the three recordings ran."""
    d, files, ends = fleet
    rows = json.loads(klp("query", """
        SELECT r.host, r.run, (r.manifest->>'$.command_pid')::BIGINT AS pid,
               sum(a.count) AS waits
        FROM aggregates a JOIN recordings r USING (recording)
        WHERE a.tgid = (r.manifest->>'$.command_pid')::BIGINT
        GROUP BY ALL ORDER BY r.host, r.run""", *files, "-F", "json").stdout)
    assert [(r["host"], r["run"]) for r in rows] == RUNS
    for r in rows:
        independent = ends.get(r["pid"], 0)
        assert independent > 1000, "the workload should contend"
        assert abs(r["waits"] - independent) <= 0.01 * independent, (r, independent)
        print(f"{r['host']} {r['run']}: SQL {r['waits']} waits, independent {independent}")


def test_compare_over_the_dataset_by_host(fleet, tmp_path):
    d, files, _ = fleet
    out = tmp_path / "ds"
    klp("export", "--dataset", out, *files)
    a = json.loads(klp("compare", out, out, "--base-where", "host = 'hv1'", "--new-where",
                       "host = 'hv2'", "-F", "json", "--force").stdout)
    b = json.loads(klp("compare", "--base", files[0], "--base", files[1], "--new", files[2],
                       "-F", "json", "--force").stdout)
    assert len(a["base"]) == 2 and len(a["new"]) == 1 and a["rows"]
    key = lambda rows: sorted((r["name"], r["metric"], r["base"], r["new"]) for r in rows)  # noqa
    assert key(a["rows"]) == key(b["rows"])
