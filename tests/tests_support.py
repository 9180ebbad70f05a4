"""Small recordings built in the test, in the exact layout `record` writes."""
import numpy as np
import pyarrow as pa

from kvmlockprof import cdefs
from kvmlockprof.locktypes import LCB_F_MUTEX, LCB_F_SPIN
from kvmlockprof.recording.arrow import to_arrow
from kvmlockprof.recording.store import Writer

COMM_LEN = cdefs.define("contention.h", "KVMLP_COMM_LEN")
HIST_SLOTS = cdefs.define("kmaps.h", "KVMLP_HIST_SLOTS")
# bpf/contention.h's struct kvmlp_contention_event, and kvmlp_agg_key + kvmlp_agg_val
# (pad left out, as to_arrow leaves it), read from the C
EVENT = np.dtype(cdefs.struct_fields("contention.h", "kvmlp_contention_event"))
AGG = np.dtype([f for f in cdefs.struct_fields("contention.h", "kvmlp_agg_key") if f[0] != "pad"]
               + cdefs.struct_fields("contention.h", "kvmlp_agg_val"))


def events(rows):
    """rows: (wait_ns, lock_addr, tgid, flags, stack_id)"""
    a = np.zeros(len(rows), EVENT)
    for i, (w, lock, tgid, flags, sid) in enumerate(rows):
        a[i] = (1000 * i, w, lock, tgid, tgid, flags, sid, 0, 0, b"vcpu")
    return a


def aggregates_of(ev):
    """What the kernel side would have aggregated for these events."""
    keys = {}
    for e in ev:
        k = (int(e["lock_addr"]), int(e["tgid"]), int(e["flags"]), int(e["stack_id"]))
        keys.setdefault(k, []).append(int(e["wait_ns"]))
    out = np.zeros(len(keys), AGG)
    for i, (k, waits) in enumerate(keys.items()):
        hist = np.zeros(HIST_SLOTS, np.uint64)
        for w in waits:
            hist[max(w.bit_length(), 1)] += 1       # bcc's bpf_log2l(w): floor(log2 w) + 1
        out[i] = (*k, len(waits), sum(waits), max(waits), min(waits), hist)
    return out


ROWS = [(100, 0x1000, 7, LCB_F_MUTEX, 1), (300, 0x1000, 7, LCB_F_MUTEX, 1),
        (5000, 0x1000, 7, LCB_F_MUTEX, 1),
        (50, 0x2000, 8, LCB_F_SPIN, 2), (70, 0x2000, 8, LCB_F_SPIN, 2),
        (90, 0x2000, 8, LCB_F_SPIN, 2)]


def sample_stacks():
    import pyarrow as pa
    return pa.table({
        "stack_id": pa.array([1, 2], pa.int32()),
        "addrs": pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.uint64())),
        "frames": pa.array([["__mutex_lock+0x1", "kvm_vm_ioctl+0x10", "do_syscall_64+0x5"],
                            ["_raw_spin_lock+0x3", "futex_wake+0x1"]], pa.list_(pa.string())),
        "lock_frame": pa.array([[True, False, False], [True, False]], pa.list_(pa.bool_()))})


def sample_manifest(n, **kw):
    return dict({"format": "kvmlockprof-recording", "version": 1, "host": "test",
                 "kernel_release": "test", "duration_s": 1.0, "samples": n,
                 "counters": {"end": n, "end_without_begin": 0},
                 "losses": {"lost_ringbuf_full": 0, "lost_agg_full": 0},
                 "probes": {"contention": {"status": "attached", "method": "tracepoint"}}},
                **kw)


def small_recording(path, rows=None, in_progress=None):
    ev = events(rows or ROWS)
    w = Writer(path)
    w.append("contention", to_arrow(ev))
    w.append("stacks", sample_stacks())
    w.snapshot("aggregates", to_arrow(aggregates_of(ev)))
    if in_progress is not None:
        w.snapshot("in_progress", in_progress)
    w.finalize(sample_manifest(len(ev), **({"in_progress_min_ns": 10**9}
                                      if in_progress is not None else {})))
    return str(path)


def flush(w, ev, upto):
    """One of record's flushes: the samples ev[:upto] are written (the new ones
    appended, the aggregates replaced), then the manifest."""
    done = w.rows.get("contention", 0)
    w.append("contention", to_arrow(ev[done:upto]))
    if done == 0:
        w.append("stacks", sample_stacks())
    w.snapshot("aggregates", to_arrow(aggregates_of(ev[:upto])))
    w.manifest(sample_manifest(upto, duration_s=upto / len(ev), interrupted=True))


def partial_recording(path, rows=None, flushes=2):
    """The `.partial` directory a `record` killed after `flushes` flushes leaves
    (returned with its Writer)."""
    ev = events(rows or ROWS)
    w = Writer(path)
    for i in range(1, flushes + 1):
        flush(w, ev, len(ev) * i // (flushes + 1))
    return w.dir, w, ev


def rewrite(path, out, manifest=None, table=None):
    """A copy of a finished recording, row group by row group (the layout kept), with
    manifest(m) for its manifest and table(name, arrow table) for each table's rows."""
    import json
    import pyarrow.parquet as pq
    from kvmlockprof.recording.store import MANIFEST_KEY, as_union_rows
    pf = pq.ParquetFile(path)
    m = json.loads(pf.schema_arrow.metadata[MANIFEST_KEY])
    m = manifest(m) if manifest else m
    union = pf.schema_arrow.with_metadata({MANIFEST_KEY: json.dumps(m)})
    by_group = {g: name for name, groups in m.get("tables", {}).items() for g in groups}
    with pq.ParquetWriter(out, union) as w:
        for i in range(pf.metadata.num_row_groups):
            name = by_group[i]
            col = pf.read_row_group(i, columns=[name]).column(name).combine_chunks()
            t = pa.Table.from_arrays(col.flatten(), names=[f.name for f in col.type])
            if table:
                t = table(name, t)
            w.write_table(as_union_rows(name, t, union), row_group_size=max(1, t.num_rows))
    return str(out)
