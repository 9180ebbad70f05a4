"""Reading BPF maps into numpy, whole, with the layouts bcc parsed from the C."""
import ctypes as ct
import errno

import numpy as np

from kvmlockprof.kernel.bpfload import table_dtypes

BATCH = 1024            # entries per BPF_MAP_LOOKUP_BATCH call (more than any hash bucket)
ENOTSUPP = 524          # the kernel's own "not supported" (not in Python's errno module)


def lookup_batch(table, key_dt, leaf_dt):
    """(keys, values) of every entry, BATCH entries per syscall (the kernel's
    BPF_MAP_LOOKUP_BATCH, through libbcc), or None where the kernel lacks it."""
    from bcc.libbcc import lib
    keys, vals = np.empty(BATCH, key_dt), np.empty(BATCH, leaf_dt)
    token, count = ct.c_uint32(0), ct.c_uint32(0)
    out_k, out_v = [], []
    while True:
        count.value = BATCH
        res = lib.bpf_lookup_batch(table.map_fd, ct.byref(token) if out_k else None,
                                   ct.byref(token), keys.ctypes.data, vals.ctypes.data,
                                   ct.byref(count))
        err = ct.get_errno()
        out_k.append(keys[:count.value].copy())
        out_v.append(vals[:count.value].copy())
        if res == 0:
            continue
        if err == errno.ENOENT:              # the end of the map
            return np.concatenate(out_k), np.concatenate(out_v)
        if len(out_k) == 1 and err in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP):
            return None                     # kernels before 5.6
        raise OSError(err, f"reading a BPF map: {errno.errorcode.get(err, err)}")


def _lookup_items(table, key_dt, leaf_dt):
    """(keys, values) one key at a time (bcc's items()): the fallback."""
    keys, vals = [], []
    for k, v in table.items():
        keys.append(bytes(k))
        vals.append(bytes(v))
    return (np.frombuffer(b"".join(keys), key_dt), np.frombuffer(b"".join(vals), leaf_dt)) \
        if keys else (np.empty(0, key_dt), np.empty(0, leaf_dt))


def _struct(dt, name):
    return dt if dt.names else np.dtype([(name, dt)])


def read_hash(table, key_name="key"):
    """A hash map as one structured array: key fields, then value fields. Padding
    fields are dropped; a scalar key is `key_name`. (No per-CPU hashes: see
    bpf/kmaps.h.)"""
    key_dt, val_dt = table_dtypes(table)
    key_dt, val_dt = _struct(key_dt, key_name), _struct(val_dt, "value")
    assert not np.dtype(table.Leaf).subdtype, "per-CPU hash"
    karr, varr = lookup_batch(table, key_dt, val_dt) or _lookup_items(table, key_dt, val_dt)
    fields = [(n, key_dt.fields[n][0]) for n in key_dt.names if not n.startswith("pad")] + \
             [(n, val_dt.fields[n][0]) for n in val_dt.names if not n.startswith("pad")]
    out = np.zeros(len(karr), dtype=fields)
    for n, _ in fields:
        out[n] = karr[n] if n in key_dt.names else varr[n]
    return out


def read_counters(table, names):
    """A per-CPU array of u64 counters, summed over CPUs, by name."""
    return {name: int(sum(table.getvalue(table.Key(i)))) for i, name in enumerate(names)}
