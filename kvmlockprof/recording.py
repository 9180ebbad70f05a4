"""The recording file: one Parquet file, written so that a crash loses little.

While recording, flushed data goes into `<out>.partial/`: one complete Parquet
file per table and flush, a snapshot of the in-kernel aggregates and a
manifest.json, each replaced atomically. A kill -9 leaves that directory,
which `load()` reads as an interrupted recording. At the end the chunks are
merged into `<out>` (written beside it, then renamed).

The finished file holds several tables in one schema: a `table` column names
the table of each row group, and each table's columns live in a struct column
of the same name (`contention`, `aggregates`, `stacks`, ...). The manifest
(JSON) is in the file's key-value metadata under `kvmlockprof.manifest`.
"""
import glob
import json
import os
import shutil
import tempfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "kvmlockprof-recording"
VERSION = 1
MANIFEST_KEY = b"kvmlockprof.manifest"
SNAPSHOT_TABLES = ("aggregates",)     # rewritten whole at every flush, not appended


class RecordingError(Exception):
    """A recording cannot be read or written; str() is the one-line reason."""


def partial_dir(path):
    return str(path) + ".partial"


def check_output(path, force):
    """Refuse to clobber a recording (or an interrupted one) without --force."""
    if os.path.isdir(path):
        raise RecordingError(f"{path} is a directory: give a file name with -o")
    if os.path.exists(path) and not force:
        raise RecordingError(f"{path} exists: use --force to overwrite it, or -o another file")
    if os.path.exists(partial_dir(path)) and not force:
        raise RecordingError(f"{partial_dir(path)} holds an interrupted recording: "
                             f"read it with `kvmlockprof report {path}`, or use --force")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.access(parent, os.W_OK):
        raise RecordingError(f"cannot write in {parent}: choose another -o")


# --- numpy -> arrow ----------------------------------------------------------------

def to_arrow(arr):
    """A numpy structured array as an Arrow table, without a Python object per row.

    char[] fields become dictionary strings (few distinct values: comm),
    fixed-size numeric arrays become fixed-size lists (histograms)."""
    cols, names = [], []
    for name in arr.dtype.names:
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
    return pa.Table.from_arrays(cols, names=names)


