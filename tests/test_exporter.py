"""The exporter's collector on small frames (no BPF): bucket bounds against waits
counted by hand, counters that never go down, bounded labels, and the text read back
by prometheus_client's own parser; its session over a made-up in-kernel map, read by a
real Prometheus. The live test (the exporter on BPF, a real Prometheus scraping it) is
tests/test_live_exporter.py."""
import json
import os
import re
import shutil
import subprocess
import time

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


def test_labels_are_kept_and_bounded():
    """--top 1: a class that overtakes the labelled one gets a label too, its earlier
    waits staying in other; the one overtaken keeps its label and counts on; once 2
    classes have one, a third that overtakes both counts as other. Every wait counted
    once, no series ends or falls."""
    series = exp.LockSeries(top_locks=1, top_vms=5)
    reads = [
        [("kvm->slots_lock", "a", "mutex", [1000] * 10),
         ("kvm->mmu_lock", "a", "rwlock:W", [500] * 5)],
        [("kvm->mmu_lock", "a", "rwlock:W", [10**6] * 2),         # overtakes slots_lock
         ("kvm->slots_lock", "a", "mutex", [1000])],
        [("0xffff1", "a", "spinlock", [10**8] * 3),               # overtakes both
         ("kvm->slots_lock", "a", "mutex", [1000])],
    ]
    seen, total = {}, 0
    for r in reads:
        series.add(frame(r))
        total += sum(len(w) for *_, w in r)
        got = scrape(series)
        waits = {(dict(k[1])["lock"], dict(k[1])["type"]): v for k, v in got.items()
                 if k[0] == "kvmlockprof_lock_waits_total"}
        for k, v in seen.items():
            assert waits.get(k, -1) >= v, f"{k} went down or ended"
        seen = waits
        assert sum(waits.values()) == total
    assert seen == {("kvm->slots_lock", "mutex"): 12, ("kvm->mmu_lock", "rwlock:W"): 2,
                    ("other", "rwlock:W"): 5, ("other", "spinlock"): 3}
    assert series.locks.total == {}             # no label left to give: nothing ranked


def test_ranking_memory_is_bounded():
    """Thousands of lock addresses seen once each: the ranking keeps a bounded number
    of totals, at most 2 x --top of them get a label, and the series stay bounded."""
    series = exp.LockSeries(top_locks=5, top_vms=2)
    for i in range(60):
        series.add(frame([(f"0x{i:04x}{j:02x}", f"vm{j % 7}", "spinlock", [100 + i + j])
                          for j in range(100)]))
        assert len(series.locks.total) <= exp.RANK_KEEP * 5 * 2
    assert len(series.locks.named) == 10 and len(series.vms.named) <= 4
    assert len(series.acc) <= 11 * 5
    assert sum(v[0] for v in series.acc.values()) == 6000


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
    s.locks = [(("kvm->slots_lock", "vm", "mutex"), 1.0, 1.0, 1.0, 1.0,
                np.ones(len(exp.LE_SLOTS)))]
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

    role = "functions"

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


def test_increases_keep_a_histogram_that_grew_alone():
    """A read between a wait's count and slot adds: the entry's next increase is its
    histogram alone (or its count alone), kept; an entry made again counts whole."""
    def aggs(rows):
        return pd.DataFrame({"lock_addr": [r[0] for r in rows], "tgid": 7, "flags": 32,
                             "stack_id": 1, "count": np.array([r[1] for r in rows], np.uint64),
                             "total_ns": np.array([r[2] for r in rows], np.uint64),
                             "max_ns": 0, "min_ns": 0, "hist": [slots_of(r[3]) for r in rows]})
    prev = aggs([(1, 2, 2000, [1000]), (2, 5, 500, [100] * 5), (3, 9, 900, [100] * 9)])
    cur = aggs([(1, 2, 2000, [1000, 1000]),        # its second wait's slot, after the read
                (2, 6, 600, [100] * 5),            # a count, its slot not yet
                (3, 1, 100, [100])])               # deleted and made again
    got = exp.increases(cur, prev)
    assert got["lock_addr"].tolist() == [1, 2, 3]
    assert got["count"].tolist() == [0, 1, 1] and got["total_ns"].tolist() == [0, 100, 100]
    assert [h.sum() for h in got["hist"]] == [1, 0, 1]
    assert exp.increases(cur, cur).empty


