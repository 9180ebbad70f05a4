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

From format version 2 the manifest carries `integrity`: each table's row count and
a checksum of each of its columns' values, and a checksum of the manifest itself;
reading a table checks them, so a damaged file is refused instead of giving other
numbers. Version 1 files (without it) are read unchecked.
"""
import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile

from kvmlockprof.lazy import np, pa, pc, pd, pq

FORMAT = "kvmlockprof-recording"
VERSION = 3                 # 2: the manifest has `integrity` (a version 2 file lacking it
READABLE = (1, 2, 3)        # is damaged); version 1 files are read unchecked; 3: the
                            # manifest's fixed_size_lists (see Writer.finalize)
MANIFEST_KEY = b"kvmlockprof.manifest"
# An appended table's chunks (one a flush, a second) are merged into one file once
# there are this many, and so on up, a level at a time (see Writer._compact).
COMPACT_CHUNKS = 30
# Rows a merged file's row group holds at most (consecutive chunks' rows together):
# few row groups to read back, and the memory of a merge or of finalize bounded (~5 MB).
MERGE_ROWS = 1 << 16


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


# --- integrity ------------------------------------------------------------------------
# sha256 (hashlib; 1.8 GB/s with SHA-NI) of each column's decoded values: it checks
# what the analyses get whatever part of the file is damaged (pages, footer, schema),
# and per column, so a projected read checks only the columns it reads.

class ColumnDigest:
    """sha256 of a column's values and types in a form independent of how Arrow
    holds them (chunks, a dictionary's order, list offsets), fed chunk by chunk. Each
    kind of data (values of one type, list lengths, null positions) is a stream
    hashed on its own, so that chunk boundaries do not change the digest."""

    def __init__(self):
        self.streams = {}
        self.seen = {}              # elements fed so far, per nesting level

    def _feed(self, name, data):
        self.streams.setdefault(name, hashlib.sha256()).update(data)

    def update(self, arr, path=""):
        start = self.seen.get(path, 0)
        self.seen[path] = start + len(arr)
        if arr.null_count:
            nulls = np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)) + start
            self._feed(path + "null", nulls.astype("<i8"))
            arr = arr.drop_null()
        t = arr.type
        if _is_text(t):
            self._feed(path + "text", _text_rows(pc.dictionary_encode(arr)))
        elif pa.types.is_dictionary(t) and _is_text(t.value_type):
            self._feed(path + "dict-text", _text_rows(arr))
        elif pa.types.is_dictionary(t):
            self.update(arr.dictionary_decode(), path)
        elif pa.types.is_list(t) or pa.types.is_large_list(t) or \
                pa.types.is_fixed_size_list(t):
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            self._feed(path + "len", lengths.astype("<i8"))
            self.update(arr.flatten(), path + "[]")
        else:
            try:
                a = arr.to_numpy(zero_copy_only=False)
            except (pa.ArrowException, NotImplementedError):
                a = np.array([], object)
            if a.dtype.kind in "biufmM":
                a = np.ascontiguousarray(a, a.dtype.newbyteorder("<"))
                self._feed(f"{path}{a.dtype.kind}{a.dtype.itemsize}", a)
            else:                   # no kind a recording holds: slow and exact
                self._feed(f"{path}{t}", repr(arr.to_pylist()).encode())

    def hexdigest(self):
        h = hashlib.sha256()
        for name in sorted(self.streams):
            h.update(name.encode() + b"\0" + self.streams[name].digest())
        return h.hexdigest()


def _is_text(t):
    return pa.types.is_string(t) or pa.types.is_large_string(t) or \
        pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _text_rows(arr):
    """A dictionary array's rows as 8 bytes of their string's sha256 each: the digest
    does not depend on the dictionary's order or unused entries."""
    entries = np.array([int.from_bytes(hashlib.sha256(
        b"\0" if v is None else b"\1" + (v.encode() if isinstance(v, str) else v)).digest()[:8],
        "little") for v in arr.dictionary.to_pylist()], dtype="<u8")
    return entries[arr.indices.to_numpy(zero_copy_only=False)]


def table_digests(table, digests=None):
    """{column: ColumnDigest} of an Arrow table, continuing `digests` if given."""
    digests = {} if digests is None else digests
    for name in table.column_names:
        d = digests.setdefault(name, ColumnDigest())
        for chunk in table.column(name).chunks:
            d.update(chunk)
    return digests


def _manifest_digest(manifest):
    """sha256 of the manifest as JSON, keys sorted, without the digest itself."""
    m = dict(manifest, integrity={k: v for k, v in (manifest.get("integrity") or {}).items()
                                  if k != "manifest"})
    return hashlib.sha256(json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def _sealed(manifest, tables):
    """The manifest as JSON reads it back, with its integrity record: tables are
    {table: {"rows": n, "columns": {column: sha256}, ...}}."""
    m = json.loads(json.dumps(dict(manifest, format=FORMAT, version=VERSION), default=str))
    m["integrity"] = {"tables": tables}
    m["integrity"]["manifest"] = _manifest_digest(m)
    return m


def _damaged(path, what):
    return RecordingError(f"{path}: {what}: the file is damaged (not what was recorded); "
                          "use an undamaged copy or record again")


def _check_integrity(path, manifest):
    """The manifest's integrity record ({table: {"rows", "columns", ...}}), checked
    against the manifest; None for a version 1 recording, which has none."""
    if manifest.get("version") == 1:
        if "integrity" in manifest:         # (version 1 had none: a damaged version digit)
            raise _damaged(path, "a version 1 manifest with version 2's integrity record")
        return None
    integ = manifest.get("integrity")
    if not isinstance(integ, dict):
        raise _damaged(path, "the manifest has no integrity record")
    if integ.get("manifest") != _manifest_digest(manifest):
        raise _damaged(path, "the manifest does not match its checksum")
    tables = integ.get("tables")
    if not isinstance(tables, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("rows"), int) and
            isinstance(e.get("columns"), dict) and
            all(isinstance(v, str) for v in e["columns"].values()) for e in tables.values()):
        raise _damaged(path, "the manifest's integrity record is malformed")
    return tables


def _verify(path, name, table, expect):
    """Refuse a table whose rows or column values differ from those recorded."""
    _verify_digests(path, name, table.num_rows, table_digests(table), expect)


def _verify_digests(path, name, rows, digests, expect):
    if rows != expect["rows"]:
        raise _damaged(path, f"table {name!r} has {rows} rows, "
                             f"{expect['rows']} were recorded")
    cols = expect["columns"]
    for col, d in digests.items():
        if col not in cols:
            raise _damaged(path, f"table {name!r} has a column {col!r} that was not recorded")
        if d.hexdigest() != cols[col]:
            raise _damaged(path, f"column {name}.{col} does not match its checksum")


class Writer:
    """Appends chunks to `<out>.partial/`, then finalize() makes `<out>`.

    Every data file is written whole under a new name (`<table>-<n>.parquet`, a
    snapshot too) before the manifest that lists it with its checksums, and a
    replaced snapshot is deleted only after the manifest stops listing it: after a
    kill -9 at any point, the manifest describes files that are all there."""

    def __init__(self, out):
        self.out = str(out)
        self.dir = partial_dir(out)
        if os.path.exists(self.dir):          # check_output() allowed it: --force
            shutil.rmtree(self.dir)
        os.makedirs(self.dir)
        self.seq = {}
        self.rows = {}
        self.files = {}             # table -> its files in order (a snapshot: the last)
        self.digests = {}           # table -> {column: ColumnDigest} of those files
        self.replaced = []          # files to delete once the manifest is written
        self.levels = {}            # table -> each file's merge level (0: a chunk), in order

    def _new_name(self, table_name):
        n = self.seq.get(table_name, 0) + 1
        self.seq[table_name] = n
        return f"{table_name}-{n:06d}.parquet"

    def _write(self, table_name, table):
        name = self._new_name(table_name)
        _atomic_write_parquet(table, os.path.join(self.dir, name))
        return name

    def append(self, table_name, table):
        if table is None or table.num_rows == 0:
            return
        self.files.setdefault(table_name, []).append(self._write(table_name, table))
        self.levels.setdefault(table_name, []).append(0)
        self.rows[table_name] = self.rows.get(table_name, 0) + table.num_rows
        table_digests(table, self.digests.setdefault(table_name, {}))
        self._compact(table_name)

    def _compact(self, table_name):
        """Merge a table's last COMPACT_CHUNKS files of one level into one file of the
        next level: a row is rewritten once a level (log base COMPACT_CHUNKS of the
        chunks), never the whole recording again, and a table keeps fewer than
        COMPACT_CHUNKS files a level. Read back from disk: a chunk damaged there fails
        finalize()'s checksums, as it would have."""
        levels = self.levels[table_name]
        while len(levels) >= COMPACT_CHUNKS and len(set(levels[-COMPACT_CHUNKS:])) == 1:
            n = len(self.files[table_name])
            self._merge(table_name, n - COMPACT_CHUNKS, n)
            levels[-COMPACT_CHUNKS:] = [levels[-1] + 1]

    def _merge(self, table_name, start, end):
        """files[start:end] as one file, their row groups joined up to MERGE_ROWS: memory
        for that many rows, not for the whole merge (a storm's minutes of samples)."""
        files, name = self.files[table_name], self._new_name(table_name)

        def write(tmp):
            with pq.ParquetWriter(tmp, pq.read_schema(os.path.join(self.dir, files[start]))) \
                    as w:
                held, rows = [], 0
                for f in files[start:end]:
                    pf = pq.ParquetFile(os.path.join(self.dir, f), memory_map=True)
                    for i in range(pf.metadata.num_row_groups):
                        held.append(pf.read_row_group(i, use_threads=False))
                        rows += held[-1].num_rows
                        if rows >= MERGE_ROWS:
                            w.write_table(pa.concat_tables(held), row_group_size=rows)
                            held, rows = [], 0
                if held:
                    w.write_table(pa.concat_tables(held), row_group_size=max(1, rows))
        _atomic(os.path.join(self.dir, name), write)
        self.replaced += files[start:end]
        self.files[table_name] = files[:start] + [name] + files[end:]
        pa.default_memory_pool().release_unused()   # else the allocator keeps it

    def snapshot(self, table_name, table):
        name = self._write(table_name, table)
        self.replaced += self.files.get(table_name, [])
        self.files[table_name] = [name]
        self.rows[table_name] = table.num_rows
        self.digests[table_name] = table_digests(table)

    def _integrity(self, files):
        return {t: dict({"rows": self.rows[t],
                         "columns": {c: d.hexdigest() for c, d in self.digests[t].items()}},
                        **({"files": fs} if files else {}))
                for t, fs in sorted(self.files.items())}

    def manifest(self, manifest):
        _atomic_write_json(_sealed(manifest, self._integrity(files=True)),
                           os.path.join(self.dir, "manifest.json"))
        for name in self.replaced:
            try:
                os.unlink(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass
        self.replaced = []

    def finalize(self, manifest):
        """Merge the chunks into one Parquet file at `out`, atomically. What is merged
        is checked against the checksums taken when each chunk was written."""
        parts = {name: [os.path.join(self.dir, f) for f in files]
                 for name, files in sorted(self.files.items())}
        schemas = {name: pq.read_schema(files[0]) for name, files in parts.items()}
        # A fixed-size list is stored as a list, which the reader casts back: each
        # table's row groups hold the others' columns null, and a null fixed-size list
        # still holds its k values (the aggregates' 64-slot histogram: 39 MiB of zeros
        # beside a 75k-row group of samples, the peak of record's whole run).
        fixed = {name: {f.name: f.type.list_size for f in s
                        if pa.types.is_fixed_size_list(f.type)}
                 for name, s in schemas.items()}
        fixed = {name: cols for name, cols in fixed.items() if cols}
        union = pa.schema([("table", pa.string())] +
                          [(name, pa.struct([_stored(f) for f in s]))
                           for name, s in schemas.items()])
        layout, rg = {}, 0
        for name, files in parts.items():
            for f in files:
                layout.setdefault(name, []).extend(
                    range(rg, rg + pq.ParquetFile(f).metadata.num_row_groups))
                rg += pq.ParquetFile(f).metadata.num_row_groups
        integrity = self._integrity(files=False)
        manifest = _sealed(dict(manifest, tables=layout,
                                **({"fixed_size_lists": fixed} if fixed else {})), integrity)
        union = union.with_metadata({MANIFEST_KEY: json.dumps(manifest)})
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.out) + ".",
                                   dir=os.path.dirname(os.path.abspath(self.out)))
        os.close(fd)
        try:
            with pq.ParquetWriter(tmp, union, compression="zstd") as w:
                for name, files in parts.items():
                    merged = {}
                    for f in files:
                        for i in range(pq.ParquetFile(f).metadata.num_row_groups):
                            t = pq.ParquetFile(f).read_row_group(i)
                            table_digests(t, merged)
                            w.write_table(as_union_rows(name, t, union),
                                          row_group_size=max(1, t.num_rows))
                    if {c: d.hexdigest() for c, d in merged.items()} != \
                            integrity[name]["columns"]:
                        raise RecordingError(f"{self.dir}: the {name} chunks changed on disk "
                                             "since they were written: check the disk; the "
                                             "chunks are kept there")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.out)
        except BaseException:
            os.unlink(tmp)
            raise
        shutil.rmtree(self.dir)
        return manifest


