"""The exporter's collector on small frames (no BPF): bucket bounds against waits
counted by hand, counters that never go down, bounded labels, and the text read back
by prometheus_client's own parser. The live test (a real Prometheus scraping it) is
tests/test_live_exporter.py."""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_om
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT
from kvmlockprof.views import exporter as exp

SLOTS = 64


def slots_of(waits_ns):
    """The in-kernel histogram of these waits: bcc's bpf_log2l(v) is v's bit length."""
    h = np.zeros(SLOTS, np.uint64)
    for v in waits_ns:
        h[int(v).bit_length()] += 1
    return h


def frame(rows):
    """rows: (lock, vm, type, [wait ns ...]) -> one read's increases."""
    return pd.DataFrame({"lock": [r[0] for r in rows], "vm": [r[1] for r in rows],
                         "type": [r[2] for r in rows],
                         "count": [float(len(r[3])) for r in rows],
                         "total_ns": [float(sum(r[3])) for r in rows],
                         "hist": [slots_of(r[3]) for r in rows]})


def registry(**snap):
    """A registry whose collector has published a Snapshot with these fields."""
    s = exp.Snapshot()
    for k, v in snap.items():
        setattr(s, k, v)
    c = exp.Collector()
    c.publish(s)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(c)
    return reg


def scrape(series, **snap):
    """The text a scrape serves for this state, parsed by prometheus_client's parser:
    {(name, labels as a sorted tuple): value}."""
    text = generate_latest(registry(locks=series.rows(), **snap)).decode()
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_buckets_are_the_waits_under_each_bound():
    rng = np.random.default_rng(1)
    waits = rng.integers(0, 30_000_000_000, 500).tolist() + [0, 1, 255, 256, 1023, 1024]
    series = exp.LockSeries()
    series.add(frame([("kvm->slots_lock", "vm1", "mutex", waits)]))
    got = scrape(series)
    lab = {"lock": "kvm->slots_lock", "vm": "vm1", "type": "mutex"}
    for le in exp.LE_SECONDS:
        want = sum(1 for w in waits if w < round(le * 1e9))      # by hand: shorter waits
        assert value(got, "kvmlockprof_lock_wait_duration_seconds_bucket", **lab,
                     le=repr(le)) == want
    assert value(got, "kvmlockprof_lock_wait_duration_seconds_bucket", **lab,
                 le="+Inf") == len(waits)
    assert value(got, "kvmlockprof_lock_waits_total", **lab) == len(waits)
    assert value(got, "kvmlockprof_lock_wait_seconds_total", **lab) == \
        pytest.approx(sum(waits) / 1e9)
    assert value(got, "kvmlockprof_lock_wait_duration_seconds_count", **lab) == len(waits)


def test_bounds_are_powers_of_two_ns():
    assert [round(le * 1e9) for le in exp.LE_SECONDS] == [2 ** s for s in exp.LE_SLOTS]


def test_streamed_latencies_bucket_by_le():
    ns = np.array([0, 256, 257, 1024, 5000, 10**10], np.uint64)
    b = exp.values_buckets(ns)
    assert b.tolist() == [sum(1 for v in ns.tolist() if v <= round(le * 1e9))
                          for le in exp.LE_SECONDS]


def test_counters_only_grow_and_labels_stay_bounded():
    """3 lock classes, --top 2: the third counts as other; when it overtakes one,
    that one stops being served but no served counter ever goes down."""
    series = exp.LockSeries(top_locks=2, top_vms=5)
    seen = {}
    reads = [
        [("kvm->slots_lock", "a", "mutex", [1000] * 10),
         ("kvm->mmu_lock", "a", "rwlock:W", [500] * 5),
         ("0xffff1", "a", "spinlock", [10] * 3)],
        [("0xffff1", "a", "spinlock", [10**6] * 20)],           # overtakes mmu_lock
        [("kvm->mmu_lock", "a", "rwlock:W", [100])],            # now counted as other
    ]
    served = []
    for r in reads:
        series.add(frame(r))
        got = scrape(series)
        waits = {k: v for k, v in got.items() if k[0] == "kvmlockprof_lock_waits_total"}
        for k, v in waits.items():
            assert v >= seen.get(k, 0), f"{k} went down"
            seen[k] = v
        served.append({dict(k[1])["lock"] for k in waits})
        assert len({dict(k[1])["lock"] for k in waits} - {"other"}) <= 2
    assert served[0] == {"kvm->slots_lock", "kvm->mmu_lock", "other"}
    assert "0xffff1" in served[1] and "kvm->mmu_lock" not in served[2]
    # every wait counted once, under one served or unserved series
    total = sum(v[0] for v in series.acc.values())
    assert total == 10 + 5 + 3 + 20 + 1