# --- the session over made-up in-kernel aggregates, seen by Prometheus -----------------

TEXT = {"caller_x": 0xffffffff81000000, "caller_y": 0xffffffff81001000,
        "mutex_lock": 0xffffffff81002000}
LOCKS = {n: 0xffffffff82000000 + 0x1000 * i
         for i, n in enumerate(["lock_a", "lock_b", "lock_c", "lock_d"])}
STACKS = {7: [TEXT["mutex_lock"] + 4, TEXT["caller_x"] + 8],
          8: [TEXT["mutex_lock"] + 4, TEXT["caller_y"] + 8]}
VMS = {101: "vm1", 102: "vm2", 103: "vm3"}
MUTEX = 32
STEPS = 5


class FakeKernel:
    """The contention probe as ExporterSession reads it, over a made-up aggregate map.
    end() ends waits as the BPF program does: the entry's count and total_ns, then its
    histogram slot, separate atomic adds; torn="slot" puts a read between the two (the
    slot lands after it), torn="count" the other way round."""

    role = "waits"

    def run_queues_or_none(self, warn=None):
        return {}

    def lock_kinds(self):
        return {}

    def __init__(self):
        self.map = {}           # (lock_addr, tgid, flags, stack_id) -> [count, ns, hist]
        self.after_read = []
        self.waits = {}         # (lock, tgid) -> every wait's ns, the truth
        self.truth = [(0, 0, np.zeros(64))]    # after each read: the map's sums
        self.options = {"agg_entries": 1024}
        self.bpf = {}
        self.owners = None      # --lock-owner: (lock, tid) -> [count, ns, tgid, comm]
        self.owned = []         # every owned wait added: (tid, n, ns), the truth
        self.after_owner_read = []      # what lands between the read and a delete

    def end(self, lock, tgid, ns, n=1, stack=None, torn=None):
        stack = exp.locks.NO_STACK if stack is None else stack
        e = self.map.setdefault((LOCKS[lock], tgid, MUTEX, stack),
                                [0, 0, np.zeros(64, np.uint64)])
        self.waits.setdefault((lock, tgid), []).extend([ns] * n)

        def count():
            e[0] += n
            e[1] += n * ns

        def slot():
            e[2][int(ns).bit_length()] += n
        first, then = (slot, count) if torn == "count" else (count, slot)
        first()
        if torn:
            self.after_read.append(then)
        else:
            then()

    def own(self, lock, tid, tgid, comm, ns, n=1):
        """n waits of ns that began while thread tid (of tgid, named comm) held lock
        (--lock-owner's lock_owners map)."""
        e = self.owners.setdefault((LOCKS[lock], tid), [0, 0, tgid, comm])
        e[0] += n
        e[1] += n * ns
        self.owned.append((tid, n, n * ns))

    def forget_owners(self, keys):
        out = []
        for a, o in keys:
            e = self.owners.pop((a, o), None)
            if e:
                out.append((a, o, e[0], e[1]))
        return out

    def snapshots(self):
        import pyarrow as pa
        out = self._aggregates()
        if self.owners is not None:
            k, v = list(self.owners), list(self.owners.values())
            out["lock_owners"] = pa.table({
                "lock_addr": pa.array([x[0] for x in k], pa.uint64()),
                "owner": pa.array([x[1] for x in k], pa.uint32()),
                "count": pa.array([x[0] for x in v], pa.uint64()),
                "total_ns": pa.array([x[1] for x in v], pa.uint64()),
                "owner_tgid": pa.array([x[2] for x in v], pa.uint32()),
                "owner_comm": pa.array([x[3] for x in v]).dictionary_encode()})
        for f in self.after_owner_read:
            f()
        self.after_owner_read = []
        return out

    def _aggregates(self):
        import pyarrow as pa
        keys, vals = list(self.map), list(self.map.values())
        col = lambda i, t: pa.array([k[i] for k in keys], t)      # noqa: E731
        hist = np.array([v[2] for v in vals], np.uint64).reshape(-1, 64)
        count = np.array([v[0] for v in vals], np.uint64)
        total = np.array([v[1] for v in vals], np.uint64)
        table = pa.table({
            "lock_addr": col(0, pa.uint64()), "tgid": col(1, pa.uint32()),
            "flags": col(2, pa.uint32()), "stack_id": col(3, pa.int32()),
            "count": pa.array(count), "total_ns": pa.array(total),
            "max_ns": pa.array(total), "min_ns": pa.array(total),
            "hist": pa.FixedSizeListArray.from_arrays(pa.array(hist.ravel()), 64)
            .cast(pa.list_(pa.uint64()))})
        self.truth.append((int(count.sum()), int(total.sum()), hist.sum(axis=0)))
        for f in self.after_read:
            f()
        self.after_read = []
        return {"aggregates": table}

    def poll(self):
        return {}

    def counters(self):
        return {"end": sum(v[0] for v in self.map.values())}

    def stack_addrs(self, stack_id):
        return STACKS[stack_id]


