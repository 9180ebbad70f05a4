"""The `contention` probe at run time: bpf/contention.bpf.c, loaded and read."""
import numpy as np
import pandas as pd
import pyarrow as pa

from .. import bpfload
from ..recording import to_arrow
from ..ringbuf import BatchRingBuffer

# Names of enum klp_counter in bpf/contention.h, in order.
COUNTERS = ("begin", "end", "end_without_begin", "lost_pending_full", "lost_agg_full",
            "lost_ringbuf_full", "stack_failures", "sampled")
LOSSES = ("lost_pending_full", "lost_agg_full", "lost_ringbuf_full", "stack_failures")


class ContentionProbe:
    name = "contention"

    def __init__(self, tgids=None, follow_fork=False, sample_every=1, ringbuf_mb=16,
                 agg_entries=16384, stack_entries=16384, pending_entries=16384):
        pages = max(1, ringbuf_mb * (1 << 20) // 4096)
        pages = 1 << (pages.bit_length() - 1)                  # a power of two
        self.defines = dict(
            KLP_FILTER_TGID=tgids is not None, KLP_FOLLOW_FORK=follow_fork,
            KLP_SAMPLE_EVERY=sample_every, KLP_PENDING_ENTRIES=pending_entries,
            KLP_AGG_ENTRIES=agg_entries, KLP_STACK_ENTRIES=stack_entries,
            KLP_RINGBUF_PAGES=pages, KLP_WAKEUP_EVERY=4096)
        self.bpf = bpfload.compile_bpf("contention.bpf.c", defines=self.defines)
        self.options = {"sample_every": sample_every, "ringbuf_bytes": pages * 4096,
                        "agg_entries": agg_entries, "stack_entries": stack_entries,
                        "follow_fork": follow_fork}
        if tgids is not None:
            self.add_tgids(tgids)
        events = self.bpf["events"]
        self.ring = BatchRingBuffer(events.map_fd, pages * 4096, bpfload.event_dtype(events))
        self.key_dtype, self.val_dtype = bpfload.table_dtypes(self.bpf["agg"])
        self.attached = {tp.decode() if isinstance(tp, bytes) else tp: "tracepoint"
                         for tp in self.bpf.tracepoint_fds}

    def add_tgids(self, tgids):
        t = self.bpf["tgid_filter"]
        for pid in tgids:
            t[t.Key(pid)] = t.Leaf(1)

    @property
    def event_dtype(self):
        return self.ring.dtype

    def wait(self, timeout):
        return self.ring.wait(timeout)

    def poll(self):
        """Samples streamed since the last poll (numpy structured array)."""
        return self.ring.consume()

    def counters(self):
        t = self.bpf["counters"]
        return {name: int(sum(t.getvalue(t.Key(i)))) for i, name in enumerate(COUNTERS)}

    def aggregates(self):
        """The in-kernel aggregates, summed over CPUs, as an Arrow table."""
        t = self.bpf["agg"]
        keys, vals = [], []
        for k, per_cpu in t.items():
            keys.append(bytes(k))
            v = np.frombuffer(per_cpu, dtype=self.val_dtype)
            nz = v["min_ns"][v["count"] > 0]
            vals.append((v["count"].sum(), v["total_ns"].sum(), v["max_ns"].max(),
                         nz.min() if nz.size else 0, v["hist"].sum(axis=0)))
        key_arr = np.frombuffer(b"".join(keys), dtype=self.key_dtype) if keys else \
            np.empty(0, self.key_dtype)
        out = np.empty(len(vals), dtype=np.dtype(
            [(n, self.key_dtype[n]) for n in self.key_dtype.names if not n.startswith("pad")] +
            [(n, self.val_dtype[n]) for n in self.val_dtype.names]))
        for n in self.key_dtype.names:
            if not n.startswith("pad"):
                out[n] = key_arr[n]
        for i, n in enumerate(self.val_dtype.names):
            out[n] = [v[i] for v in vals] if vals else []
        return to_arrow(out)

    def stack_addrs(self, stack_id):
        return list(self.bpf["stacks"].walk(stack_id))

    def detach(self):
        """Stop the probes firing; maps stay readable until close().

        Reverse attach order: contention_end goes before contention_begin, else
        each detach's RCU grace period (tens of ms) lets ends in with no begin."""
        for tp in reversed(list(self.bpf.tracepoint_fds)):
            self.bpf.detach_tracepoint(tp)
        self.attached = {}

    def close(self):
        self.ring.close()
        self.bpf.cleanup()


def stacks_table(probe, stack_ids, ksyms):
    """Symbolised kernel stacks for the given ids, as an Arrow table."""
    rows = {"stack_id": [], "addrs": [], "frames": [], "lock_frame": []}
    for sid in stack_ids:
        try:
            addrs = probe.stack_addrs(int(sid))
        except KeyError:
            continue
        rows["stack_id"].append(int(sid))
        rows["addrs"].append(addrs)
        rows["frames"].append(ksyms.frames(addrs))
        rows["lock_frame"].append(ksyms.is_lock_function(addrs).tolist())
    return pa.table({"stack_id": pa.array(rows["stack_id"], pa.int32()),
                     "addrs": pa.array(rows["addrs"], pa.list_(pa.uint64())),
                     "frames": pa.array(rows["frames"], pa.list_(pa.string())),
                     "lock_frame": pa.array(rows["lock_frame"], pa.list_(pa.bool_()))})


def samples_table(events):
    return to_arrow(events)


def new_stack_ids(seen, *id_arrays):
    ids = pd.unique(np.concatenate([np.asarray(a, dtype=np.int64) for a in id_arrays]))
    ids = [int(i) for i in ids if i >= 0 and i not in seen]
    seen.update(ids)
    return ids
