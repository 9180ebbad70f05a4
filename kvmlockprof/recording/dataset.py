"""Recordings as a dataset: standard Parquet tables any engine reads, and DuckDB over them.

A recording file keeps its tables in struct columns of one Parquet file, with the lock
names, host and kernel in a JSON manifest in the footer: DuckDB and pyarrow read the
tables, but a name is a join on the footer's JSON and Spark cannot read the footer at
all. `export` writes each recording as plain tables instead, one directory per table
and one file per recording in it (`DIR/aggregates/<recording>.parquet`), every row
carrying its recording's host, kernel and run, the lock's name and class, the type,
caller and VM, and with the filters `record` left to the reader applied: what `report`
shows. The recording stays the source (its checksums, every manifest field); the
dataset is derived and can be made again.

`query` runs DuckDB over dataset directories and recordings (exported to a temporary
directory first), as views named like the directories.
"""
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile

from kvmlockprof.lazy import np, pa, pd, pq
from kvmlockprof.recording.store import RecordingError, load, partial_dir

_S, _U64, _U32, _I32, _I64, _F64, _B = (pa.string(), pa.uint64(), pa.uint32(), pa.int32(),
                                        pa.int64(), pa.float64(), pa.bool_())

# Every table's first columns: which recording a row comes from.
IDENTITY = [
    ("host", _S, "the recorded host's name (`record --host`, else its hostname)"),
    ("kernel", _S, "its kernel release (uname -r)"),
    ("run", _S, "the run's label (`record --run`, else the recording's start, UTC)"),
    ("recording", _S, "the recording's id: 16 hex digits of its manifest's checksum"),
]
_LOCK = [
    ("lock_addr", _U64, "the lock's address"),
    ("lock", _S, "its name as report prints it: `kvm(PID)->FIELD`, a kallsyms symbol, "
                 "else the address (0x...)"),
    ("lock_class", _S, "the name without the VM's pid (`kvm->slots_lock`, `vcpu->mutex`): "
                       "the same lock in every VM and on every host"),
    ("type", _S, "perf's lock type: spinlock, rwlock:R/W, rwsem:R/W, mutex, ..."),
    ("flags", _U32, "the tracepoint's LCB_F_* flags"),
]
# The tables and their columns after IDENTITY, with what each holds (ns: nanoseconds).
SCHEMA = {
    "recordings": [
        ("path", _S, "the recording file exported"),
        ("start", pa.timestamp("us", tz="UTC"), "when recording started (wall clock)"),
        ("duration_s", _F64, "seconds recorded"),
        ("machine", _S, "uname -m"),
        ("waits", _I64, "contended waits paired in the kernel (every one is in aggregates, "
                        "but those lost to a full map)"),
        ("samples", _I64, "waits streamed as samples"),
        ("lost", _I64, "events lost, all causes (the manifest's `losses`)"),
        ("sample_every", _I64, "one wait in N streamed (0: aggregates only)"),
        ("interrupted", _B, "read from the .partial directory of a killed record"),
        ("format_version", _I64, "the recording file's format version"),
        ("manifest", _S, "the whole manifest, JSON (DuckDB: manifest->>'$.work.exits_total')"),
    ],
    "locks": _LOCK[:3] + [
        ("lock_name", _S, "the KVM-aware name or symbol; null for an unnamed lock"),
        ("how", _S, "how the KVM-aware name was derived (null for a symbol)"),
    ],
    "processes": [
        ("tgid", _I64, "process id"),
        ("comm", _S, "its name"),
        ("vm_name", _S, "QEMU's -name guest=NAME, or libvirt's; null if none"),
        ("vm_tgid", _I64, "the VMM it works for (itself, or the VMM a vhost-PID helper is "
                          "named after)"),
        ("vm", _S, "that VMM's name, else its comm"),
        ("cmdline", _S, "its command line"),
    ],
    "aggregates": _LOCK + [
        ("tgid", _U32, "process"),
        ("vm", _S, "the process's VM (processes.vm)"),
        ("stack_id", _I32, "kernel stack (stacks.stack_id, source 'contention'); -1000 "
                              "(KVMLP_NO_STACK): not walked; other negative: the walk failed"),
        ("caller", _S, "first frame outside the locking code"),
        ("kvm", _B, "the stack goes through KVM"),
        ("count", _U64, "waits: every contended wait, from the in-kernel aggregates"),
        ("total_ns", _U64, "wait time, ns"),
        ("max_ns", _U64, "longest wait, ns"),
        ("min_ns", _U64, "shortest wait, ns"),
        ("hist", pa.list_(_U64), "waits per log2 bucket: slot s holds [2^(s-1), 2^s) ns "
                                 "(slot 1 from 0); DuckDB lists count from 1"),
        ("estimated", _B, "count/total spread from waits without a walked stack (only with "
                          "a recorded -S filter)"),
    ],
    "samples": [
        ("ts_ns", _U64, "when the wait ended, CLOCK_MONOTONIC ns"),
        ("wait_ns", _U64, "how long it waited, ns"),
    ] + _LOCK + [
        ("tid", _U32, "thread"),
        ("tgid", _U32, "process"),
        ("comm", _S, "thread name"),
        ("vm", _S, "the process's VM"),
        ("cpu", _U32, "CPU"),
        ("stack_id", _I32, "kernel stack; -1000 (KVMLP_NO_STACK): not walked; other "
                              "negative: the walk failed"),
        ("caller", _S, "first frame outside the locking code"),
        ("kvm", _B, "the stack goes through KVM"),
        ("ret", _I32, "contention_end's ret (0, or -EINTR etc.)"),
    ],
    "stacks": [
        ("source", _S, "the BPF module whose stack ids these are ('contention', ...)"),
        ("stack_id", _I32, "stack id"),
        ("caller", _S, "first frame outside the locking code"),
        ("kvm", _B, "the stack goes through KVM"),
        ("frames", pa.list_(_S), "symbolised frames, innermost first"),
        ("addrs", pa.list_(_U64), "their addresses"),
        ("lock_frame", pa.list_(_B), "each frame is lock machinery"),
    ],
    "in_progress": _LOCK + [
        ("tid", _U32, "thread"),
        ("tgid", _U32, "process"),
        ("stack_id", _I32, "kernel stack"),
        ("caller", _S, "first frame outside the locking code"),
        ("began_ns", _U64, "when the wait began, CLOCK_MONOTONIC ns"),
        ("age_ns", _U64, "how long it had waited when record stopped, ns"),
    ],
}
TABLES = tuple(SCHEMA)
# A dataset table named differently from its recording table.
SOURCE = {"samples": "contention"}
# Columns a dataset adds to a recording's table (dropped to rebuild the recording).
_ADDED = {"lock", "lock_class", "type", "vm", "caller", "kvm", "estimated"}