def promotion(k, step):
    """--top 1 --top-vms 1: lock_b overtakes lock_a (a second label), lock_c overtakes
    both (no label left); vm2 overtakes vm1, vm3 finds no label left; a read falls
    between a wait's count and slot adds twice, once each way."""
    if step == 0:
        k.end("lock_a", 101, 1000, n=60)
        k.end("lock_b", 101, 500, n=50)
    elif step == 1:
        k.end("lock_b", 101, 100_000, n=10)
        k.end("lock_b", 101, 100_000, torn="slot")
    elif step == 2:
        k.end("lock_c", 102, 10_000_000, n=5)
        k.end("lock_a", 102, 2000, n=3)
        k.end("lock_a", 101, 3000, torn="count")
    elif step == 3:
        k.end("lock_d", 103, 10**9)
        k.end("lock_a", 101, 1000, n=2)


def callstacks(k, step):
    """-S caller_x: lock_a's waits, 10 a read with a stack (6 from caller_x, 4 from
    caller_y), 90 without (past the stack budget), each half 3 us and half 100 us."""
    if step < STEPS - 1:
        for ns in (3000, 100_000):
            k.end("lock_a", 101, ns, n=3, stack=7)
            k.end("lock_a", 101, ns, n=2, stack=8)
            k.end("lock_a", 101, ns, n=45)


@pytest.fixture
def make_session(tmp_path, monkeypatch):
    """ExporterSession over a FakeKernel, with a kallsyms of the made-up symbols and
    the made-up processes named as VMs."""
    from kvmlockprof.kernel.ksyms import Kallsyms
    from kvmlockprof.views import top
    path = tmp_path / "kallsyms"
    path.write_text("".join(f"{a:x} T {n}\n" for n, a in TEXT.items()) +
                    "".join(f"{a:x} D {n}\n" for n, a in LOCKS.items()))
    ksyms = Kallsyms(str(path))
    monkeypatch.setattr(top, "Kallsyms", lambda: ksyms)
    monkeypatch.setattr(exp, "_gone", lambda tgids: [])    # (they never exit)

    def make(kernel, **kw):
        status = {"contention": {"status": "attached", "method": "raw_tracepoint"}}
        s = exp.ExporterSession({"contention": kernel}, status, kbtf=None, **kw)
        s.procs.update({str(t): {"comm": "qemu", "vm_name": v} for t, v in VMS.items()})
        return s
    return make


def le_buckets(hist):
    """The cumulative counts a histogram of log2 slots has under each `le` = 2^e ns: its
    slots up to e (slot s holds the waits with s bits, shorter than 2^s ns)."""
    return [int(hist[:e + 1].sum()) for e in exp.LE_SLOTS]


def true_bucket(waits, q):
    """(lo, hi] in seconds: the bucket holding the wait of rank q (Prometheus's rank:
    the first bucket whose count reaches q x count)."""
    w = sorted(waits)
    v = w[max(int(np.ceil(q * len(w))) - 1, 0)]
    i = next(i for i, s in enumerate(exp.LE_SLOTS) if v < 2 ** s)
    return (2.0 ** exp.LE_SLOTS[i - 1] / 1e9 if i else 0.0), 2.0 ** exp.LE_SLOTS[i] / 1e9