def _atomic(path, write):
    """write(tmp) then rename over path: readers see the old file or the new one,
    and a failed write (a full disk) leaves the old one and no debris."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_write_parquet(table, path):
    _atomic(path, lambda tmp: pq.write_table(table, tmp))


def _write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_json(obj, path):
    _atomic(path, lambda tmp: _write_json(obj, tmp))


class Writer:
    """Appends chunks to `<out>.partial/`, then finalize() makes `<out>`."""

    def __init__(self, out):
        self.out = str(out)
        self.dir = partial_dir(out)
        if os.path.exists(self.dir):          # check_output() allowed it: --force
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        self.seq = {}
        self.rows = {}

    def append(self, table_name, table):
        if table is None or table.num_rows == 0:
            return
        n = self.seq.get(table_name, 0) + 1
        self.seq[table_name] = n
        self.rows[table_name] = self.rows.get(table_name, 0) + table.num_rows
        _atomic_write_parquet(table, os.path.join(self.dir, f"{table_name}-{n:06d}.parquet"))

    def snapshot(self, table_name, table):
        _atomic_write_parquet(table, os.path.join(self.dir, f"{table_name}.parquet"))
        self.rows[table_name] = table.num_rows

    def manifest(self, manifest):
        _atomic_write_json(manifest, os.path.join(self.dir, "manifest.json"))

    def finalize(self, manifest):
        """Merge the chunks into one Parquet file at `out`, atomically."""
        parts = _partial_tables(self.dir)
        schemas = {name: pq.read_schema(files[0]) for name, files in parts.items()}
        union = pa.schema([("table", pa.string())] +
                          [(name, pa.struct(list(s))) for name, s in schemas.items()])
        layout, rg = {}, 0
        for name, files in parts.items():
            for f in files:
                layout.setdefault(name, []).extend(
                    range(rg, rg + pq.ParquetFile(f).metadata.num_row_groups))
                rg += pq.ParquetFile(f).metadata.num_row_groups
        manifest = dict(manifest, tables=layout, format=FORMAT, version=VERSION)
        union = union.with_metadata({MANIFEST_KEY: json.dumps(manifest, default=str)})
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.out) + ".",
                                   dir=os.path.dirname(os.path.abspath(self.out)))
        os.close(fd)
        try:
            with pq.ParquetWriter(tmp, union, compression="zstd") as w:
                for name, files in parts.items():
                    for f in files:
                        for i in range(pq.ParquetFile(f).metadata.num_row_groups):
                            t = pq.ParquetFile(f).read_row_group(i)
                            w.write_table(_as_union_rows(name, t, union),
                                          row_group_size=max(1, t.num_rows))
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.out)
        except BaseException:
            os.unlink(tmp)
            raise
        shutil.rmtree(self.dir)
        return manifest


def _as_union_rows(name, table, union):
    n = table.num_rows
    cols = [pa.array([name] * n, pa.string())]
    for field in union:
        if field.name == "table":
            continue
        if field.name == name:
            cols.append(pa.StructArray.from_arrays([c.combine_chunks() for c in table.columns],
                                                   fields=list(field.type)))
        else:
            cols.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(cols, schema=union.remove_metadata())


def _partial_tables(d):
    """{table: [files in order]} of a .partial directory."""
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.parquet"))):
        base = os.path.basename(f)[:-len(".parquet")]
        name = base.rsplit("-", 1)[0] if "-" in base else base
        out.setdefault(name, []).append(f)
    return out


# --- reading --------------------------------------------------------------------------

class Recording:
    """A loaded recording: the manifest and one DataFrame per table."""

    def __init__(self, path, manifest, tables, interrupted=False):
        self.path = path
        self.manifest = manifest
        self._tables = tables           # name -> callable returning an Arrow table
        self._cache = {}
        self.interrupted = interrupted

    @classmethod
    def from_frames(cls, path, manifest, frames):
        """A recording held in memory ({table: DataFrame}): `top`'s live view."""
        rec = cls(path, manifest, {name: None for name in frames})
        rec._cache.update(frames)
        return rec

    def derived(self, key, compute):
        """compute(), once per recording: analyses built on the tables (annotated
        copies, symbolised stacks) are shared by every view of one report."""
        key = ("derived", key)
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def table_names(self):
        return list(self._tables)

    def has_derived(self, key):
        return ("derived", key) in self._cache

    def table(self, name, columns=None):
        """The named table as a DataFrame (empty if the recording has none).
        columns: only these, read alone from the file (a report of 10 M samples
        needs 6 of their 10 columns), unless the whole table is loaded already."""
        if name in self._cache:
            df = self._cache[name]
            return df if columns is None or df.empty else df[list(columns)]
        if name not in self._tables:
            return pd.DataFrame()
        key = name if columns is None else (name, tuple(columns))
        if columns is not None:             # a projection read already that has them
            for k, df in self._cache.items():
                if isinstance(k, tuple) and k[0] == name and set(columns) <= set(k[1]):
                    return df[list(columns)]
        if key not in self._cache:
            try:
                t = _check_table(self.path, name, self._tables[name](columns), columns)
                self._cache[key] = t.to_pandas(split_blocks=True, self_destruct=True)
            except (pa.ArrowException, OSError, KeyError, ValueError, TypeError,
                    IndexError, AttributeError) as e:
                raise RecordingError(f"{self.path}: table {name!r} is corrupt "
                                     f"({_first_line(e)})") from None
        return self._cache[key]

    @property
    def samples(self):
        return self.table("contention")

    @property
    def aggregates(self):
        return self.table("aggregates")

    @property
    def stacks(self):
        return self.table("stacks")


