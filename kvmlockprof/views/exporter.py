"""`kvmlockprof exporter`: `top`'s session (the in-kernel aggregates only, the same
filters as record) read every interval and served as Prometheus/OpenMetrics text.

Each read's increase of every aggregate entry is added, under the labels the entry
has at that moment, to counters kept here: they never go down over the process's
life, whatever the kernel side does (an entry renamed when its VM becomes known, a
VM that exits and whose entries are deleted). A label set once served is served to
the end: a lock class (VM) gets a label of its own when it ranks in the top N by wait
since the start, and keeps it; what it waited before stays in `other`, where it was
counted. So no served series falls or ends, and at every scrape the served series add
up to every wait read. At most 2N names ever get a label (Labels): the series stay
bounded. collect() only formats the latest read; a scrape reads nothing from the
kernel."""
import os
import threading
import time

from kvmlockprof.analysis import locks, owners
from kvmlockprof.lazy import np, pd
from kvmlockprof.recording.session import Stop, live_session
from kvmlockprof.recording.store import Recording
from kvmlockprof.views.top import AGG_KEYS, LiveView

PREFIX = "kvmlockprof"
OTHER = "other"
TOP_LOCKS = 50
TOP_VMS = 20
TOP_OWNERS = 20
DEFAULT_LISTEN = "127.0.0.1:9475"
# The histograms' `le` bounds: log2 slots s of the in-kernel histograms (slot s holds
# waits in [2^(s-1), 2^s) ns, quantiles.hist_bounds), every other one from 256 ns to
# 17 s. The bucket `le=2^s ns` is the sum of slots 0..s, exact: it counts the waits
# shorter than 2^s ns (a wait of exactly 2^s ns is in the next bucket).
LE_SLOTS = list(range(8, 35, 2))
LE_SECONDS = [float(2.0 ** s / 1e9) for s in LE_SLOTS]
# Classes and VMs ranked (lifetime wait), beyond the labelled ones: the rest's
# totals are dropped (they only decide who is promoted later).
RANK_KEEP = 10
# Names that ever get a label, per label of the top N: a label is never taken back
# (its series would end and the sum fall), so this is what bounds the series.
NAMES_PER_TOP = 2


def cumulative_buckets(hist):
    """(n, 64) log2 slot counts -> (n, len(LE_SLOTS)) counts of waits under each `le`."""
    hist = np.atleast_2d(np.asarray(hist, dtype=np.float64))
    return np.cumsum(hist, axis=1)[:, LE_SLOTS]


def values_buckets(ns):
    """Counts of values (ns) <= each `le` bound (exact: Prometheus's own rule)."""
    le_ns = 2.0 ** np.asarray(LE_SLOTS)
    idx = np.searchsorted(le_ns, np.asarray(ns, dtype=np.float64), side="left")
    return np.cumsum(np.bincount(idx, minlength=len(le_ns) + 1)[:len(le_ns)])


def increases(cur, prev):
    """Each aggregate entry's increase since `prev` (DataFrames of the agg map), field by
    field. The kernel adds to an entry's count, total_ns and histogram slot with
    separate atomic adds, so a read can fall between them: an entry whose histogram
    alone grew is kept (its count grew a read before, or will a read after), and over
    reads the increases add up to the entry's last values. An entry that fell (deleted
    and made again) counts whole, so no increase is negative."""
    if prev is None or prev.empty or cur.empty:
        return cur
    pos = cur[AGG_KEYS].merge(prev[AGG_KEYS].assign(_pos=np.arange(len(prev))),
                              on=AGG_KEYS, how="left")["_pos"].to_numpy()
    seen = ~np.isnan(pos)
    at = pos[seen].astype(np.int64)
    n, ns = cur["count"].to_numpy(np.uint64), cur["total_ns"].to_numpy(np.uint64)
    hist = np.stack(cur["hist"].to_numpy()).astype(np.uint64)
    pn = prev["count"].to_numpy(np.uint64)[at]
    pns = prev["total_ns"].to_numpy(np.uint64)[at]
    phist = np.stack(prev["hist"].to_numpy()).astype(np.uint64)[at]
    fell = (n[seen] < pn) | (ns[seen] < pns) | (hist[seen] < phist).any(axis=1)
    rows = np.flatnonzero(seen)[~fell]          # (new and fallen entries count whole)
    n, ns, hist = n.copy(), ns.copy(), hist.copy()
    n[rows] -= pn[~fell]
    ns[rows] -= pns[~fell]
    hist[rows] -= phist[~fell]
    grew = (n > 0) | (ns > 0) | hist.any(axis=1)
    out = cur.assign(count=n, total_ns=ns, hist=pd.Series(list(hist), index=cur.index))
    return out[grew].reset_index(drop=True)