def served(collector):
    """What a scrape of the collector serves, read by prometheus_client's parser:
    {(name, labels as a sorted tuple): value}."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    text = generate_latest(reg).decode()
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def histograms(got, name="kvmlockprof_lock_wait_duration_seconds"):
    """{(lock, vm, type): ({le: cumulative count}, _count, _sum)}"""
    out = {}
    for (n, lab), v in got.items():
        d = dict(lab)
        key = (d.get("lock"), d.get("vm"), d.get("type"))
        if n == name + "_bucket":
            out.setdefault(key, [{}, None, None])[0][d["le"]] = v
        elif n in (name + "_count", name + "_sum"):
            out.setdefault(key, [{}, None, None])[1 if n.endswith("count") else 2] = v
    return out


def check_histograms(hists):
    """Each histogram by Prometheus's rules: _count is its +Inf bucket, its buckets
    never fall with le and never exceed _count."""
    for key, (b, count, _) in hists.items():
        assert b["+Inf"] == count, key
        cum = [b[repr(le)] for le in exp.LE_SECONDS] + [b["+Inf"]]
        assert cum == sorted(cum), (key, cum)


def test_served_counters_add_up_across_a_promotion(make_session):
    """At every read: no served series falls or ends; the served series add up to the
    made-up map's waits, seconds and histogram slots (whatever their labels); each
    histogram is consistent. Once the reads fall between no adds any more, the
    histograms hold every wait, as many as waits_total."""
    k = FakeKernel()
    s = make_session(k, top_locks=1, top_vms=1)
    before = {}
    for step in range(STEPS):
        promotion(k, step)
        s.read()
        got = served(s.collector)
        waits = {lab: v for (n, lab), v in got.items() if n == "kvmlockprof_lock_waits_total"}
        for lab, v in before.items():
            assert waits.get(lab, -1) >= v, f"{dict(lab)} fell or ended at read {step + 1}"
        before = waits
        n, ns, hist = k.truth[-1]
        assert sum(waits.values()) == n
        assert sum(v for (m, _), v in got.items()
                   if m == "kvmlockprof_lock_wait_seconds_total") == pytest.approx(ns / 1e9)
        hists = histograms(got)
        check_histograms(hists)
        assert sum(h[1] for h in hists.values()) == hist.sum()
        assert [sum(h[0][repr(le)] for h in hists.values()) for le in exp.LE_SECONDS] == \
            le_buckets(hist)
        assert {dict(lab)["lock"] for lab in waits} <= {"lock_a", "lock_b", "other"}
        assert {dict(lab)["vm"] for lab in waits} <= {"vm1", "vm2", "other"}
    every = [w for ws in k.waits.values() for w in ws]
    assert sum(waits.values()) == sum(h[1] for h in hists.values()) == len(every)
    assert sum(h[2] for h in hists.values()) == pytest.approx(sum(every) / 1e9)
    assert [sum(h[0][repr(le)] for h in hists.values()) for le in exp.LE_SECONDS] == \
        [sum(1 for w in every if w < round(le * 1e9)) for le in exp.LE_SECONDS]


def spread_histogram_too(spread):
    """spread_unwalked as it may become: the unwalked waits' histogram also spread over
    the lock's walked stacks, in proportion to their counts."""
    def spread_hist(aggs):
        no = exp.locks.NO_STACK
        hist = np.stack(aggs["hist"].to_numpy()).astype(np.float64)
        unwalked = (aggs["stack_id"] == no).to_numpy()
        group = aggs.groupby(["lock_addr", "flags", "tgid"]).ngroup().to_numpy()
        n = np.where(unwalked, 0.0, aggs["count"].to_numpy(np.float64))
        walked_n = np.bincount(group, n)[group]
        share = np.divide(n, walked_n, out=np.zeros_like(n), where=walked_n > 0)
        for g in np.unique(group[unwalked]):
            if walked_n[group == g][0] > 0:
                rows = group == g
                hist[rows & ~unwalked] += np.outer(share[rows & ~unwalked],
                                                   hist[rows & unwalked].sum(axis=0))
        return spread(aggs.assign(hist=list(hist)))
    return spread_hist


def spreads_histograms():
    """Whether analysis.spread_unwalked spreads the unwalked waits' histogram too."""
    aggs = pd.DataFrame({"lock_addr": [1, 1], "flags": 1, "tgid": 1,
                         "stack_id": [7, exp.locks.NO_STACK], "count": [1, 1],
                         "total_ns": [10, 10], "hist": [slots_of([10]), slots_of([10])]})
    return exp.locks.spread_unwalked(aggs)["hist"].iloc[0].sum() > 1