def test_vms_beyond_the_top_are_other():
    series = exp.LockSeries(top_locks=5, top_vms=2)
    series.add(frame([("kvm->slots_lock", f"vm{i}", "mutex", [1000 * (i + 1)])
                      for i in range(5)]))
    got = scrape(series)
    vms = {dict(k[1])["vm"] for k in got if k[0] == "kvmlockprof_lock_waits_total"}
    assert vms == {"vm4", "vm3", "other"}
    assert value(got, "kvmlockprof_lock_waits_total", lock="kvm->slots_lock", vm="other",
                 type="mutex") == 3


def test_probe_metrics_and_openmetrics():
    lat = exp.Latencies()
    lat.add_events("gpc", "gpc_refresh", np.array([300, 5000], np.uint64))
    lat.set_aggregate("srcu", "srcu_sections", pd.DataFrame(
        {"count": [2], "total_ns": [3000], "hist": [slots_of([1000, 2000])]}))
    snap = dict(latencies=lat.rows(),
                counters={"contention": {"end": 7, "lost_agg_full": 1, "stack_failures": 2},
                          "gpc": {"refreshes": 2, "lost_ringbuf_full": 0}},
                ratios={("gpc", "gpc check"): (9, 10)},
                status={"contention": {"status": "attached", "method": "raw_tracepoint"},
                        "xen_evtchn": {"status": "unavailable", "reason": "no"}},
                map_entries=3, map_capacity=16384, info={"version": "x"})
    got = scrape(exp.LockSeries(), **snap)
    assert value(got, "kvmlockprof_probe_latency_seconds_count", probe="gpc",
                 what="gpc_refresh") == 2
    assert value(got, "kvmlockprof_probe_latency_seconds_bucket", probe="srcu",
                 what="srcu_sections", le=repr(exp.LE_SECONDS[2])) == 2   # both < 4096 ns
    assert value(got, "kvmlockprof_lost_events_total", probe="contention",
                 reason="agg_full") == 1
    assert value(got, "kvmlockprof_lost_events_total", probe="contention",
                 reason="stack_failures") == 2
    assert value(got, "kvmlockprof_probe_events_total", probe="contention", counter="end") == 7
    assert value(got, "kvmlockprof_probe_ratio_hits_total", probe="gpc", ratio="gpc check") == 9
    assert value(got, "kvmlockprof_probe_attached", probe="xen_evtchn", method="",
                 status="unavailable") == 0
    assert value(got, "kvmlockprof_aggregate_map_entries") == 3
    # the same state in OpenMetrics, read by its own parser
    fams = {f.name for f in parse_om(generate_om(registry(**snap)).decode())}
    assert {"kvmlockprof_lock_waits", "kvmlockprof_probe_latency_seconds",
            "kvmlockprof_lost_events"} <= fams


def test_aggregate_latency_never_goes_down():
    lat = exp.Latencies()
    df = pd.DataFrame({"count": [5], "total_ns": [5000], "hist": [slots_of([1000] * 5)]})
    lat.set_aggregate("xarray", "xa_erase_agg", df)
    lat.set_aggregate("xarray", "xa_erase_agg", df.assign(count=[3]))
    assert lat.rows()[0][1] == 5


@pytest.mark.parametrize("listen,want", [("127.0.0.1:9475", ("127.0.0.1", 9475)),
                                         ("[::1]:9000", ("::1", 9000)),
                                         (":9000", ("0.0.0.0", 9000))])
def test_parse_listen(listen, want):
    assert exp.parse_listen(listen) == want


@pytest.mark.parametrize("bad", ["9475", "host:", "host:99999", "host:x"])
def test_parse_listen_refuses(bad):
    with pytest.raises(ValueError, match="HOST:PORT"):
        exp.parse_listen(bad)