class DatasetError(RecordingError):
    """Bad input to export/query; str() is the one-line reason."""


def recording_id(manifest):
    """16 hex digits naming a recording: its manifest's checksum (version 2), else a
    sha256 of its manifest: the same recording exports to the same files."""
    digest = (manifest.get("integrity") or {}).get("manifest")
    if not isinstance(digest, str):
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str)
                                .encode()).hexdigest()
    return digest[:16]


def identity(rec):
    """{host, kernel, run, recording} of a loaded recording."""
    m = rec.manifest
    return {"host": str(m.get("host") or "?"), "kernel": str(m.get("kernel_release") or "?"),
            "run": str(m.get("run") or m.get("start") or "?"), "recording": recording_id(m)}


def schema(table):
    return pa.schema([(n, t) for n, t, _ in IDENTITY + SCHEMA[table]])


def _arrow(df, table, ident, extra=()):
    """df as the table's Arrow schema (identity first), columns it lacks null;
    `extra`: further columns kept as they are (a probe's own)."""
    n = len(df)
    cols, fields = [], []
    for name, typ, _ in IDENTITY:
        cols.append(pa.array([ident[name]] * n, typ))
        fields.append((name, typ))
    for name, typ, _ in SCHEMA.get(table, []) + [(c, None, "") for c in extra]:
        if name not in df.columns:
            cols.append(pa.nulls(n, typ))
        else:
            v = df[name]
            if isinstance(v.dtype, pd.CategoricalDtype):
                v = v.astype(object)
            if typ is not None and pa.types.is_integer(typ) and v.dtype.kind == "f":
                v = v.round()               # a spread (-S) estimate: whole waits
            arr = pa.array(v.tolist() if v.dtype == object else v.to_numpy(), from_pandas=True)
            if typ is not None:
                if pa.types.is_string(typ) and not pa.types.is_string(arr.type):
                    arr = pa.array([None if x is None else str(x) for x in v.tolist()], typ)
                else:
                    arr = arr.cast(typ)
            cols.append(arr)
        fields.append((name, cols[-1].type))
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


