"""Flush cost and kernel memory of the contention aggregates: the shared hash record
uses against the per-CPU hash it used before, side by side, at K active keys.

Both maps hold the same K keys (filled from user space, every value changed before each
flush, the worst case); a flush is what record does every second with them: read the map
(BPF_MAP_LOOKUP_BATCH), make the Arrow table, write the Parquet snapshot when record's
Snapshots policy says so, and the manifest. CPU is this process's (user + system) per
flush, so the share of one CPU at one flush a second. Memory is the kernel's (memlock).
In the lab's 6.1 kernel with --possible-cpus 256, a big host's per-CPU sizes (the old
layout at -M 4096 there: 16384 entries would take 2.3 GB):
    kvmlockprof lab --kernel /boot/vmlinuz-6.1.0-56-amd64 --possible-cpus 256 --memory 3G \
        -- python bench/flush_cost.py -M 4096
"""
import argparse
import os
import tempfile
import time

import numpy as np

from kvmlockprof.kernel import bpfload, bpfstats, maps
from kvmlockprof.probes.contention import ContentionOptions, ContentionProbe
from kvmlockprof.kernel.host import possible_cpus
from kvmlockprof.recording.recorder import SNAPSHOT_S, Snapshots
from kvmlockprof.recording.arrow import to_arrow
from kvmlockprof.recording.store import Writer

from results_io import RESULTS, save      # bench/ is on sys.path when run as a script

# The layout record used until 2026-11-23: one value per possible CPU per entry.
PER_CPU = r"""
#include "contention.h"
BPF_PERCPU_HASH(agg, struct kvmlp_agg_key, struct kvmlp_agg_val, ENTRIES);
"""


def fill(table, keys, cpus=None, round_=1):
    """Put `keys` in the map, each value's count etc. set to round_ (all CPUs')."""
    n = len(keys)
    k = (table.Key * n)()
    v = (table.Leaf * n)()
    for i, addr in enumerate(keys):
        k[i].lock_addr, k[i].tgid, k[i].flags, k[i].stack_id = addr, 1, 1, -1000
        for val in (v[i] if cpus else [v[i]]):
            val.count, val.total_ns, val.max_ns, val.min_ns = round_, 1000 * round_, 900, 100
            val.hist[11] = round_
    table.items_update_batch(k, v)


def per_cpu_snapshot(table):
    """Old flush: every CPU's copy read, then reduced (sum; max by max)."""
    key_dt, val_dt = bpfload.table_dtypes(table)
    leaf_dt = np.dtype((val_dt, np.dtype(table.Leaf).shape))
    karr, varr = maps.lookup_batch(table, key_dt, leaf_dt)
    red = {n: (varr[n].max(axis=1) if n.startswith("max") else varr[n].sum(axis=1))
           for n in val_dt.names}
    out = np.zeros(len(karr), [(n, key_dt.fields[n][0]) for n in key_dt.names] +
                   [(n, val_dt.fields[n][0]) for n in val_dt.names])
    for n in key_dt.names:
        out[n] = karr[n]
    for n, col in red.items():
        out[n] = col
    return to_arrow(out)


def measure(snapshot, table, keys, cycles, cpus, outdir, every_s):
    """CPU seconds per flush, a flush a second, as record's Snapshots rewrites the
    table (every_s 0: at every flush, as before)."""
    snaps = Snapshots(Writer(os.path.join(outdir, "r.parquet")), every_s)
    snaps.put("aggregates", snapshot(), -1.0)           # the first, outside the window
    cpu = 0.0
    for r in range(cycles):
        fill(table, keys, cpus, r + 2)              # every value changed (not timed)
        t0 = time.process_time()
        snaps.put("aggregates", snapshot(), float(r))
        snaps.writer.manifest({"round": r})
        cpu += time.process_time() - t0
    return cpu / cycles


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("-M", "--entries", type=int, default=16384, help="-M of both maps")
    ap.add_argument("--cycles", type=int, default=15)
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "flush-cost.json"))
    a = ap.parse_args()
    ncpu = possible_cpus()
    a.keys = min(a.keys, a.entries * 3 // 4)           # a full hash refuses the rest
    keys = [0xffff888100000000 + 64 * i for i in range(a.keys)]
    probe = ContentionProbe(ContentionOptions(map_entries=a.entries, stack_budget=0),
                            tgids=[])
    old = bpfload.compile_bpf(text=PER_CPU, defines={"ENTRIES": a.entries})
    res = {"possible_cpus": ncpu, "keys": a.keys, "entries": a.entries}
    try:
        with tempfile.TemporaryDirectory() as d:
            new_mem = bpfstats.map_memory(probe.bpf)
            # as ContentionProbe.snapshots() reads it once a wait has ended (the
            # fill here counts no wait: called directly)
            shared = lambda: to_arrow(*maps.read_hash_parts(probe.bpf["agg"]))  # noqa: E731
            res["shared"] = {
                "flush_cpu_s": measure(shared, probe.bpf["agg"], keys, a.cycles, None,
                                       os.path.join(d, "new"), SNAPSHOT_S),
                "flush_cpu_s_every_flush": measure(shared, probe.bpf["agg"], keys, a.cycles,
                                                   None, os.path.join(d, "new1"), 0),
                "agg_bytes": new_mem["agg"], "probe_bytes": sum(new_mem.values())}
            res["per_cpu"] = {
                "flush_cpu_s": measure(lambda: per_cpu_snapshot(old["agg"]), old["agg"],
                                       keys, a.cycles, ncpu, os.path.join(d, "old"), 0),
                "agg_bytes": bpfstats.map_memory(old)["agg"]}
    finally:
        probe.close()
    s, o = res["shared"], res["per_cpu"]
    print(f"{ncpu} possible CPUs, {a.keys} keys changed before every flush, -M {a.entries}")
    print(f"  aggregates map: shared {s['agg_bytes'] / 2**20:.1f} MB, per-CPU "
          f"{o['agg_bytes'] / 2**20:.1f} MB (x{o['agg_bytes'] / s['agg_bytes']:.1f}); the "
          f"whole contention probe now {s['probe_bytes'] / 2**20:.1f} MB")
    print(f"  record CPU, a flush a second: now {100 * s['flush_cpu_s']:.2f}% of a CPU "
          f"(snapshot rewritten every {SNAPSHOT_S:.0f} s; "
          f"{100 * s['flush_cpu_s_every_flush']:.2f}% rewriting it every flush), before "
          f"(per-CPU map, every flush) {100 * o['flush_cpu_s']:.2f}% "
          f"(x{o['flush_cpu_s'] / s['flush_cpu_s']:.1f})")
    save(res, a.output)


if __name__ == "__main__":
    main()