class Labels:
    """Which names (lock classes, VMs) have a label of their own: a name gets one when
    it ranks in the top `n` by wait since the start, and keeps it; at most
    NAMES_PER_TOP * n names ever get one, then the ranking stops (its later leaders
    count as `other`). The totals of names far below the top are dropped, and all of
    them once no label is left to give, so memory does not grow with every address
    ever seen."""

    def __init__(self, n):
        self.n, self.cap = n, NAMES_PER_TOP * n
        self.named, self.total = set(), {}

    def add(self, names, weights):
        if len(self.named) >= self.cap:
            return
        for k, w in zip(names, weights):
            self.total[k] = self.total.get(k, 0.0) + float(w)
        ranked = sorted(self.total.items(), key=lambda kv: (-kv[1], kv[0]))
        for k, _ in ranked[:self.n]:
            if len(self.named) < self.cap:
                self.named.add(k)
        if len(self.named) >= self.cap:
            self.total = {}
        elif len(self.total) > RANK_KEEP * max(self.n, 1) * 2:
            self.total = dict(ranked[:RANK_KEEP * self.n])

    def of(self, names):
        """Each name's label: itself if it has one, else `other`."""
        names = pd.Series(names).astype(str)
        return names.where(names.isin(self.named), OTHER).to_numpy()


class LockSeries:
    """Counters per (lock class, VM, type), bounded: the classes and VMs labelled by
    Labels(top_locks) and Labels(top_vms) keep their names, the rest count as `other`.

    add() takes one read's increases (a DataFrame: lock, vm, type, count, total_ns,
    hist: 64 log2 slots, and hist_ns: the time of the waits hist holds, if not
    total_ns); each goes to the series its labels name at that read (a name labelled
    at this read counts under its label from this read on), so every series only
    grows, and every series made is served to the end. The histogram's own count is
    its slots' sum: its +Inf bucket and _count, never below a finite bucket (a read
    between a wait's count and slot adds leaves waits_total a wait ahead or behind
    until the next read)."""

    # acc's columns: count, total_ns, then the histogram's count, its _sum in ns and
    # its cumulative buckets
    N, NS, HN, HNS, B = 0, 1, 2, 3, 4

    def __init__(self, top_locks=TOP_LOCKS, top_vms=TOP_VMS):
        self.locks, self.vms = Labels(top_locks), Labels(top_vms)
        self.acc = {}           # (lock, vm, type) -> the columns above

    def add(self, df):
        if df is None or df.empty:
            return
        w = df["total_ns"].to_numpy(np.float64)
        for labels, col in ((self.locks, "lock"), (self.vms, "vm")):
            g = pd.Series(w).groupby(df[col].astype(str).to_numpy()).sum()
            labels.add(g.index, g.to_numpy())
        keys = pd.MultiIndex.from_arrays([self.locks.of(df["lock"]), self.vms.of(df["vm"]),
                                          df["type"].astype(str).to_numpy()])
        codes, uniq = pd.factorize(keys)
        hist = np.stack(df["hist"].to_numpy()).astype(np.float64)
        hist_ns = df["hist_ns"].to_numpy(np.float64) if "hist_ns" in df else w
        vals = np.column_stack([df["count"].to_numpy(np.float64), w, hist.sum(axis=1),
                                hist_ns, cumulative_buckets(hist)])
        sums = np.zeros((len(uniq), vals.shape[1]))
        np.add.at(sums, codes, vals)
        for key, row in zip(uniq, sums):
            if key in self.acc:
                self.acc[key] += row
            else:
                self.acc[key] = row.copy()

    def rows(self):
        """Every series: [((lock, vm, type), count, total_ns, hist count, hist ns,
        cumulative buckets)]."""
        return [(k, v[self.N], v[self.NS], v[self.HN], v[self.HNS], v[self.B:])
                for k, v in sorted(self.acc.items())]


