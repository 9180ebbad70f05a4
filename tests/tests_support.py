"""Small recordings built in the test, in the exact layout `record` writes."""
import numpy as np

from kvmlockprof.recording import Writer, to_arrow

EVENT = np.dtype([("ts_ns", "<u8"), ("wait_ns", "<u8"), ("lock_addr", "<u8"), ("tid", "<u4"),
                  ("tgid", "<u4"), ("flags", "<u4"), ("stack_id", "<i4"), ("cpu", "<u4"),
                  ("ret", "<i4"), ("comm", "S16")])
AGG = np.dtype([("lock_addr", "<u8"), ("tgid", "<u4"), ("flags", "<u4"), ("stack_id", "<i4"),
                ("count", "<u8"), ("total_ns", "<u8"), ("max_ns", "<u8"), ("min_ns", "<u8"),
                ("hist", "<u8", (64,))])


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
        hist = np.zeros(64, np.uint64)
        for w in waits:
            hist[max(w.bit_length(), 1)] += 1       # bcc's bpf_log2l(w): floor(log2 w) + 1
        out[i] = (*k, len(waits), sum(waits), max(waits), min(waits), hist)
    return out


def small_recording(path, rows=None, in_progress=None):
    rows = rows or [(100, 0x1000, 7, 32, 1), (300, 0x1000, 7, 32, 1), (5000, 0x1000, 7, 32, 1),
                    (50, 0x2000, 8, 1, 2), (70, 0x2000, 8, 1, 2), (90, 0x2000, 8, 1, 2)]
    ev = events(rows)
    import pyarrow as pa
    w = Writer(path)
    w.append("contention", to_arrow(ev))
    w.append("stacks", pa.table({
        "stack_id": pa.array([1, 2], pa.int32()),
        "addrs": pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.uint64())),
        "frames": pa.array([["__mutex_lock+0x1", "kvm_vm_ioctl+0x10", "do_syscall_64+0x5"],
                            ["_raw_spin_lock+0x3", "futex_wake+0x1"]], pa.list_(pa.string())),
        "lock_frame": pa.array([[True, False, False], [True, False]], pa.list_(pa.bool_()))}))
    w.snapshot("aggregates", to_arrow(aggregates_of(ev)))
    if in_progress is not None:
        w.snapshot("in_progress", in_progress)
    n = len(rows)
    w.finalize({"format": "kvmlockprof-recording", "version": 1, "host": "test",
                "kernel_release": "test", "duration_s": 1.0, "samples": n,
                "counters": {"end": n, "end_without_begin": 0},
                "losses": {"lost_ringbuf_full": 0, "lost_agg_full": 0},
                "probes": {"contention": {"status": "attached", "method": "tracepoint"}}})
    return str(path)
