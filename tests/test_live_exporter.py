"""Live: `kvmlockprof exporter` scraped by a real Prometheus server (Debian's
`prometheus`, run by the test on 127.0.0.1 with a 1 s scrape) while the built-in
workload churns memslots under a parallel `kvmlockprof record`; PromQL through
Prometheus's HTTP API against what the recording measured, and against an
independent BPF count of the workload's contention_end."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import kvmlockprof
from conftest import (ROOT, assert_none_left, ends_counter, kernel_objects, klp,
                      workload_argv)
from kvmlockprof.analysis import locks as analysis
from promserver import Prometheus, free_port, get, wait_for

pytestmark = pytest.mark.live


def start_exporter(port, tmp_path, *args):
    err = tmp_path / "exporter.err"
    p = subprocess.Popen([sys.executable, "-m", "kvmlockprof", "exporter", "--listen",
                          f"127.0.0.1:{port}", *map(str, args)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=open(err, "w"))
    try:
        wait_for(lambda: "serving" in err.read_text() or p.poll() is not None, 180,
                 "the exporter to attach")
    except BaseException:
        stop(p)
        raise
    assert p.poll() is None, err.read_text()
    return p, err


def stop(p, sig=signal.SIGTERM):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


def test_prometheus_reads_slots_lock_as_record_measured(live, tmp_path):
    before = kernel_objects()
    eport = free_port()
    exporter, err = start_exporter(eport, tmp_path, "--interval", 1)
    prom = counter = None
    try:
        prom = Prometheus(f"127.0.0.1:{eport}", tmp_path)
        wait_for(lambda: prom.proc.poll() is None and get(f"{prom.url}/-/ready"), 60,
                 "Prometheus to be ready")
        wait_for(lambda: prom.value('up{job="kvmlockprof"}') == 1, 60,
                 "the first scrape of the exporter")
        vm = f"promvm{os.getpid()}"
        out = tmp_path / "rec.parquet"
        counter = ends_counter()
        # (through sh's exec: record's own command line must not carry the VM's
        # --name, or record itself would count as that VM)
        klp("record", "-o", out, "--", "sh", "-c", 'exec "$@"', "sh",
            *workload_argv("--duration", 4, "--vcpus", 2, "--churn", "--name", vm))
        ends = {k.value: v.value for k, v in counter["ends"].items()}
        sel = f'{{lock="kvm->slots_lock",vm="{vm}"}}'
        expr = f"sum(kvmlockprof_lock_waits_total{sel})"

        def settled():
            # the workload is gone: the counter stops moving once the exporter's next
            # read and Prometheus's next scrape have both seen its last waits
            a = prom.value(expr)
            time.sleep(3)
            b = prom.value(expr)
            return (a, b) if a is not None and a == b else None
        waits, _ = wait_for(settled, 60, "the slots_lock counter to settle")
        seconds = prom.value(f"sum(kvmlockprof_lock_wait_seconds_total{sel})")
        hist_count = prom.value(f"sum(kvmlockprof_lock_wait_duration_seconds_count{sel})")
        p99 = prom.value(f"histogram_quantile(0.99, sum by (le) "
                         f"(kvmlockprof_lock_wait_duration_seconds_bucket{sel}))")
        vm_waits = prom.value(f'sum(kvmlockprof_lock_waits_total{{vm="{vm}"}})')
        # the dashboard's every query runs on this Prometheus, over this data
        with open(os.path.join(ROOT, "contrib", "grafana-dashboard.json")) as f:
            dash = json.load(f)
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                e = t["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*") \
                    .replace("$job", ".*")
                prom.query(e)
        served = {ln.split("{")[0].split(" ")[0] for ln in
                  get(f"http://127.0.0.1:{eport}/metrics").splitlines()
                  if ln and not ln.startswith("#")}
        assert {"kvmlockprof_lock_waits_total", "kvmlockprof_lost_events_total",
                "kvmlockprof_probe_attached"} <= served
    finally:
        code = stop(exporter)
        if prom:
            prom.stop()
        if counter:
            counter.cleanup()
    assert code == 0, err.read_text()
    assert_none_left(before)        # every BPF object of the exporter detached

    rec = kvmlockprof.load(out)
    t = analysis.top(rec, by="lock")
    mine = t[t["lock"].astype(str).map(analysis.lock_class) == "kvm->slots_lock"]
    rec_waits, rec_ns = mine["contended"].sum(), mine["total_ns"].sum()
    dur = rec.manifest["duration_s"]
    print(f"kvm->slots_lock: Prometheus {waits:.0f} waits, {seconds:.4f} s "
          f"({waits / dur:.0f}/s), record {rec_waits} waits, {rec_ns / 1e9:.4f} s "
          f"({rec_waits / dur:.0f}/s); p99 <= {p99}; VM total {vm_waits:.0f}, "
          f"independent contention_end count {ends.get(rec.manifest['command_pid'])}")
    assert rec_waits > 1000, "the churn should contend kvm->slots_lock"
    assert abs(waits - rec_waits) <= 0.05 * rec_waits
    assert abs(seconds * 1e9 - rec_ns) <= 0.05 * rec_ns
    assert hist_count == waits
    # the VM's label also counts its helper kernel thread's waits (kvm-nx-lpage-recovery-
    # PID: processes.HELPER_COMM), which the count by tgid does not: a little more
    independent = ends.get(rec.manifest["command_pid"], 0)
    assert 0.995 * independent <= vm_waits <= 1.01 * independent, (vm_waits, independent)


def test_exporter_refuses_a_taken_port(live, tmp_path):
    before = kernel_objects()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        p = klp("exporter", "--listen", f"127.0.0.1:{s.getsockname()[1]}", check=False)
    assert p.returncode != 0
    assert re.fullmatch(r"kvmlockprof: cannot listen on 127\.0\.0\.1:\d+: .*\n", p.stderr)
    assert_none_left(before)


def test_exporter_stops_clean_on_sigint(live, tmp_path):
    before = kernel_objects()
    p, err = start_exporter(free_port(), tmp_path, "--interval", 1)
    assert kernel_objects() - before, "the exporter should have its probes loaded"
    assert stop(p, signal.SIGINT) == 0, err.read_text()
    assert_none_left(before)