class OwnerSeries:
    """--lock-owner: waits and wait time per (lock class, owner class), the waits that
    began while an owner of that class held the lock (mutexes, write-held rwsems). The
    lock labels are the lock series' (a class without a label of its own is `other`
    in both); owner classes (owners.owner_class: never a pid) are bounded by
    Labels(top_owners) the same way."""

    def __init__(self, lock_labels, top_owners=TOP_OWNERS):
        self.locks, self.owners = lock_labels, Labels(top_owners)
        self.acc = {}           # (lock, owner) -> [count, total_ns]

    def add(self, df):
        """df: lock, owner (classes), count, total_ns: one read's increases."""
        if df is None or df.empty:
            return
        w = df["total_ns"].to_numpy(np.float64)
        g = pd.Series(w).groupby(df["owner"].astype(str).to_numpy()).sum()
        self.owners.add(g.index, g.to_numpy())
        keys = pd.MultiIndex.from_arrays([self.locks.of(df["lock"]),
                                          self.owners.of(df["owner"])])
        codes, uniq = pd.factorize(keys)
        sums = np.zeros((len(uniq), 2))
        np.add.at(sums, codes, np.column_stack([df["count"].to_numpy(np.float64), w]))
        for key, row in zip(uniq, sums):
            self.acc[key] = self.acc.get(key, 0) + row

    def rows(self):
        return [(k, v[0], v[1]) for k, v in sorted(self.acc.items())]


def owner_increases(cur, prev):
    """Each lock_owners entry's (lock_addr, owner) increase of count and total_ns since
    `prev`; an entry deleted and made again counts whole."""
    if cur is None or cur.empty:
        return pd.DataFrame(columns=["lock_addr", "owner", "count", "total_ns"])
    if prev is None or prev.empty:
        return cur.copy()
    key = ["lock_addr", "owner"]
    m = cur.merge(prev[key + ["count", "total_ns"]], on=key, how="left",
                  suffixes=("", "_prev"))
    out = cur.copy()
    # an entry whose count fell was deleted and made again: it counts whole
    n, n0 = m["count"].to_numpy(np.float64), m["count_prev"].to_numpy(np.float64)
    kept = np.isfinite(n0) & (n >= n0)
    for c in ("count", "total_ns"):
        now, before = m[c].to_numpy(np.float64), m[f"{c}_prev"].to_numpy(np.float64)
        out[c] = np.where(kept, now - before, now)
    return out[(out["count"] > 0) | (out["total_ns"] > 0)].reset_index(drop=True)


class Latencies:
    """Per (probe, what) latency histograms: streamed events' lat_ns/dur_ns added as
    they come, in-kernel kvmlp_lat aggregates (count, total_ns, hist) taken whole."""

    def __init__(self):
        self.streamed = {}      # (probe, table) -> [count, sum_ns, buckets...]
        self.aggregated = {}    # (probe, table) -> the same, the map's latest sums

    def add_events(self, probe, table, ns):
        if not len(ns):
            return
        row = np.concatenate([[len(ns), float(np.sum(ns, dtype=np.float64))],
                              values_buckets(ns)])
        key = (probe, table)
        self.streamed[key] = self.streamed.get(key, 0) + row

    def set_aggregate(self, probe, table, df):
        if df.empty or "hist" not in df.columns:
            return
        hist = np.stack(df["hist"].to_numpy()).sum(axis=0, keepdims=True)
        row = np.concatenate([[df["count"].sum(), df["total_ns"].astype(float).sum()],
                              cumulative_buckets(hist)[0]])
        old = self.aggregated.get((probe, table))
        # (the map only grows; a maximum keeps a counter monotonic if it ever did not)
        self.aggregated[(probe, table)] = row if old is None else np.maximum(old, row)

    def rows(self):
        return [(k, v[0], v[1], v[2:]) for k, v in
                sorted({**self.streamed, **self.aggregated}.items())]


