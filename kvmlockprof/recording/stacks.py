"""Kernel stacks from a BPF stack map, symbolised once, stored as a table."""
from kvmlockprof.lazy import np, pa, pc


def stacks_table(source, name, stack_ids, ksyms):
    """Symbolised kernel stacks of one BPF module (`name`), as an Arrow table."""
    rows = {"stack_id": [], "addrs": [], "frames": [], "lock_frame": []}
    for sid in stack_ids:
        try:
            addrs = source.stack_addrs(int(sid))
        except KeyError:
            continue
        rows["stack_id"].append(int(sid))
        rows["addrs"].append(addrs)
        rows["frames"].append(ksyms.frames(addrs))
        rows["lock_frame"].append(ksyms.is_lock_function(addrs).tolist())
    return pa.table({"source": pa.array([name] * len(rows["stack_id"]), pa.string()),
                     "stack_id": pa.array(rows["stack_id"], pa.int32()),
                     "addrs": pa.array(rows["addrs"], pa.list_(pa.uint64())),
                     "frames": pa.array(rows["frames"], pa.list_(pa.string())),
                     "lock_frame": pa.array(rows["lock_frame"], pa.list_(pa.bool_()))})


def new_stack_ids(seen, ids):
    """Stack ids not written yet (seen is updated)."""
    ids = [int(i) for i in pc.unique(pa.array(np.asarray(ids, dtype=np.int64))).to_numpy()
           if i >= 0 and i not in seen]
    seen.update(ids)
    return ids


def stack_ids_in(events, snapshots):
    """Every stack id mentioned by streamed events and snapshot tables."""
    ids = [np.asarray(a["stack_id"]) for a in events.values()
           if a.dtype.names and "stack_id" in a.dtype.names]
    ids += [t.column("stack_id").to_numpy() for t in snapshots.values()
            if "stack_id" in t.column_names]
    return np.concatenate(ids) if ids else np.empty(0, np.int64)