@pytest.mark.parametrize("spread", ["analysis", "hist too"])
def test_callstack_filter_histogram_agrees(make_session, monkeypatch, spread):
    """-S: the waits without a stack are spread over the walked ones (estimates). The
    histogram's _count is its +Inf bucket, its quantiles fall in the made-up waits'
    buckets and its mean is theirs, whether spread_unwalked leaves the histogram to
    the walked waits or spreads it too (as the analysis does, and as a stand-in does)."""
    hist_spread = spreads_histograms()
    if spread == "hist too" and not hist_spread:
        monkeypatch.setattr(exp.locks, "spread_unwalked",
                            spread_histogram_too(exp.locks.spread_unwalked))
        hist_spread = True
    k = FakeKernel()
    s = make_session(k, filters={"callstacks": ("caller_x",)})
    for step in range(STEPS):
        callstacks(k, step)
        s.read()
    got = served(s.collector)
    hists = histograms(got)
    check_histograms(hists)
    assert list(hists) == [("lock_a", "vm1", "mutex")]
    b, count, total = hists[("lock_a", "vm1", "mutex")]
    waits = value(got, "kvmlockprof_lock_waits_total", lock="lock_a", vm="vm1", type="mutex")
    assert waits == pytest.approx(0.6 * 400)        # (caller_x: 6 of the 10 walked)
    assert count == (pytest.approx(waits) if hist_spread else 24)
    every = k.waits[("lock_a", 101)]
    assert total / count == pytest.approx(np.mean(every) / 1e9)
    for q in (0.25, 0.75):
        lo, hi = true_bucket(every, q)
        first = next(le for le in exp.LE_SECONDS if b[repr(le)] >= q * count)
        assert first == hi, (q, first, hi)


class CountingCollector(exp.Collector):
    """The session's collector, counting the scrapes since its last publish."""

    def __init__(self):
        import threading
        super().__init__()
        self.scrapes, self.cond = 0, threading.Condition()

    def publish(self, snap):
        with self.cond:
            super().publish(snap)
            self.scrapes = 0

    def collect(self):
        yield from super().collect()
        with self.cond:
            self.scrapes += 1
            self.cond.notify_all()

    def wait_scrapes(self, n, timeout=30):
        with self.cond:
            assert self.cond.wait_for(lambda: self.scrapes >= n, timeout), "no scrape"


def test_prometheus_reads_the_counters_right(make_session, tmp_path):
    """A real Prometheus (Debian's) scrapes two exporters fed with made-up aggregates
    (no BPF), every read served to at least one whole scrape: the promotion and torn
    reads above, and -S. By PromQL: resets() finds no counter, bucket or _count of any
    series going down; no series ends once served; at every scrape sum() of each
    counter over its series is the made-up map's total at that read; every histogram
    has _count = its +Inf bucket >= each bucket; histogram_quantile() lands in the
    bucket of the made-up waits' quantile."""
    from promserver import Prometheus, free_port, wait_for
    jobs = {"promotion": (FakeKernel(), promotion, dict(top_locks=1, top_vms=1)),
            "callstacks": (FakeKernel(), callstacks, dict(filters={"callstacks": ("caller_x",)}))}
    sessions, servers = {}, []
    for job, (k, _, kw) in jobs.items():
        s = sessions[job] = make_session(k, **kw)
        s.collector = CountingCollector()
        servers.append(exp.serve(s.collector, f"127.0.0.1:{free_port()}"))
    prom = None
    try:
        prom = Prometheus({job: "127.0.0.1:%d" % srv.server_port
                           for job, (srv, _) in zip(jobs, servers)}, tmp_path, interval="200ms")
        prom.ready()
        wait_for(lambda: prom.value("sum(up)") == 2, 60, "both exporters scraped", 0.2)
        for step in range(STEPS):
            for job, (k, steps, _) in jobs.items():
                steps(k, step)
                sessions[job].read()
            for s in sessions.values():
                s.collector.wait_scrapes(2)     # (one of them whole, after the publish)
        wait_for(lambda: prom.value("min(kvmlockprof_exporter_reads_total)") == STEPS, 30,
                 "the last reads in Prometheus", 0.2)
        check_prometheus(prom, jobs)
    finally:
        if prom:
            prom.stop()
        for srv, thread in servers:
            srv.shutdown()
            srv.server_close()
            thread.join(5)