class Snapshot:
    """What collect() serves: built at each read, read by the HTTP thread."""

    def __init__(self):
        self.locks, self.latencies, self.counters, self.ratios = [], [], {}, {}
        self.owners = None      # --lock-owner: OwnerSeries.rows()
        self.status, self.map_entries, self.map_capacity = {}, 0, 0
        self.reads, self.read_seconds, self.gone = 0, 0.0, 0
        self.info = {}


def _buckets(cum):
    """(le, cumulative count) pairs, the bounds written exactly (repr: 1.073741824)."""
    return [(repr(le), c) for le, c in zip(LE_SECONDS, cum)]


def _families(s):
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily, InfoMetricFamily)
    lab = ["lock", "vm", "type"]
    waits = CounterMetricFamily(f"{PREFIX}_lock_waits", "Contended waits (lock:contention_"
                                "end), per lock class, VM and lock type.", labels=lab)
    secs = CounterMetricFamily(f"{PREFIX}_lock_wait_seconds", "Time spent waiting, per lock "
                               "class, VM and lock type.", labels=lab)
    hist = HistogramMetricFamily(f"{PREFIX}_lock_wait_duration_seconds", "Wait durations "
                                 "(le: waits shorter than the bound, from the in-kernel log2 "
                                 "histograms).", labels=lab, unit="")
    for (lock, vm, typ), n, ns, hist_n, hist_ns, b in s.locks:
        labels = [lock, vm, typ]
        waits.add_metric(labels, n)
        secs.add_metric(labels, ns / 1e9)
        hist.add_metric(labels, _buckets(b) + [("+Inf", hist_n)], hist_ns / 1e9)
    yield waits
    yield secs
    yield hist
    if s.owners is not None:
        olab = ["lock", "owner"]
        ow = CounterMetricFamily(f"{PREFIX}_lock_owner_waits", "Waits that began while "
                                 "a task of that owner class held the lock (mutexes, "
                                 "write-held rwsems; --lock-owner), per lock class and owner "
                                 "class.", labels=olab)
        os_ = CounterMetricFamily(f"{PREFIX}_lock_owner_wait_seconds", "Their wait time, "
                                  "per lock class and owner class.", labels=olab)
        for (lock, owner), n, ns in s.owners:
            ow.add_metric([lock, owner], n)
            os_.add_metric([lock, owner], ns / 1e9)
        yield ow
        yield os_
    lat = HistogramMetricFamily(f"{PREFIX}_probe_latency_seconds", "Function-probe "
                                "latencies (what: the probe's table).", labels=["probe", "what"])
    for (probe, what), n, ns, b in s.latencies:
        lat.add_metric([probe, what], _buckets(b) +
                       [("+Inf", n)], ns / 1e9)
    yield lat
    events = CounterMetricFamily(f"{PREFIX}_probe_events", "Each probe's in-kernel event "
                                 "counters.", labels=["probe", "counter"])
    lost = CounterMetricFamily(f"{PREFIX}_lost_events", "Events lost, per probe and reason "
                               "(a full map or ring buffer, a failed stack walk, the "
                               "kernel's recursion misses).", labels=["probe", "reason"])
    for probe, vals in sorted(s.counters.items()):
        for k, v in vals.items():
            if k.startswith("lost") or k == "stack_failures":
                lost.add_metric([probe, k.removeprefix("lost_")], v)
            else:
                events.add_metric([probe, k], v)
    yield events
    yield lost
    hits = CounterMetricFamily(f"{PREFIX}_probe_ratio_hits", "Hits of a probe's ratio "
                               "(divide by ..._ratio_calls_total).", labels=["probe", "ratio"])
    calls = CounterMetricFamily(f"{PREFIX}_probe_ratio_calls", "Calls a probe's ratio is "
                                "taken of.", labels=["probe", "ratio"])
    for (probe, name), (h, n) in sorted(s.ratios.items()):
        hits.add_metric([probe, name], h)
        calls.add_metric([probe, name], n)
    yield hits
    yield calls
    att = GaugeMetricFamily(f"{PREFIX}_probe_attached", "1 if the probe is attached, 0 if "
                            "not (status: attached, unavailable, not requested, failed).",
                            labels=["probe", "method", "status"])
    for probe, st in sorted(s.status.items()):
        att.add_metric([probe, str(st.get("method") or ""), str(st.get("status"))],
                       1.0 if st.get("status") == "attached" else 0.0)
    yield att
    yield GaugeMetricFamily(f"{PREFIX}_aggregate_map_entries", "Entries in the in-kernel "
                            "contention aggregate map (waits are lost when it is full).",
                            value=s.map_entries)
    yield GaugeMetricFamily(f"{PREFIX}_aggregate_map_capacity", "Its size (-M).",
                            value=s.map_capacity)
    yield CounterMetricFamily(f"{PREFIX}_exporter_reads", "Reads of the in-kernel "
                              "aggregates.", value=s.reads)
    yield GaugeMetricFamily(f"{PREFIX}_exporter_read_seconds", "How long the last read "
                            "took.", value=s.read_seconds)
    yield CounterMetricFamily(f"{PREFIX}_exporter_processes_gone", "Processes that exited: "
                              "their counts kept, their kernel entries deleted.", value=s.gone)
    info = InfoMetricFamily(f"{PREFIX}_exporter", "The exporter and its host.")
    info.add_metric([], s.info)
    yield info


