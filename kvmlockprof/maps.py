"""Reading BPF maps into numpy, whole, with the layouts bcc parsed from the C."""
import numpy as np

from .bpfload import table_dtypes


def _reduce_per_cpu(vals):
    """One value from a per-CPU array of values: max_* fields by max, min_* by the
    smallest non-zero, everything else (counts, totals, histograms) by sum."""
    out = np.zeros(1, vals.dtype)[0]
    for name in vals.dtype.names:
        col = vals[name]
        if name.startswith("max"):
            out[name] = col.max(axis=0)
        elif name.startswith("min"):
            nz = col[col > 0]
            out[name] = nz.min() if nz.size else 0
        else:
            out[name] = col.sum(axis=0)
    return out


def _struct(dt, name):
    return dt if dt.names else np.dtype([(name, dt)])


def read_hash(table, key_name="key"):
    """A (per-CPU) hash map as one structured array: key fields, then value fields
    (per-CPU values reduced). Padding fields are dropped; a scalar key is `key_name`."""
    key_dt, val_dt = table_dtypes(table)
    key_dt, val_dt = _struct(key_dt, key_name), _struct(val_dt, "value")
    keys, vals = [], []
    for k, v in table.items():
        keys.append(bytes(k))
        arr = np.frombuffer(v, dtype=val_dt)
        vals.append(_reduce_per_cpu(arr) if len(arr) > 1 else arr[0])
    fields = [(n, key_dt.fields[n][0]) for n in key_dt.names if not n.startswith("pad")] + \
             [(n, val_dt.fields[n][0]) for n in val_dt.names if not n.startswith("pad")]
    out = np.zeros(len(keys), dtype=fields)
    if keys:
        karr = np.frombuffer(b"".join(keys), dtype=key_dt)
        varr = np.array(vals, dtype=val_dt)
        for n, _ in fields:
            out[n] = karr[n] if n in key_dt.names else varr[n]
    return out


def read_counters(table, names):
    """A per-CPU array of u64 counters, summed over CPUs, by name."""
    return {name: int(sum(table.getvalue(table.Key(i)))) for i, name in enumerate(names)}