def check_prometheus(prom, jobs):
    hist = "kvmlockprof_lock_wait_duration_seconds"
    for name in ("kvmlockprof_lock_waits_total", "kvmlockprof_lock_wait_seconds_total",
                 f"{hist}_bucket", f"{hist}_count", f"{hist}_sum"):
        assert prom.value(f"max(resets({name}[1h]))") == 0, name
    time.sleep(1)
    end = time.time() - 0.5         # (every scrape up to then is in)
    series = prom.query('{__name__=~"kvmlockprof_lock_wait.*"}[1h]', end)
    for job, (k, _, _) in jobs.items():
        sel = f'job="{job}"'
        scrapes = [(float(t), int(v)) for t, v in prom.query(
            f"kvmlockprof_exporter_reads_total{{{sel}}}[1h]", end)[0]["values"]]
        at = [t for t, _ in scrapes]
        for ser in series:
            if ser["metric"]["job"] == job:       # served at every scrape from its first
                mine = [float(t) for t, _ in ser["values"]]
                assert mine == [t for t in at if t >= mine[0]], ser["metric"]
        for t, reads in scrapes:
            n, ns, slots = k.truth[reads]

            def total(name):
                return prom.value(f"sum({name}{{{sel}}})", t) or 0
            if job == "promotion":
                assert total("kvmlockprof_lock_waits_total") == n, (t, reads)
                assert total("kvmlockprof_lock_wait_seconds_total") == pytest.approx(ns / 1e9)
                assert total(f"{hist}_count") == slots.sum()
                by_le = {r["metric"]["le"]: float(r["value"][1]) for r in
                         prom.query(f"sum by (le) ({hist}_bucket{{{sel}}})", t)}
                assert [by_le.get(repr(le), 0) for le in exp.LE_SECONDS] == le_buckets(slots)
            assert not prom.query(f'{hist}_count{{{sel}}} != ignoring(le) '
                                  f'{hist}_bucket{{le="+Inf"}}', t)
            assert not prom.query(f"{hist}_bucket{{{sel}}} > ignoring(le) group_left "
                                  f"{hist}_count", t)
            hists = {}
            for r in prom.query(f'{{__name__=~"{hist}_(bucket|count)",{sel}}}', t):
                m = r["metric"]
                h = hists.setdefault((m["lock"], m["vm"], m["type"]), [{}, None, None])
                if "le" in m:
                    h[0][m["le"]] = float(r["value"][1])
                else:
                    h[1] = float(r["value"][1])
            check_histograms(hists)
    promo = [w for ws in jobs["promotion"][0].waits.values() for w in ws]
    cs = jobs["callstacks"][0].waits[("lock_a", 101)]
    for q, sel, waits in [(0.5, 'job="promotion"', promo), (0.9, 'job="promotion"', promo),
                          (0.5, 'job="promotion",lock="lock_a",vm="vm1"',
                           jobs["promotion"][0].waits[("lock_a", 101)]),
                          (0.25, 'job="callstacks"', cs), (0.75, 'job="callstacks"', cs)]:
        got = prom.value(f"histogram_quantile({q}, sum by (le) ({hist}_bucket{{{sel}}}))")
        lo, hi = true_bucket(waits, q)
        assert lo <= got <= hi, (q, sel, got, lo, hi)
    sel = '{job="callstacks"}'
    assert prom.value(f"sum({hist}_sum{sel}) / sum({hist}_count{sel})") == \
        pytest.approx(np.mean(cs) / 1e9)
    # (the promoted lock's waits before it got its label stay in other, where they were)
    waits = 'sum(kvmlockprof_lock_waits_total{job="promotion",lock="%s"})'
    assert prom.value(waits % "lock_b") == 11
    assert prom.value(waits % "other") == 50 + 5 + 1