def test_dashboard_names_only_served_metrics():
    """contrib/grafana-dashboard.json: valid JSON, every panel has a query, and every
    kvmlockprof_* name it uses is one the collector serves (the live test runs them
    against a real Prometheus)."""
    with open(os.path.join(ROOT, "contrib", "grafana-dashboard.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all(p.get("targets") for p in dash["panels"] if p["type"] != "row")
    s = exp.Snapshot()
    s.locks = [(("kvm->slots_lock", "vm", "mutex"), 1.0, 1.0, np.ones(len(exp.LE_SLOTS)))]
    s.latencies = [(("gpc", "gpc_refresh"), 1.0, 1.0, np.ones(len(exp.LE_SLOTS)))]
    s.counters = {"contention": {"end": 1, "lost_agg_full": 0}}
    s.ratios = {("gpc", "gpc check"): (1, 1)}
    s.status = {"contention": {"status": "attached", "method": "raw_tracepoint"}}
    s.info = {"version": "x"}
    c = exp.Collector()
    c.publish(s)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(c)
    served = {smp.name for fam in text_string_to_metric_families(generate_latest(reg).decode())
              for smp in fam.samples}
    queries = exprs + [v["query"] for v in dash["templating"]["list"]]
    used = {n for e in queries for n in re.findall(r"\bkvmlockprof_\w+", e)}
    assert used and used <= served, used - served


def test_systemd_unit_verifies(tmp_path):
    """contrib/kvmlockprof-exporter.service, checked by systemd's own parser."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze missing")
    unit = tmp_path / "kvmlockprof-exporter.service"
    text = open(os.path.join(ROOT, "contrib", "kvmlockprof-exporter.service")).read()
    exe = shutil.which("true")                  # its ExecStart must exist to verify
    unit.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", text, flags=re.M))
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True)
    errors = [ln for ln in p.stderr.splitlines() if "kvmlockprof-exporter" in ln]
    assert not errors, p.stderr
    assert re.search(r"^ExecStart=\S*kvmlockprof exporter", text, re.M)


class FakeFunctions:
    """What the session reads of the function probes: the real gpc and xen_evtchn
    Probe objects (their streams, aggregates and top ratios), made-up events."""

    def __init__(self):
        import errno
        import pyarrow as pa
        from kvmlockprof.probes import gpc, xen_evtchn
        self.plans = {gpc.PROBE: None, xen_evtchn.PROBE: None}
        xen = np.zeros(4, [("lat_ns", "u8"), ("ret", "i4"), ("slow", "u4")])
        xen["lat_ns"] = [100, 300, 5000, 70000]
        xen["ret"] = [1, 1, -errno.EWOULDBLOCK, 1]
        xen["slow"] = [0, 0, 0, 1]
        self.batches = [{"xen_evtchn": xen}, {}]
        op = {v: k for k, v in gpc.OPS.items()}
        self.ops = pa.table({"tgid": [1, 1], "kvm": [2, 2], "gpc": [3, 3], "place": [0, 0],
                             "op": [op["check_hit"], op["check_miss"]], "count": [9, 1]})

    def poll(self):
        return self.batches.pop(0) if self.batches else {}

    def snapshots(self):
        return {"gpc_ops": self.ops}

    def counters(self):
        return {"xen_evtchn": {"calls": 4, "lost_ringbuf_full": 0}}


def test_session_serves_function_probes():
    """Streamed events' latencies and per-drain ratios are counted once each; a
    ratio read from a map is its totals; losses and the probe set are served."""
    src = FakeFunctions()
    status = {"xen_evtchn": {"status": "attached", "method": "fentry"},
              "contention": {"status": "not requested"}}
    s = exp.ExporterSession({"functions": src}, status, kbtf=None, filters={})
    s.poll_functions()          # the first batch, between reads
    s.read()
    s.read()                    # nothing new: nothing counted twice
    reg = CollectorRegistry(auto_describe=False)
    reg.register(s.collector)
    got = {(smp.name, tuple(sorted(smp.labels.items()))): smp.value for fam in
           text_string_to_metric_families(generate_latest(reg).decode()) for smp in fam.samples}
    # xen: 3 fast-path sends, 1 fell back
    assert value(got, "kvmlockprof_probe_ratio_hits_total", probe="xen_evtchn",
                 ratio="xen fast path") == 2
    assert value(got, "kvmlockprof_probe_ratio_calls_total", probe="xen_evtchn",
                 ratio="xen fast path") == 3
    assert value(got, "kvmlockprof_probe_ratio_hits_total", probe="gpc", ratio="gpc check") == 9
    assert value(got, "kvmlockprof_probe_ratio_calls_total", probe="gpc",
                 ratio="gpc check") == 10
    assert value(got, "kvmlockprof_probe_latency_seconds_count", probe="xen_evtchn",
                 what="xen_evtchn") == 4
    assert value(got, "kvmlockprof_probe_latency_seconds_bucket", probe="xen_evtchn",
                 what="xen_evtchn", le=repr(exp.LE_SECONDS[0])) == 1       # 100 ns <= 256
    assert value(got, "kvmlockprof_lost_events_total", probe="xen_evtchn",
                 reason="ringbuf_full") == 0
    assert value(got, "kvmlockprof_probe_attached", probe="xen_evtchn", method="fentry",
                 status="attached") == 1
    assert value(got, "kvmlockprof_exporter_reads_total") == 2


def test_exporter_without_privileges_says_so(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("already unprivileged: nothing to drop")
    import sys
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-m", "kvmlockprof", "exporter"], cwd="/tmp",
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert p.stderr == ("kvmlockprof: exporter needs root (or CAP_BPF+CAP_PERFMON): run it "
                        "with sudo\n")