class Collector:
    """A prometheus_client custom collector serving the latest Snapshot."""

    def __init__(self):
        self.snapshot, self.lock = Snapshot(), threading.Lock()

    def publish(self, snap):
        with self.lock:
            self.snapshot = snap

    def describe(self):
        return []           # (not collect(): registering must not read anything)

    def collect(self):
        with self.lock:
            s = self.snapshot
        yield from _families(s)


def _hist_counts(df):
    """Each row's histogram total (the waits it holds)."""
    if df.empty:
        return np.zeros(0)
    return np.stack(df["hist"].to_numpy()).astype(np.float64).sum(axis=1)


def _gone(tgids):
    return [t for t in tgids if t and not os.path.exists(f"/proc/{t}")]


class ExporterSession(LiveView):
    """top's live session, read into counters."""
    OWNER_STACKS = False        # its labels are owner classes: no stacks taken

    def __init__(self, sources, status, top_locks=TOP_LOCKS, top_vms=TOP_VMS,
                 top_owners=TOP_OWNERS, **kw):
        super().__init__(sources, status, **kw)
        self.series = LockSeries(top_locks, top_vms)
        self.owner_series = OwnerSeries(self.series.locks, top_owners)
        self.prev_owners = None
        self.latencies = Latencies()
        self.ratios = {}            # (probe, name) -> [hits, calls] since the start
        self.collector = Collector()
        self.reads, self.gone = 0, 0
        c = sources.get("contention")
        self.capacity = c.options["agg_entries"] if c else 0
        from kvmlockprof import __version__
        from kvmlockprof.kernel import host
        self.info = {"version": __version__, "kernel": host.kernel_release(),
                     "probes": ",".join(sorted(n for n, st in status.items()
                                               if st.get("status") == "attached"))}

    def poll_functions(self):
        """Drain the function probes' ring buffers: ratios and latencies of their events
        (at least ten times a second, as record does)."""
        src = self.sources.get("functions")
        if src is None:
            return
        batches = src.poll()
        self._function_events(src, batches, None)

    def _function_events(self, src, batches, snaps):
        for probe in src.plans:
            for ring, table in probe.streams:
                ev = batches.get(table)
                if ev is None or not len(ev):
                    continue
                col = next((c for c in ("lat_ns", "dur_ns") if c in (ev.dtype.names or ())),
                           None)
                if col:
                    self.latencies.add_events(probe.name, table, ev[col])
            if probe.top is None:
                continue
            for name, (hits, total, since_start) in probe.top(batches, snaps or {}).items():
                r = self.ratios.setdefault((probe.name, name), [0, 0])
                if since_start:         # the map's totals: kept, never lowered
                    r[0], r[1] = max(r[0], hits), max(r[1], total)
                elif snaps is None:     # (a stream's: counted at each drain, once)
                    r[0] += hits
                    r[1] += total

    def read(self):
        """One read of every probe: the increases go into the counters, a new snapshot
        is published."""
        t0 = time.monotonic()
        fn_src = self.sources.get("functions")
        fsnaps = fn_src.snapshots() if fn_src else {}
        if fn_src:
            self._function_events(fn_src, fn_src.poll(), None)
            self._function_events(fn_src, {}, fsnaps)
            for probe in fn_src.plans:
                for _, table in probe.aggregates:
                    if table in fsnaps:
                        self.latencies.set_aggregate(probe.name, table,
                                                     fsnaps[table].to_pandas())
        # processes gone before this read: their entries in it are final
        gone = _gone(pd.unique(self.prev_aggs["tgid"]).tolist()) \
            if self.prev_aggs is not None and not self.prev_aggs.empty else []
        aggs = self._read_contention(fsnaps)
        interval = increases(aggs, self.prev_aggs)
        self.series.add(self._labelled(interval))
        self.prev_aggs = self._forget(aggs, gone)
        if gone:
            self.names.retain(self.prev_aggs["lock_addr"].tolist())
        if self.owners_now is not None:
            cur = self.owners_now.to_pandas()
            inc = owner_increases(cur, self.prev_owners)
            self.prev_owners, late = self._forget_owners(cur)
            self.owner_series.add(self._owner_labelled(
                pd.concat([inc, late], ignore_index=True) if not late.empty else inc))
        counters = {name: src.counters() for name, src in self.sources.items()}
        counters = {**counters.pop("functions", {}), **counters}
        self.reads += 1
        snap = Snapshot()
        snap.locks, snap.latencies = self.series.rows(), self.latencies.rows()
        if self.owners_now is not None:
            snap.owners = self.owner_series.rows()
        snap.counters = counters
        snap.ratios = {k: tuple(v) for k, v in self.ratios.items()}
        snap.status, snap.info = self.status, self.info
        snap.map_entries, snap.map_capacity = len(aggs), self.capacity
        snap.reads, snap.gone = self.reads, self.gone
        snap.read_seconds = time.monotonic() - t0
        self.collector.publish(snap)

    def _labelled(self, interval):
        """Increases with their labels: lock class (KVM-aware, no pid), VM, type;
        -L/-Y/-S applied as top applies them."""
        if interval.empty:
            return None
        # (no stacks, hence no caller per read, but for -S: the labels need none)
        stacks = pd.concat(self.stacks, ignore_index=True) \
            if self.stacks and self.filters.get("callstacks") else pd.DataFrame(
                {"source": [], "stack_id": [], "frames": [], "lock_frame": []})
        rec = Recording.from_frames(
            "<live>", {**self.names.manifest(), "processes": self.procs},
            {"aggregates": interval, "stacks": stacks, "contention": pd.DataFrame()})
        df = locks.annotated_aggregates(rec)
        if self.pids:
            df = df[df["tgid"].isin(self.pids)]
        own_n, own_ns = _hist_counts(df), df["total_ns"].to_numpy(np.float64)
        df = df.assign(_own_n=own_n, _own_ns=own_ns)
        if self.filters and any(self.filters.values()):
            df = locks.apply_filters(rec, df, **self.filters)
        if df.empty:
            return None
        # -S spreads the unwalked waits' counts and times over the walked stacks: the
        # histogram's time is its own waits' unless their histogram was spread too
        hist_n = _hist_counts(df)
        hist_ns = np.where(hist_n == df["_own_n"].to_numpy(), df["_own_ns"].to_numpy(),
                           df["total_ns"].to_numpy(np.float64))
        classes = df["lock"].astype(str).map(
            {n: locks.lock_class(n) for n in pd.unique(df["lock"].astype(str))})
        vms = df["tgid"].map(locks.vm_labels(rec))
        vms = vms.astype(object).fillna(df["tgid"].astype(str))
        return pd.DataFrame({"lock": classes.to_numpy(), "vm": vms.to_numpy(),
                             "type": df["type"].astype(str).to_numpy(),
                             "count": df["count"].to_numpy(np.float64),
                             "total_ns": df["total_ns"].to_numpy(np.float64),
                             "hist": df["hist"].to_numpy(), "hist_ns": hist_ns})

    def _owner_labelled(self, inc):
        """Owner increases with their labels: lock class (by address, as the report
        names it), owner class (a vCPU thread: vcpu, else its name without the
        instance part). The user-side -L/-Y/-S are not applied: the owner map keeps
        no stack or type (the kernel-side filters are)."""
        if inc.empty:
            return None
        rec = Recording.from_frames(
            "<live>", {**self.names.manifest(), "processes": self.procs},
            {"aggregates": pd.DataFrame(), "contention": pd.DataFrame()})
        names = locks.lock_names(rec)
        comms = {int(o): (int(p), str(c)) for o, p, c in
                 zip(inc["owner"], inc["owner_tgid"], inc["owner_comm"])}
        vcpu = locks.vcpu_labels(rec, comms)
        lock = [locks.lock_class(names.get(f"{int(a):#x}", f"{int(a):#x}"))
                for a in inc["lock_addr"]]
        owner = [owners.owner_class(comms[int(o)][1], int(o) in vcpu) for o in inc["owner"]]
        return pd.DataFrame({"lock": lock, "owner": owner,
                             "count": inc["count"].to_numpy(np.float64),
                             "total_ns": inc["total_ns"].to_numpy(np.float64)})

    def _forget_owners(self, cur):
        """Delete the lock_owners entries of owner threads gone: the map holds the live
        owners' only, whatever the host's thread churn. Each entry is looked up as it
        is deleted: (the entries kept, the deleted ones' increases since `cur`)."""
        kept, rows, final = self._forget_exited_owners(cur)
        if rows.empty:
            return kept, rows
        return kept, owner_increases(final, rows[["lock_addr", "owner", "count", "total_ns"]])

    def _forget(self, aggs, gone):
        """Delete the kernel entries of processes that had exited before this read
        (their last increase is counted now), so that the map holds the live ones
        only; the aggregates left, for the next read's increases."""
        if aggs.empty or not gone:
            return aggs
        rows = aggs[aggs["tgid"].isin(gone)]
        c = self.sources["contention"].bpf
        for table in ("agg", "first_walked"):
            t = c[table]
            for a, tg, fl, sid in zip(rows["lock_addr"].tolist(), rows["tgid"].tolist(),
                                      rows["flags"].tolist(), rows["stack_id"].tolist()):
                k = t.Key(lock_addr=a, tgid=tg, flags=fl, stack_id=sid)
                try:
                    del t[k]
                except KeyError:
                    pass
        for t in gone:
            self.procs.pop(str(t), None)
        self.gone += len(gone)
        return aggs[~aggs["tgid"].isin(gone)].reset_index(drop=True)