def _first_line(e):
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


# The columns each table must have for the analyses (and their kind: "n" numeric,
# "s" strings, "l" lists); a damaged file that lacks them is refused when read.
COLUMNS = {
    "contention": {"ts_ns": "n", "wait_ns": "n", "lock_addr": "n", "tid": "n", "tgid": "n",
                   "flags": "n", "stack_id": "n", "comm": "s"},
    "aggregates": {"lock_addr": "n", "tgid": "n", "flags": "n", "stack_id": "n", "count": "n",
                   "total_ns": "n", "max_ns": "n", "min_ns": "n", "hist": "l"},
    "stacks": {"stack_id": "n", "frames": "l", "lock_frame": "l"},
    "xen_evtchn": {"tgid": "n", "kvm": "n", "ret": "n", "slow": "n"},
    "gpc_ops": {"tgid": "n", "kvm": "n", "gpc": "n", "place": "n", "op": "n", "count": "n"},
    "gpc_refresh": {"tgid": "n", "kvm": "n", "gpc": "n", "place": "n", "ret": "n",
                    "lat_ns": "n"},
    "srcu_sections": {"ssp": "n", "kvm": "n", "kind": "n", "count": "n", "total_ns": "n",
                      "max_ns": "n", "hist": "l"},
    "srcu_sync": {"type": "n", "kind": "n", "ssp": "n", "dur_ns": "n", "stack_id": "n"},
    "xa_erase_agg": {"owner": "n", "kvm": "n", "stack_id": "n", "count": "n", "total_ns": "n",
                     "max_ns": "n"},
    "vgic": {"tgid": "n", "kvm": "n", "intid": "n", "refcount": "n", "irqs_off": "n",
             "lat_ns": "n"},
    "vms": {"kvm": "n", "tgid": "n"},
    "in_progress": {"tid": "n", "tgid": "n", "lock_addr": "n", "flags": "n", "stack_id": "n",
                    "age_ns": "n"},
    "vcpus": {"vcpu": "n", "kvm": "n", "tgid": "n", "vcpu_idx": "n"},
}
_KIND = {"n": pa.types.is_integer, "s": lambda t: pa.types.is_string(t) or (
    pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)),
    "l": lambda t: pa.types.is_list(t) or pa.types.is_fixed_size_list(t)}

# Manifest fields the analyses read, and the JSON types they must have.
_NUMBER = (int, float)
MANIFEST_TYPES = {"duration_s": _NUMBER, "start_monotonic_ns": int, "samples": int,
                  "counters": dict, "losses": dict, "probes": dict, "lock_symbols": dict,
                  "lock_names": dict, "processes": dict, "work": dict, "tables": dict,
                  "probe_counters": dict}


def _check_table(path, name, table, columns=None):
    for col, kind in COLUMNS.get(name, {}).items():
        if columns is not None and col not in columns:
            continue
        if col not in table.column_names:
            raise RecordingError(f"{path}: table {name!r} lacks column {col!r}: the file is "
                                 "damaged or not from this kvmlockprof")
        if not _KIND[kind](table.schema.field(col).type):
            raise RecordingError(f"{path}: column {name}.{col} has type "
                                 f"{table.schema.field(col).type}: the file is damaged")
        if table.column(col).null_count:        # record never writes a missing value
            raise RecordingError(f"{path}: column {name}.{col} has missing values: the "
                                 "file is damaged")
    return table