# --- one recording's tables ---------------------------------------------------------------

def _lock_class_column(df):
    """lock_class of each row's lock (as annotate() named it): per distinct name, not
    per row."""
    from kvmlockprof.analysis import locks
    codes, uniq = pd.factorize(df["lock"].astype(str).to_numpy())
    df["lock_class"] = np.array([locks.lock_class(x) for x in uniq.tolist()] + [None],
                                dtype=object)[codes]
    return df


def _annotated(rec, df, filtered=True):
    """A table with lock_addr/flags/stack_id/tgid given type, caller, kvm, lock,
    lock_class and vm columns, kept by the recording's read-side filters."""
    from kvmlockprof.analysis import locks
    if df.empty:
        return df
    df = locks.with_stack_columns(df, locks.contention_stacks(rec), locks.lock_names(rec))
    if filtered:
        df = locks.recorded_filters(rec, df)
    df = _lock_class_column(df.copy(deep=False))
    if "tgid" in df.columns:
        vm = rec.derived("dataset_vms", lambda: locks.vm_labels(rec))
        codes, uniq = pd.factorize(df["tgid"].to_numpy())
        df["vm"] = np.array([vm.get(int(t), str(int(t))) for t in uniq.tolist()] + [None],
                            dtype=object)[codes]
    return df


def _recordings(rec, path, ident):
    m = rec.manifest
    c = m.get("counters") or {}
    start = pd.to_datetime(m.get("start"), utc=True, errors="coerce") if m.get("start") \
        else None
    row = {"path": os.path.abspath(path), "start": None if start is None or pd.isna(start)
           else start.to_pydatetime(), "duration_s": m.get("duration_s"),
           "machine": m.get("machine"),
           "waits": c.get("end", 0) - c.get("end_without_begin", 0),
           "samples": m.get("samples"), "lost": sum((m.get("losses") or {}).values()),
           "sample_every": (m.get("probes", {}).get("contention") or {}).get("sample_every"),
           "interrupted": bool(rec.interrupted), "format_version": m.get("version"),
           "manifest": json.dumps(m, default=str)}
    return _arrow(pd.DataFrame([row]).astype({"start": "datetime64[us, UTC]"}), "recordings",
                  ident)


def _locks(rec, ident):
    from kvmlockprof.analysis import locks
    m = rec.manifest
    symbols, kvm = m.get("lock_symbols") or {}, m.get("lock_names") or {}
    addrs = {int(a, 16) for a in list(symbols) + list(kvm)}
    for t in ("aggregates", "in_progress"):
        df = rec.table(t, ["lock_addr"])
        if not df.empty:
            addrs |= set(np.unique(df["lock_addr"].to_numpy()).tolist())
    rows = []
    for a in sorted(addrs):
        h = f"{a:#x}"
        name = kvm[h]["name"] if h in kvm else symbols.get(h)
        rows.append({"lock_addr": a, "lock": name or h, "lock_class": locks.lock_class(name or h),
                     "lock_name": name, "how": (kvm.get(h) or {}).get("how")})
    return _arrow(pd.DataFrame(rows, columns=["lock_addr", "lock", "lock_class", "lock_name",
                                              "how"]), "locks", ident)


def _processes(rec, ident):
    from kvmlockprof.analysis import locks
    return _arrow(locks.processes(rec), "processes", ident)


def _aggregates(rec, ident):
    from kvmlockprof.analysis import locks
    aggs = locks.annotated_aggregates(rec)      # (the recorded -L/-S filters applied)
    if not aggs.empty:
        aggs = _annotated(rec, aggs[[c for c in aggs.columns if c not in _ADDED]],
                          filtered=False)
        if "estimated" not in aggs.columns:
            aggs["estimated"] = False
    return _arrow(aggs, "aggregates", ident)