def _stored(field):
    """The field as the final file stores it: a fixed-size list as a list."""
    if pa.types.is_fixed_size_list(field.type):
        return pa.field(field.name, pa.list_(field.type.value_field), field.nullable,
                        field.metadata)
    return field


def as_union_rows(name, table, union):
    n = table.num_rows
    cols = [pa.array([name] * n, pa.string())]
    for field in union:
        if field.name == "table":
            continue
        if field.name == name:
            cols.append(pa.StructArray.from_arrays(
                [c.combine_chunks().cast(f.type) for c, f in zip(table.columns, field.type)],
                fields=list(field.type)))
        else:
            cols.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(cols, schema=union.remove_metadata())


def _partial_tables(d):
    """{table: [files in order]} of a version 1 .partial directory: every file in it."""
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.parquet"))):
        base = os.path.basename(f)[:-len(".parquet")]
        name = base.rsplit("-", 1)[0] if "-" in base else base
        out.setdefault(name, []).append(f)
    return out


# --- reading --------------------------------------------------------------------------

class Recording:
    """A loaded recording: the manifest and one DataFrame per table."""

    def __init__(self, path, manifest, tables, interrupted=False, integrity=None,
                 warnings=()):
        self.path = path
        self.manifest = manifest
        self._tables = tables           # name -> callable returning an Arrow table
        self._cache = {}
        self.interrupted = interrupted
        self._integrity = integrity     # {table: {"rows", "columns"}}; None: unchecked
        self.warnings = list(warnings)  # one line each: what was read differently

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

    def in_memory(self, name):
        """Whether the named table (or columns of it) is loaded already."""
        return name in self._cache or any(isinstance(k, tuple) and k[0] == name
                                          for k in self._cache)

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
            with self._reading(name):
                t = _check_table(self.path, name, pa.concat_tables(self._tables[name](columns)),
                                 columns)
                if self._integrity is not None:
                    _verify(self.path, name, t, self._integrity[name])
                self._cache[key] = t.to_pandas(split_blocks=True, self_destruct=True)
        return self._cache[key]

    def chunks(self, name, columns):
        """The named table's columns as DataFrames, one chunk (row group, or chunk
        file) at a time, checked like table(): memory bounded by a chunk, for
        recordings too big to load (the checksums are checked at the end, and a
        mismatch raises then). A table held in memory is one chunk."""
        if name in self._cache or self._tables.get(name) is None:
            df = self.table(name, columns)
            if not df.empty:
                yield df
            return
        digests, rows = {}, 0
        with self._reading(name):
            for t in self._tables[name](columns):
                t = _check_table(self.path, name, t, columns)
                if self._integrity is not None:
                    table_digests(t, digests)
                rows += t.num_rows
                yield t.to_pandas(split_blocks=True, self_destruct=True)
            if self._integrity is not None:
                _verify_digests(self.path, name, rows, digests, self._integrity[name])

    @contextlib.contextmanager
    def _reading(self, name):
        try:
            yield
        except (pa.ArrowException, OSError, KeyError, ValueError, TypeError,
                IndexError, AttributeError) as e:
            raise RecordingError(f"{self.path}: table {name!r} is corrupt "
                                 f"({_first_line(e)})") from None

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


