"""Reading BPF maps into numpy, whole, with the layouts bcc parsed from the C."""
import ctypes as ct
import errno

from kvmlockprof.kernel import handles
from kvmlockprof.kernel.bpfload import table_dtypes
from kvmlockprof.lazy import np

BATCH = 4096            # entries per BPF_MAP_LOOKUP_BATCH call (more than any hash bucket)
ENOTSUPP = 524          # the kernel's own "not supported" (not in Python's errno module)


def lookup_batch(table, key_dt, leaf_dt):
    """(keys, values) of every entry, BATCH entries per syscall (the kernel's
    BPF_MAP_LOOKUP_BATCH, through libbpf), or None where the kernel lacks it. The
    kernel writes into the arrays returned (sized for the whole map and one batch
    more, so that a call always has room for BATCH: a hash bucket that does not fit is
    ENOSPC; pages never written are never touched): no copy of a batch."""
    if (key_dt.itemsize, leaf_dt.itemsize) != (ct.sizeof(table.Key), ct.sizeof(table.Leaf)):
        raise ValueError(f"lookup_batch: {key_dt}/{leaf_dt} are not the map's key and value")
    cap = int(getattr(table, "max_entries", 0) or 0) + BATCH
    keys, vals = np.empty(cap, key_dt), np.empty(cap, leaf_dt)
    token, count = ct.c_uint32(0), ct.c_uint32(0)
    n, first = 0, True
    while True:
        if cap - n < BATCH:                 # (a map larger than it said)
            keys, vals = _grow(keys), _grow(vals)
            cap = len(keys)
        count.value = BATCH
        res = handles.lib().bpf_map_lookup_batch(
            table.map_fd, None if first else ct.byref(token), ct.byref(token),
            keys.ctypes.data + n * key_dt.itemsize, vals.ctypes.data + n * leaf_dt.itemsize,
            ct.byref(count), None)
        err = ct.get_errno()
        n, first = n + count.value, False
        if res == 0:
            continue
        if err == errno.ENOENT:              # the end of the map
            return keys[:n], vals[:n]
        if n == 0 and err in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP):
            return None                     # kernels before 5.6
        raise OSError(err, f"reading a BPF map: {errno.errorcode.get(err, err)}")


def _grow(arr):
    out = np.empty((2 * len(arr),) + arr.shape[1:], arr.dtype)
    out[:len(arr)] = arr
    return out


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


def read_hash_parts(table, key_name="key"):
    """A hash map as two structured arrays of one length: its keys, its values (a
    scalar key is the field `key_name`, a scalar value `value`). (No per-CPU hashes:
    see bpf/kmaps.h.)"""
    key_dt, val_dt = table_dtypes(table)
    if np.dtype(table.Leaf).subdtype:       # (the kernel would write ncpus values a key)
        raise ValueError("read_hash_parts: a per-CPU hash")
    key_dt, val_dt = _struct(key_dt, key_name), _struct(val_dt, "value")
    return lookup_batch(table, key_dt, val_dt) or _lookup_items(table, key_dt, val_dt)


def read_hash(table, key_name="key"):
    """A hash map as one structured array: key fields, then value fields, padding
    dropped (for Arrow, to_arrow(*read_hash_parts(...)) saves this merge's copy)."""
    karr, varr = read_hash_parts(table, key_name)
    fields = [(n, karr.dtype.fields[n][0]) for n in karr.dtype.names if not n.startswith("pad")] + \
             [(n, varr.dtype.fields[n][0]) for n in varr.dtype.names if not n.startswith("pad")]
    out = np.zeros(len(karr), dtype=fields)
    for n, _ in fields:
        out[n] = karr[n] if n in karr.dtype.names else varr[n]
    return out


def read_counters(table, names):
    """A per-CPU array of u64 counters, summed over CPUs, by name."""
    return {name: int(sum(table.getvalue(table.Key(i)))) for i, name in enumerate(names)}