def _stacks(rec, ident):
    from kvmlockprof.analysis import locks
    st = rec.stacks
    if not st.empty and "lock_frame" in st.columns:
        info = locks.stack_info(st)
        st = st.assign(caller=info["caller"].to_numpy(), kvm=info["kvm"].to_numpy())
    return _arrow(st, "stacks", ident)


def _in_progress(rec, ident):
    return _arrow(_annotated(rec, rec.table("in_progress")), "in_progress", ident)


def _sample_batches(rec, ident):
    """The samples table a chunk (row group) at a time: memory for one chunk, and
    the recording's checksums checked as it is read."""
    if "contention" not in rec.table_names:
        return
    for chunk in rec.chunks("contention", None):
        yield _arrow(_annotated(rec, chunk), "samples", ident)


BUILDERS = {"recordings": None, "locks": _locks, "processes": _processes,
            "aggregates": _aggregates, "stacks": _stacks, "in_progress": _in_progress}


# --- writing ----------------------------------------------------------------------------

def _write(path, batches, table_schema):
    """Arrow tables into one Parquet file at path, atomically (tmp, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with pq.ParquetWriter(tmp, table_schema, compression="zstd") as w:
            for t in batches:
                if t.num_rows:
                    w.write_table(t.cast(table_schema) if t.schema != table_schema else t)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _extra_tables(rec):
    """A recording's tables beyond the dataset's own (function probes', vms, ...)."""
    own = set(SCHEMA) | set(SOURCE.values())
    return [t for t in rec.table_names if t not in own]


def expand(paths):
    """(recording paths, dataset directories) of query/export/compare arguments: a
    dataset directory (it has recordings/), a directory of recordings (its
    *.parquet), a recording or its .partial directory."""
    recs, sets = [], []
    for p in paths:
        p = str(p)
        if os.path.isdir(p) and glob.glob(os.path.join(p, "recordings", "*.parquet")):
            sets.append(p)
        elif os.path.isdir(p) and not p.rstrip("/").endswith(".partial"):
            found = sorted(glob.glob(os.path.join(p, "*.parquet")))
            if not found:
                raise DatasetError(f"{p} holds no *.parquet recordings and is not a dataset "
                                   "(no recordings/ in it): give recordings or an export's "
                                   "directory")
            recs += found
        elif not os.path.exists(p) and not os.path.isdir(partial_dir(p)):
            raise DatasetError(f"{p} does not exist: give recordings or dataset directories")
        else:
            recs.append(p)
    return recs, sets


def export(paths, out, force=False, tables=None, warn=None):
    """Write each recording's tables under `out` (`out/<table>/<recording>.parquet`).
    tables: only these (default: all, a recording's function-probe tables too).
    Refuses to replace a file without force, before writing anything. Returns the
    identities written."""
    recs = []
    seen = {}
    for p in paths:
        rec = load(p)
        ident = identity(rec)
        if ident["recording"] in seen:
            raise DatasetError(f"{p} and {seen[ident['recording']]} are the same recording: "
                               "give it once")
        seen[ident["recording"]] = p
        recs.append((p, rec, ident))
        if warn and rec.interrupted:
            warn(f"{p} was not finished: exporting the interrupted recording at {rec.path}")
    wanted = lambda t: tables is None or t in tables      # noqa: E731
    plan = []
    for p, rec, ident in recs:
        for t in [t for t in TABLES if wanted(t)] + [t for t in _extra_tables(rec) if wanted(t)]:
            plan.append((p, rec, ident, t, os.path.join(out, t, ident["recording"] + ".parquet")))
    if not force:
        for *_, f in plan:
            if os.path.exists(f):
                raise DatasetError(f"{f} exists (that recording was exported already): use "
                                   "--force to write it again")
    if os.path.exists(out) and not os.path.isdir(out):
        raise DatasetError(f"{out} is a file: give a directory for the dataset")
    for p, rec, ident, t, f in plan:
        os.makedirs(os.path.dirname(f), exist_ok=True)
        if t == "recordings":
            _write(f, [_recordings(rec, p, ident)], schema(t))
        elif t == "samples":
            _write(f, _sample_batches(rec, ident), schema(t))
        elif t in SCHEMA:
            _write(f, [BUILDERS[t](rec, ident)], schema(t))
        else:
            df = rec.table(t)
            a = _arrow(df, t, ident, extra=list(df.columns))
            _write(f, [a], a.schema)
    return [ident for _, _, ident in recs]


# --- reading a dataset back as recordings (compare) -------------------------------------

def load_dataset(d, where=None):
    """The recordings of a dataset directory (those of `where`, a condition on the
    `recordings` view) as Recordings, rebuilt from its tables: for compare."""
    from kvmlockprof.recording.store import Recording
    import pyarrow.dataset as ds
    ids = query(f"SELECT recording, manifest FROM recordings"
                f"{' WHERE ' + where if where else ''} ORDER BY host, run", [d])
    if ids.empty:
        raise DatasetError(f"{d}: no recording matches{' ' + where if where else ''}")
    out = []
    tables = [t for t in os.listdir(d) if t != "recordings" and
              glob.glob(os.path.join(d, t, "*.parquet"))]
    for rid, manifest in zip(ids["recording"], ids["manifest"]):
        m = json.loads(manifest)
        frames = {}
        for t in tables:
            f = os.path.join(d, t, rid + ".parquet")
            if not os.path.exists(f):
                continue
            df = ds.dataset(f).to_table().to_pandas()
            drop = {n for n, _, _ in IDENTITY} | _ADDED
            if t in ("locks", "processes"):
                continue                    # (the manifest holds them)
            frames[SOURCE.get(t, t)] = df[[c for c in df.columns if c not in drop]]
        out.append(Recording.from_frames(f"{d}#{m.get('host')}/{m.get('run') or m.get('start')}",
                                         m, frames))
    return out


# --- DuckDB ---------------------------------------------------------------------------------

def mentioned(sql, names):
    """The names the SQL text uses as words (case-insensitive): the views to build."""
    return [n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", sql, re.I)]


def _quote(s):
    return "'" + str(s).replace("'", "''") + "'"


def connect(dirs):
    """A DuckDB connection with a view per table of the dataset directories."""
    import duckdb
    con = duckdb.connect()
    names = sorted({t for d in dirs for t in os.listdir(d)
                    if glob.glob(os.path.join(d, t, "*.parquet"))})
    for t in names:
        files = [f for d in dirs for f in sorted(glob.glob(os.path.join(d, t, "*.parquet")))]
        con.execute(f'CREATE VIEW "{t}" AS SELECT * FROM read_parquet('
                    f'[{", ".join(map(_quote, files))}], union_by_name = true)')
    return con, names


def query(sql, paths, warn=None):
    """The result of DuckDB SQL over recordings and dataset directories, as a
    DataFrame. Recordings are exported first (the tables the SQL names) to a
    temporary directory, removed after."""
    import duckdb
    recs, sets = expand(paths)
    tmp = tempfile.mkdtemp(prefix="kvmlockprof-query-") if recs else None
    available = set(TABLES) if recs else set()
    try:
        if recs:
            extra = set()
            for p in recs:
                extra |= set(_extra_tables(load(p)))
            available |= extra
            export(recs, tmp, tables={"recordings"} | set(mentioned(sql, list(TABLES) +
                                                                   sorted(extra))),
                   warn=warn)
            sets = sets + [tmp]
        con, names = connect(sets)
        try:
            rel = con.sql(sql)
            return _frame(rel) if rel is not None else pd.DataFrame()
        except duckdb.Error as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if isinstance(e, duckdb.CatalogException):
                msg += f" (the views: {', '.join(sorted(available | set(names)))})"
            raise DatasetError(f"query failed: {msg}") from None
        finally:
            con.close()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _frame(rel):
    """A DuckDB result as a DataFrame, its integer sums (HUGEINT, which pandas would
    make floats) as int64 where they fit."""
    t = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    for i, f in enumerate(t.schema):
        if pa.types.is_decimal(f.type) and f.type.scale == 0:
            try:
                t = t.set_column(i, f.name, t.column(i).cast(pa.int64()))
            except pa.ArrowInvalid:         # beyond int64: exact, as Python ints
                t = t.set_column(i, f.name, pa.array(
                    [None if v is None else int(v) for v in t.column(i).to_pylist()]))
    df = t.to_pandas()
    for f in t.schema:              # lists as lists (CSV, JSON), not numpy arrays
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            df[f.name] = t.column(f.name).to_pylist()
    return df