# Each table's columns the analyses need (kinds: "n" numeric, "s" strings, "l" lists, "ls"
# lists of strings) are its probe's (catalog.table_columns()): a damaged file that lacks
# them is refused.
_KIND = {"n": lambda t: pa.types.is_integer(t), "s": lambda t: pa.types.is_string(t) or (
    pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)),
    "l": lambda t: pa.types.is_list(t) or pa.types.is_fixed_size_list(t),
    "ls": lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and
    pa.types.is_string(t.value_type)}       # list of strings (stack frames)

# Manifest fields the analyses read, and the JSON types they must have.
_NUMBER = (int, float)
MANIFEST_TYPES = {"duration_s": _NUMBER, "start_monotonic_ns": int, "samples": int,
                  "counters": dict, "losses": dict, "probes": dict, "lock_symbols": dict,
                  "lock_names": dict, "processes": dict, "work": dict, "tables": dict,
                  "probe_counters": dict, "handler_ns": dict, "in_progress_min_ns": int,
                  "probe_cost": dict, "kernel_memory": dict, "filters": dict,
                  "program_ns": dict, "fixed_size_lists": dict}


def _check_table(path, name, table, columns=None):
    # here, not at the top: `import kvmlockprof` reads recordings without every probe loaded
    from kvmlockprof.catalog import table_columns
    for col, kind in table_columns().get(name, {}).items():
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
    if manifest.get("version") not in READABLE or isinstance(manifest.get("version"), bool):
        raise RecordingError(f"{path} is recording format version {manifest.get('version')}, "
                             f"this kvmlockprof reads versions {READABLE[0]}-{READABLE[-1]}: "
                             "upgrade kvmlockprof")
    integrity = _check_integrity(path, manifest)
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
    return integrity


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
        names = set(pf.schema_arrow.names)
        meta = pf.metadata.metadata or {}       # the footer's own copy, not ARROW:schema's
    except (pa.ArrowException, OSError, ValueError) as e:
        raise RecordingError(f"{path} is a corrupt Parquet file ({_first_line(e)})") from None
    if MANIFEST_KEY not in meta:
        raise RecordingError(f"{path} is a Parquet file but not a kvmlockprof recording "
                             "(no manifest): record one with `kvmlockprof record`")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except ValueError:
        raise RecordingError(f"{path}: the recording's manifest is corrupt") from None
    integrity = _check_manifest(path, manifest)
    layout = manifest.get("tables") or {}
    if any(not isinstance(g, list) or not all(isinstance(i, int) and
                                              0 <= i < pf.metadata.num_row_groups for i in g)
           for g in layout.values()):
        raise RecordingError(f"{path}: the manifest's table layout does not match the file: "
                             "the file is damaged")

    fixed = manifest.get("fixed_size_lists") or {}
    if any(not isinstance(cols, dict) or any(not isinstance(k, int) or isinstance(k, bool) or
                                             k < 1 for k in cols.values())
           for cols in fixed.values()):
        raise _damaged(path, "the manifest's fixed_size_lists is malformed")

    def reader(name, groups):
        # Row group by row group: Arrow cannot read a struct with a dictionary
        # child (comm) into one chunked column.
        return lambda columns=None: (
            _flatten(pf.read_row_group(i, columns=[f"{name}.{c}" for c in columns]
                                       if columns else [name]), name, fixed.get(name, {}))
            for i in groups)
    tables = {n: reader(n, g) for n, g in layout.items() if n in names}
    if integrity is not None:
        for n in set(integrity) | set(layout):
            if n not in tables or n not in integrity:
                raise _damaged(path, f"table {n!r} is missing")
            rows = sum(pf.metadata.row_group(i).num_rows for i in layout[n])
            if rows != integrity[n]["rows"]:
                raise _damaged(path, f"table {n!r} has {rows} rows, {integrity[n]['rows']} "
                                     "were recorded")
    return Recording(path, manifest, tables, integrity=integrity)