def test_owner_series_add_up_by_class_and_forget_gone_owners(make_session, monkeypatch):
    """--lock-owner: per (lock class, owner class) waits and seconds; at every read the
    served owner series add up to every owned wait the made-up map holds or held, none
    falls or ends, their labels are classes (never a pid) and at most --top-owners of
    them plus `other`; the entries of owner threads gone are deleted from the map,
    their counts kept, a wait that ended between the read and the delete too."""
    from kvmlockprof.views import top
    gone = set()
    monkeypatch.setattr(top, "threads_gone", lambda pairs: [t for _, t in pairs
                                                            if t in gone])
    k = FakeKernel()
    k.owners = {}
    s = make_session(k, top_owners=1)
    plan = [[("lock_a", 201, 101, "worker-1", 1000, 5),
             ("lock_a", 301, 101, "CPU 0/KVM", 10, 2)],
            [("lock_a", 202, 101, "worker-2", 2000, 5),
             ("lock_b", 401, 102, "kworker/u8:1", 10**6, 1)],
            [("lock_a", 203, 101, "worker-3", 1000, 1)],
            [("lock_b", 302, 102, "CPU 1/KVM", 10**7, 3)],
            []]
    before = {}
    for step, waits in enumerate(plan):
        for lock, tid, tgid, comm, ns, n in waits:
            k.end(lock, tgid, ns, n=n)
            k.own(lock, tid, tgid, comm, ns, n=n)
        if step == 2:
            gone.update({201, 202})
            # a wait that began behind 201 ends after the read, before its entry's delete
            k.after_owner_read.append(lambda: k.own("lock_a", 201, 101, "worker-1", 7000))
        s.read()
        got = served(s.collector)
        owned = {lab: v for (m, lab), v in got.items()
                 if m == "kvmlockprof_lock_owner_waits_total"}
        for lab, v in before.items():
            assert owned.get(lab, -1) >= v, f"{dict(lab)} fell or ended at read {step + 1}"
        before = owned
        assert sum(owned.values()) == sum(n for _, n, _ in k.owned)
        assert sum(v for (m, _), v in got.items()
                   if m == "kvmlockprof_lock_owner_wait_seconds_total") == \
            pytest.approx(sum(ns for _, _, ns in k.owned) / 1e9)
    classes = {dict(lab)["owner"] for lab in owned}
    assert classes <= {"worker", "vcpu", "kworker", "other"} and len(classes - {"other"}) <= 2
    assert value(got, "kvmlockprof_lock_owner_waits_total", lock="lock_a",
                 owner="worker") == 12                 # worker-1, -2, -3: one class
    assert {t for _, t in k.owners} == {203, 301, 302, 401}      # 201, 202 gone: deleted


def test_top_deletes_exited_owners_from_the_kernel_and_keeps_the_heaviest(make_session,
                                                                         monkeypatch):
    """top --lock-owner, however long it runs: the entries of owner threads that exited
    are deleted from the kernel's map (it holds the live owners only), and top's
    owners since the start still show them: the heaviest GONE_OWNERS_KEPT, counted
    once across reads."""
    from kvmlockprof.views import top
    gone = set()
    monkeypatch.setattr(top, "threads_gone", lambda pairs: [t for _, t in pairs if t in gone])
    monkeypatch.setattr(top, "GONE_OWNERS_KEPT", 2)
    k = FakeKernel()
    k.owners = {}
    view = make_session(k)      # (top's LiveView under it: the method is top's)
    for tid, comm, ns, n in ((201, "worker-1", 1000, 5), (202, "worker-2", 7000, 1),
                             (203, "worker-3", 10, 1), (301, "CPU 0/KVM", 100, 1)):
        k.end("lock_a", 101, ns, n=n)
        k.own("lock_a", tid, 101, comm, ns, n=n)
    for step in range(3):
        view._read_contention({})
        if step == 1:
            gone.update({201, 202, 203})
        t = top.LiveView._owners_since_start(view)
        rows = {int(o): int(ns) for o, ns in zip(t["owner"], t["total_ns"])}
        if step == 0:
            assert rows == {201: 5000, 202: 7000, 203: 10, 301: 100}
        else:
            assert rows == {201: 5000, 202: 7000, 301: 100}, rows
            assert set(k.owners) == {(LOCKS["lock_a"], 301)}
            assert sorted(t["owner_comm"].astype(str)) == ["CPU 0/KVM", "worker-1", "worker-2"]
