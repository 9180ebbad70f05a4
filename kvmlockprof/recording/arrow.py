"""What BPF maps and ring buffers give (numpy structured arrays) as Arrow tables, the
recording's form: apart from the store, for the probes' loaders to convert their
reads without importing the file they are written to."""
from kvmlockprof.lazy import np, pa


def to_arrow(*arrs):
    """Numpy structured arrays of one length (a map's keys and values: their fields
    side by side) as one Arrow table, without a Python object per row.

    char[] fields become dictionary strings (few distinct values: comm),
    fixed-size numeric arrays become fixed-size lists (histograms)."""
    if len({len(a) for a in arrs}) > 1:
        raise ValueError(f"to_arrow: arrays of lengths {[len(a) for a in arrs]}")
    cols, names = [], []
    for arr, name in ((a, n) for a in arrs for n in a.dtype.names):
        if name.startswith("pad"):
            continue
        col = np.ascontiguousarray(arr[name])
        if col.dtype.kind == "S":
            if col.ndim > 1:                       # char[N] arrives as N x S1
                col = col.view(f"S{col.shape[1]}").reshape(-1)
            uniq, inv = np.unique(col, return_inverse=True)
            words = pa.array([u.split(b"\0", 1)[0].decode(errors="replace") for u in uniq],
                             pa.string())
            cols.append(pa.DictionaryArray.from_arrays(pa.array(inv.astype(np.int32)), words))
        elif col.ndim > 1:
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(col.reshape(-1)),
                                                          col.shape[1]))
        else:
            cols.append(pa.array(col))
        names.append(name)
    if len(set(names)) < len(names):
        raise ValueError(f"to_arrow: a field name twice in {names}")
    return pa.Table.from_arrays(cols, names=names)