def _flatten(table, name, fixed):
    """The struct column's fields as columns, without copying: rows of a table's own
    row groups are never null, so field(i) is the data (flatten() would copy to
    merge the struct's nulls in). fixed: {column: k} stored as lists, cast back to
    fixed-size lists of k (a row of another length fails the cast: damaged)."""
    col = table.column(name)
    out = []
    for i, f in enumerate(col.type):
        c = pa.chunked_array([ch.field(i) for ch in col.chunks], type=f.type)
        if f.name in fixed and pa.types.is_list(f.type):
            c = c.cast(pa.list_(f.type.value_field, fixed[f.name]))
        out.append(c)
    return pa.Table.from_arrays(out, names=[f.name for f in col.type])


def _load_partial(d):
    mpath = os.path.join(d, "manifest.json")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        raise RecordingError(f"{d} has no readable manifest.json: it is not an interrupted "
                             "kvmlockprof recording") from None
    integrity = _check_manifest(d, manifest)
    warnings = []
    if integrity is None:                       # version 1: every chunk there
        parts = _partial_tables(d)
    else:
        parts = _listed_files(d, integrity)
        later = _written_after(d, parts)
        if later:
            # Left out, not read unchecked: the manifest's counts and times are those of
            # its flush, and what was flushed after it has no checksum to check.
            warnings.append(f"{len(later)} file(s) of a flush cut short (written after the "
                            f"last manifest) were left out: {', '.join(later[:3])}")

    def reader(files):
        return lambda columns=None: (pq.read_table(f, columns=list(columns) if columns else None)
                                     for f in files)
    return Recording(d, manifest, {n: reader(fs) for n, fs in parts.items()},
                     interrupted=True, integrity=integrity, warnings=warnings)