def _check_manifest(path, manifest):
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RecordingError(f"{path} is not a kvmlockprof recording (no manifest): "
                             "record one with `kvmlockprof record`")
    if manifest.get("version") != VERSION:
        raise RecordingError(f"{path} is recording format version {manifest.get('version')}, "
                             f"this kvmlockprof reads version {VERSION}: upgrade kvmlockprof")
    for key, types in MANIFEST_TYPES.items():
        if key in manifest and manifest[key] is None:
            del manifest[key]                   # null reads as absent
        v = manifest.get(key)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            raise RecordingError(f"{path}: the manifest's {key!r} is malformed: the file is "
                                 "damaged")
    for key in ("counters", "losses"):
        if any(not isinstance(v, int) for v in (manifest.get(key) or {}).values()):
            raise RecordingError(f"{path}: the manifest's {key!r} is malformed")
    for key in ("probes", "processes", "lock_names"):
        if any(not isinstance(v, dict) for v in (manifest.get(key) or {}).values()):
            raise RecordingError(f"{path}: the manifest's {key!r} is malformed")
    if any(not isinstance(v, dict) or not isinstance(v.get("name"), str)
           for v in (manifest.get("lock_names") or {}).values()) or \
            any(not isinstance(v, str) for v in (manifest.get("lock_symbols") or {}).values()):
        raise RecordingError(f"{path}: the manifest's lock names are malformed")
    return manifest


def load(path):
    """Read a recording (or the `.partial` directory a killed `record` left)."""
    path = str(path)
    if not os.path.exists(path) and os.path.isdir(partial_dir(path)):
        path = partial_dir(path)
    if os.path.isdir(path):
        return _load_partial(path)
    if not os.path.exists(path):
        raise RecordingError(f"{path} does not exist: record one with `kvmlockprof record`")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4))
        tail = f.read(4)
    if head != b"PAR1":
        raise RecordingError(f"{path} is not a Parquet file: give a recording made by "
                             "`kvmlockprof record`")
    if tail != b"PAR1":
        raise RecordingError(f"{path} is truncated (no Parquet footer): if `record` was "
                             f"killed, read {partial_dir(path)} instead")
    try:
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
    except (pa.ArrowException, OSError, ValueError) as e:
        raise RecordingError(f"{path} is a corrupt Parquet file ({_first_line(e)})") from None
    if MANIFEST_KEY not in meta:
        raise RecordingError(f"{path} is a Parquet file but not a kvmlockprof recording "
                             "(no manifest): record one with `kvmlockprof record`")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except ValueError:
        raise RecordingError(f"{path}: the recording's manifest is corrupt") from None
    _check_manifest(path, manifest)
    layout = manifest.get("tables") or {}
    if any(not isinstance(g, list) or not all(isinstance(i, int) and
                                              0 <= i < pf.metadata.num_row_groups for i in g)
           for g in layout.values()):
        raise RecordingError(f"{path}: the manifest's table layout does not match the file: "
                             "the file is damaged")
    names = set(pf.schema_arrow.names)

    def reader(name, groups):
        # Row group by row group: Arrow cannot read a struct with a dictionary
        # child (comm) into one chunked column.
        return lambda columns=None: pa.concat_tables(
            [_flatten(pf.read_row_group(i, columns=[f"{name}.{c}" for c in columns]
                                        if columns else [name]), name) for i in groups])
    tables = {n: reader(n, g) for n, g in layout.items() if n in names}
    return Recording(path, manifest, tables)


def _flatten(table, name):
    """The struct column's fields as columns, without copying: rows of a table's own
    row groups are never null, so field(i) is the data (flatten() would copy to
    merge the struct's nulls in)."""
    col = table.column(name)
    names = [f.name for f in col.type]
    return pa.Table.from_arrays([pa.chunked_array([ch.field(i) for ch in col.chunks],
                                                  type=col.type.field(i).type)
                                 for i in range(len(names))], names=names)


def _load_partial(d):
    mpath = os.path.join(d, "manifest.json")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        raise RecordingError(f"{d} has no readable manifest.json: it is not an interrupted "
                             "kvmlockprof recording") from None
    _check_manifest(d, manifest)
    parts = _partial_tables(d)

    def reader(files):
        return lambda columns=None: pa.concat_tables(
            [pq.read_table(f, columns=list(columns) if columns else None) for f in files])
    return Recording(d, manifest, {n: reader(fs) for n, fs in parts.items()},
                     interrupted=True)