def parse_listen(listen):
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); ValueError with what to give."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: give HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(collector, listen):
    """prometheus_client's HTTP server on `listen`, serving the collector and the
    exporter process's own CPU and memory: (server, thread)."""
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
    host, port = parse_listen(listen)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    ProcessCollector(registry=reg)
    return start_http_server(port, addr=host, registry=reg)


def run(options, pids, listen, interval, top_locks, top_vms, warn, echo, filters=None,
        kfilter=None, top_owners=TOP_OWNERS):
    """A whole exporter session (options: its SessionOptions): listen first (a taken
    port fails before any probe is loaded), attach, read every `interval` until
    SIGTERM/SIGINT/SIGHUP, detach and stop serving whatever happens."""
    collector = Collector()
    server, thread = serve(collector, listen)

    def make_view(sources, status, namers):
        return ExporterSession(sources, status, top_locks=top_locks, top_vms=top_vms,
                               top_owners=top_owners, pids=pids, namers=namers,
                               filters=filters)
    try:
        with live_session(make_view, options, pids, warn, kfilter) as session:
            session.collector = collector
            session.read()
            echo(f"kvmlockprof exporter: serving http://{listen}/metrics "
                 f"(attached: {session.info['probes']})")
            next_read = time.monotonic() + interval
            while True:
                time.sleep(min(0.1, max(0.0, next_read - time.monotonic())))
                if time.monotonic() >= next_read:
                    session.read()
                    next_read += interval
                    if next_read < time.monotonic():    # (a read slower than interval)
                        next_read = time.monotonic() + interval
                else:
                    session.poll_functions()
    except (KeyboardInterrupt, Stop):
        pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