def _seq(name):
    """(table, n) of a `<table>-<n>.parquet` file name, or None."""
    base, _, n = name[:-len(".parquet")].rpartition("-")
    return (base, int(n)) if name.endswith(".parquet") and base and n.isdigit() else None


def _listed_files(d, integrity):
    """{table: [paths]} of the files the manifest lists, which must all be there."""
    parts = {}
    for table, e in integrity.items():
        files = e.get("files")
        if not isinstance(files, list) or not all(
                isinstance(f, str) and os.path.basename(f) == f and _seq(f) and
                _seq(f)[0] == table for f in files):
            raise _damaged(d, f"the manifest's file list of table {table!r} is malformed")
        for f in files:
            if not os.path.isfile(os.path.join(d, f)):
                raise _damaged(d, f"{f} is missing")
        parts[table] = [os.path.join(d, f) for f in files]
    return parts


def _written_after(d, parts):
    """Data files newer than the manifest's (a kill -9 between them and it); older
    ones are snapshots it replaced, left by a kill before they were deleted."""
    last = {t: max(_seq(os.path.basename(f))[1] for f in fs) for t, fs in parts.items() if fs}
    names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(d, "*.parquet")))
    return [f for f, s in zip(names, map(_seq, names)) if s and s[1] > last.get(s[0], 0)]
