"""Live, at a real hypervisor's scale: the kernel memory our maps pin, by the
kernel's own view (bpftool), none of it growing with the number of CPUs; and
dozens of VMs, each a process, with every wait attributed to its own VM."""
import json
import os
import subprocess
import sys
import time

import pytest

import kvmlockprof
from conftest import assert_none_left, ends_counter, klp, kernel_objects, workload_argv
from kvmlockprof.analysis import locks as analysis
from kvmlockprof.probes.sources import KERNEL_MEM_MB

pytestmark = pytest.mark.live

BIG_HOST_CPUS = 256


def bpftool_maps():
    out = subprocess.run(["bpftool", "-j", "map", "show"], capture_output=True, text=True,
                         check=True).stdout
    return {m["id"]: m for m in json.loads(out or "[]")}


def test_map_memory_is_the_kernels_and_does_not_grow_with_cpus(live, tmp_path):
    """While record runs: the manifest's kernel_memory is, map by map, what bpftool
    says the kernel charges (memlock), within the limit; our maps hold no per-CPU
    hash, and the per-CPU arrays would take < 1 MB at 256 CPUs."""
    before = kernel_objects()
    out = tmp_path / "m.parquet"
    p = subprocess.Popen([sys.executable, "-m", "kvmlockprof", "record", "-q", "-o", str(out),
                          "--", *workload_argv("--duration", 6, "--churn")],
                         stderr=subprocess.PIPE, text=True)
    try:
        manifest = tmp_path / "m.parquet.partial" / "manifest.json"
        deadline = time.time() + 90
        while not manifest.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        ours = {i: m for i, m in bpftool_maps().items() if ("map", i) not in before}
        mem = json.loads(manifest.read_text())["kernel_memory"]
    finally:
        _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    # bpftool's names are cut at 15 characters (BPF_OBJ_NAME_LEN)
    kernel = sorted((m["name"], m["bytes_memlock"]) for m in ours.values())
    manifest_maps = sorted((name.split("/")[1][:15], b) for name, b in mem["maps"].items())
    # a hash made without preallocation (BPF_F_NO_PREALLOC: bpftool's flags bit 0) is
    # charged for its entries as they come and go (lock_kinds: filled by waits, emptied
    # by each read): the manifest has its charge at load, bpftool a later instant's
    grows = {m["name"] for m in ours.values() if m.get("flags", 0) & 1}
    assert [k for k in kernel if k[0] not in grows] == \
        [k for k in manifest_maps if k[0] not in grows]
    at_load = dict(manifest_maps)
    assert all(b >= at_load[n] for n, b in kernel if n in grows), (kernel, manifest_maps)
    assert mem["total"] == sum(at_load.values()) <= sum(b for _, b in kernel) and \
        mem["total"] <= KERNEL_MEM_MB << 20
    assert mem["possible_cpus"] >= os.cpu_count()
    per_cpu = [m for m in ours.values() if "percpu" in m["type"]]
    assert all(m["type"] == "percpu_array" for m in per_cpu), per_cpu
    per_cpu_bytes = sum(m["bytes_value"] * m["max_entries"] for m in per_cpu)
    assert per_cpu_bytes * BIG_HOST_CPUS < 1 << 20, per_cpu
    assert_none_left(before)


def test_record_refuses_past_the_memory_limit(live, tmp_path):
    """--kernel-mem-mb below what the maps take: one line that says what to do, a
    non-zero exit, no recording, nothing left in the kernel."""
    before = kernel_objects()
    out = tmp_path / "r.parquet"
    p = klp("record", "--kernel-mem-mb", 1, "-o", out, "--", "true", check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--kernel-mem-mb" in lines[0] and "MB" in lines[0], p.stderr
    assert not out.exists() and not (tmp_path / "r.parquet.partial").exists()
    assert_none_left(before)


def test_twenty_vms_each_named_with_their_own_waits(live, tmp_path):
    """20 VMs, a process each (workload --vms 20, named vm0..vm19): the recording
    names each by its own process, and the waits of each are, process by process,
    what an independent BPF program counted at lock:contention_end."""
    counter = ends_counter()
    out = tmp_path / "vms.parquet"
    try:
        klp("record", "-q", "-o", out, "--", *workload_argv(
            "--vms", 20, "--vcpus", 1, "--duration", 5, "--churn", "--churn-threads", 2,
            "--churn-rate", 100), timeout=300)
        ends = {k.value: v.value for k, v in counter["ends"].items()}
    finally:
        counter.cleanup()
    rec = kvmlockprof.load(out)
    vms = {v["pid"]: v["name"] for v in rec.manifest["work"]["vms"]}
    assert len(vms) == 20 and len(set(vms.values())) == 20
    by_vm = analysis.top(rec, by="process").set_index("tgid")
    assert set(vms) <= set(by_vm.index), by_vm
    assert by_vm.loc[list(vms), "vm"].to_dict() == vms
    for pid in vms:
        ours, theirs = int(by_vm.loc[pid, "contended"]), ends.get(pid, 0)
        assert theirs > 0 and abs(ours - theirs) <= max(2, 0.01 * theirs), (pid, ours, theirs)
    # a lock named after a VM's struct kvm is waited on by that VM's process only
    locks = analysis.top(rec, by="lock")
    named = locks[locks["lock"].str.match(r"kvm\(\d+\)->")]
    assert not named.empty
    assert (named["lock"].str.extract(r"kvm\((\d+)\)")[0].astype(int)
            == named["tgid"]).all(), named


def _rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), None)


def test_a_minute_of_recording_keeps_memory_and_files_flat(live, tmp_path):
    """60 s of a memslot-churn VM: record's resident memory (the kernel's count,
    /proc) stays flat after its start-up, and its chunk files are merged as they
    pile up (one a second otherwise); the recording has every wait."""
    from kvmlockprof.recording.store import COMPACT_CHUNKS
    out = tmp_path / "soak.parquet"
    p = subprocess.Popen([sys.executable, "-m", "kvmlockprof", "record", "-q", "-o", str(out),
                          "--", *workload_argv("--duration", 60, "--vcpus", 2, "--churn",
                                               "--churn-rate", 250)],
                         stderr=subprocess.PIPE, text=True)
    rss, files = [], []
    try:
        while p.poll() is None:
            time.sleep(1)
            try:
                kb, n = _rss_kb(p.pid), len(os.listdir(f"{out}.partial"))
            except OSError:
                continue
            if kb:                      # (None: exited, a zombie)
                rss.append(kb)
                files.append(n)
    finally:
        _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    settled, end = sorted(rss[15:25])[5], sorted(rss[-12:-2])[5]     # medians, in kB
    print(f"record RSS: {settled / 1024:.0f} MiB at 15-25 s, {end / 1024:.0f} MiB at the end; "
          f"at most {max(files)} files in .partial")
    assert end <= settled * 1.05 + 4096, rss
    assert max(files) <= 2 * COMPACT_CHUNKS + 10, files
    rec = kvmlockprof.load(out)
    c = rec.manifest["counters"]
    assert len(rec.samples) + c["lost_ringbuf_full"] == c["end"] - c["end_without_begin"] > 0
