"""`kvmlockprof top`: a live view of the in-kernel aggregates, like kvm_stat.

Nothing is streamed for contention (aggregates only): each refresh reads the
aggregate map, subtracts the previous read for the last interval, and runs the
same locks.top() as `report` on both. Function probes show their counters'
rates and the fast-path / cache hit ratios, over the interval and cumulative."""
import os
import time

from kvmlockprof.analysis import locks, owners
from kvmlockprof.lazy import np, pd
from kvmlockprof.views import report
from kvmlockprof.analysis import vcpus
from kvmlockprof.probes.contention import VCPU_TABLES
from kvmlockprof.probes.sources import waits_source
from kvmlockprof.kernel import host
from kvmlockprof.kernel.ksyms import Kallsyms
from kvmlockprof.recording import processes
from kvmlockprof.recording.locknames import REGISTRY_TABLES, SessionNames
from kvmlockprof.recording.session import Stop, live_session
from kvmlockprof.recording.stacks import new_stack_ids, stacks_table
from kvmlockprof.recording.store import Recording
from kvmlockprof.views.report import fmt_ns

AGG_KEYS = ["lock_addr", "tgid", "flags", "stack_id"]
GONE_OWNERS_KEPT = 100  # top's owners since the start: the heaviest exited ones kept


def threads_gone(pairs):
    """The tids of (tgid, tid) pairs whose thread has exited."""
    return [t for p, t in pairs if not p or not os.path.exists(f"/proc/{p}/task/{t}")]
SORTS = list(locks.SORT_KEYS)
BYS = [g for g in locks.GROUPS if g != "thread"]       # (aggregates are per process)


def _counted_since(cur, prev):
    """Counting tables (every numeric column not in the key a sum) less an earlier
    read: what was counted since."""
    if prev is None or prev.empty or cur.empty:
        return cur
    sums = [c for c in ("count", "time_ns", "wait_ns", "waits") if c in cur]
    keys = [c for c in cur.columns if c not in sums]
    m = cur.merge(prev[keys + sums], on=keys, how="left", suffixes=("", "_prev"))
    for c in sums:
        m[c] = m[c] - m[c + "_prev"].fillna(0).astype(m[c].dtype)
    return m[cur.columns]


def _delta(cur, prev):
    """Aggregates accumulated since `prev` (both DataFrames of the agg map)."""
    if prev is None or prev.empty or cur.empty:
        return cur
    m = cur.merge(prev[AGG_KEYS + ["count", "total_ns", "hist"]], on=AGG_KEYS, how="left",
                  suffixes=("", "_prev"))
    seen = m["count_prev"].notna()
    out = m[AGG_KEYS + ["count", "total_ns", "max_ns", "min_ns", "hist"]].copy()
    out.loc[seen, "count"] = m.loc[seen, "count"] - m.loc[seen, "count_prev"].astype("uint64")
    out.loc[seen, "total_ns"] = (m.loc[seen, "total_ns"] -
                                 m.loc[seen, "total_ns_prev"].astype("uint64"))
    if seen.any():
        cur_h = np.stack(m.loc[seen, "hist"].to_numpy())
        prev_h = np.stack(m.loc[seen, "hist_prev"].to_numpy())
        out.loc[seen, "hist"] = pd.Series(list(cur_h - prev_h), index=out.index[seen])
    return out[out["count"] > 0].reset_index(drop=True)


class LiveView:
    """State of a live session: previous reads, names learnt so far."""
    OWNER_STACKS = True         # --lock-owner: where sleeping owners are (the exporter: no)

    def __init__(self, sources, status, by="lock", sort="total", limit=20, pids=None,
                 kbtf=None, filters=None, namers=None):
        self.sources, self.status = sources, status
        self.filters = filters or {}            # -L/-Y/-S, as report's
        self.by, self.sort, self.limit, self.pids = by, sort, limit, pids
        self.ksyms = Kallsyms()
        self.stacks, self.seen_stacks = [], set()
        self.names = SessionNames(self.ksyms, kbtf, namers)
        waits = waits_source(sources)
        if waits:
            self.names.kernel_namer.run_queues(waits.run_queues_or_none())
            self.names.slab_lookup = getattr(waits, "slab_caches", None)
            if self.OWNER_STACKS and hasattr(waits, "take_owner_stacks"):
                waits.take_owner_stacks(self.ksyms.frames)
        self.procs = {}
        self.prev_aggs, self.prev_counters = None, {}
        self.vcpu_now, self.vcpu_prev = {}, {}       # --vcpu-exits' tables
        self.owners_now = self.owner_stacks_now = None
        self.gone_owners = None         # lock_owners rows of exited owners (top)
        self.hits = {}          # name -> [interval hits, interval total, cum hits, cum total]
        self.t0 = self.t_prev = time.monotonic()
        self.header = f"{host.hostname()}  kernel {host.kernel_release()}"

    # --- reading --------------------------------------------------------------------

    def _read_contention(self, fsnaps):
        src = self.sources.get("contention")
        if src is None:
            return pd.DataFrame()
        src.poll()                                  # nothing streams (aggregates only)
        snaps = src.snapshots()
        aggs = snaps["aggregates"]
        self.vcpu_now = {t: snaps[t].to_pandas() for t in VCPU_TABLES if t in snaps}
        self.owners_now = snaps.get("lock_owners")      # --lock-owner
        self.owner_stacks_now = snaps.get("owner_stacks")
        new = new_stack_ids(self.seen_stacks, aggs.column("stack_id").to_numpy())
        if new:
            self.stacks.append(stacks_table(src, "contention", new, self.ksyms).to_pandas())
            self.names.add_stacks(self.stacks[-1])
        df = aggs.to_pandas()
        self.names.kernel_namer.lock_kinds(src.lock_kinds())
        self.names.update(df, **{t: fsnaps.get(t) for t in REGISTRY_TABLES})
        processes.learn(self.procs, np.unique(aggs.column("tgid").to_numpy()).tolist())
        return df

    def _recording(self, aggs):
        stacks = pd.concat(self.stacks, ignore_index=True) if self.stacks else pd.DataFrame(
            {"source": [], "stack_id": [], "frames": [], "lock_frame": []})
        return Recording.from_frames(
            "<live>", {**self.names.manifest(), "processes": self.procs},
            {"aggregates": aggs, "stacks": stacks, "contention": pd.DataFrame()})

    def _ratio(self, name, hits, total):
        """One interval's hits of total."""
        h = self.hits.setdefault(name, [0, 0, 0, 0])
        h[0], h[1] = hits, total
        h[2] += hits
        h[3] += total

    def _totals(self, name, hits, total):
        """Hits of total counted since the start: the interval's are the difference."""
        h = self.hits.setdefault(name, [0, 0, 0, 0])
        h[:] = [hits - h[2], total - h[3], hits, total]

    def _read_functions(self, dt, snaps):
        """Lines for the function probes: counter rates, hit ratios (snaps: their
        aggregate and registry maps, read once per refresh)."""
        src = self.sources.get("functions")
        lines = []
        if src is None:
            return lines
        batches = src.poll()
        for probe in src.plans:
            for name, (hits, total, since_start) in (probe.top(batches, snaps) if probe.top
                                                     else {}).items():
                if since_start:
                    self._totals(name, hits, total)
                else:
                    self._ratio(name, hits, total)
        counters = src.counters()
        for probe, vals in counters.items():
            prev = self.prev_counters.get(probe, {})
            parts = [f"{k} {(v - prev.get(k, 0)) / dt:,.0f}/s ({v:,})"
                     for k, v in vals.items() if not k.startswith("lost") or v]
            lines.append(f"  {probe:<10} " + "  ".join(parts))
            self.prev_counters[probe] = vals
        for name, (h, n, ch, cn) in self.hits.items():
            cur = f"{h / n:.1%}" if n else "-"
            lines.append(f"  {name} hit ratio: {cur} last interval, "
                         f"{ch / cn:.1%} of {cn:,} in all" if cn else f"  {name}: no calls yet")
        return lines

    # --- one refresh ----------------------------------------------------------------

    def refresh(self):
        """The screen's lines for now."""
        now = time.monotonic()
        dt = max(now - self.t_prev, 1e-3)
        self.t_prev = now
        fn_src = self.sources.get("functions")
        fsnaps = fn_src.snapshots() if fn_src else {}
        aggs = self._read_contention(fsnaps)
        interval = _delta(aggs, self.prev_aggs)
        self.prev_aggs = aggs
        lines = [f"kvmlockprof top  {self.header}  up {now - self.t0:.0f} s  "
                 f"by {self.by}  sort {self.sort}"
                 f"{'  pid ' + ','.join(map(str, self.pids)) if self.pids else ''}"
                 f"   [q quit  s sort  b by]"]
        lines += self._probe_status()
        lines.append("")
        lines += self._table(aggs, interval, dt)
        lines += self._vcpu_lines(aggs)
        lines += self._owner_lines(aggs)
        fn = self._read_functions(dt, fsnaps)
        if fn:
            lines += ["", "function probes (rate over the last interval, total):"] + fn
        return lines

    def _forget_exited_owners(self, cur):
        """Delete the kernel's entries (lock_owners, and the stacks they slept at) of
        the owner threads in `cur` (lock_owners as read) that have exited, so its maps
        hold the live owners only however long a session runs. Each entry is looked up
        as it is deleted: (cur less them, their rows as read, their rows as deleted)."""
        gone = threads_gone(set(zip(cur["owner_tgid"].tolist(), cur["owner"].tolist())))
        if not gone:
            return cur, cur.iloc[:0], cur.iloc[:0]
        rows = cur[cur["owner"].isin(gone)]
        last = pd.DataFrame(self.sources["contention"].forget_owners(
            zip(rows["lock_addr"].tolist(), rows["owner"].tolist())),
            columns=["lock_addr", "owner", "count", "total_ns"])
        final = last.merge(rows.drop(columns=["count", "total_ns"]), on=["lock_addr", "owner"])
        return cur[~cur["owner"].isin(gone)].reset_index(drop=True), rows, final

    def _owners_since_start(self):
        """lock_owners since the start: the live owners as the kernel holds them and
        the heaviest GONE_OWNERS_KEPT exited ones, kept here as last read."""
        cur, _, final = self._forget_exited_owners(self.owners_now.to_pandas())
        if not final.empty:
            self.gone_owners = pd.concat([self.gone_owners, final], ignore_index=True) \
                .nlargest(GONE_OWNERS_KEPT, "total_ns")         # (concat skips a None)
        if self.gone_owners is None:
            return cur
        return pd.concat([cur, self.gone_owners[cur.columns]], ignore_index=True)

    def _owner_lines(self, aggs):
        """--lock-owner: the heaviest owners since the start (analysis.owners, as report)."""
        if self.owners_now is None:
            return []
        rec = Recording.from_frames(
            "<live>", {**self.names.manifest(), "processes": self.procs},
            {"aggregates": aggs, "lock_owners": self._owners_since_start(),
             **({"owner_stacks": self.owner_stacks_now.to_pandas()}
                if self.owner_stacks_now is not None else {})})
        df = owners.lock_owners(rec)
        at = owners.slept_at(rec)
        if df.empty:
            return ["", "lock owners: no owned wait yet"]
        lines = ["", "who held the sleeping locks (since the start): lock, its owner, "
                 "the share of the lock's wait time behind it"]
        for r in df.head(min(self.limit, 5)).itertuples(index=False):
            share = f"{r.share:.0%}" if r.share == r.share and r.share is not None else "-"
            where = at.get((r.lock, r.owner), "")
            lines.append(f"  {r.lock:<32} {share:>5} behind {r.owner} ({r.vm}), "
                         f"{r.waits:,} waits" + (f", asleep at {where}" if where else ""))
        return lines

    def _vcpu_lines(self, aggs):
        """Per vCPU: the share of its time in the host spent waiting, last interval and
        since the start, and the lock it waited on most (analysis.vcpus, as report)."""
        if not self.vcpu_now:
            return []
        now, prev = self.vcpu_now, self.vcpu_prev
        self.vcpu_prev = now
        manifest = {**self.names.manifest(), "processes": self.procs,
                    "probes": {"contention": self.status.get("contention", {})}}
        stacks = pd.DataFrame({"source": [], "stack_id": [], "frames": [], "lock_frame": []})

        def rec(tables):
            return Recording.from_frames("<live>", manifest,
                                         {"aggregates": aggs, "stacks": stacks, **tables})
        cum = rec(now)
        last = vcpus.vcpu_impact(rec({t: _counted_since(now[t], prev.get(t))
                                      for t in now})).set_index("tid")["wait_share"]
        impact = vcpus.vcpu_impact(cum)
        if impact.empty:
            return ["", "per-vCPU impact: no vCPU window yet"]
        shares = vcpus.vcpu_lock_share(cum).drop_duplicates("vcpu").set_index("vcpu")
        lines = ["", f"per-vCPU impact ({impact['window'].iloc[0]} windows): the share of "
                 f"each vCPU's time in the host spent waiting, and on which lock most"]
        for r in impact.head(self.limit).itertuples(index=False):
            cur = last.get(r.tid, float("nan"))
            top_lock = f"{shares.at[r.vcpu, 'lock']} {shares.at[r.vcpu, 'wait_share']:.1%}" \
                if r.vcpu in shares.index else "-"
            cur = f"{cur:.1%}" if cur == cur else "-"
            lines.append(f"  {r.vcpu[:30]:<30} {cur:>7} last interval {r.wait_share:>7.1%} "
                         f"in all  {top_lock}")
        return lines

    def _probe_status(self):
        return report.probe_lines(self.status, more="`kvmlockprof doctor`")

    def _table(self, aggs, interval, dt):
        key = locks.group_keys(self.by)
        cum = locks.top(self._recording(aggs), by=self.by, pids=self.pids,
                        filters=self.filters)
        cur = locks.top(self._recording(interval), by=self.by, pids=self.pids,
                        filters=self.filters)
        if cum.empty:
            return ["(no contention yet)"]
        sort_col = locks.SORT_KEYS[self.sort]
        now = cur[key].assign(now_waits=cur["contended"], now_ns=cur["total_ns"],
                              now_sort=cur[sort_col])
        df = cum.merge(now, on=key, how="left").fillna({"now_waits": 0, "now_ns": 0,
                                                         "now_sort": 0})
        df = df.sort_values(["now_sort", sort_col], ascending=False, kind="stable")
        df = df.head(self.limit)
        # the row's name first: it survives a narrow terminal
        head = {"lock": "lock", "address": "lock (address)", "caller": "caller",
                "process": "VM / process"}[self.by]
        other = "caller" if self.by in ("lock", "address") else "lock"
        lines = [f"{head:<34} {'type':>10} K {'waits/s':>8} {'wait/s':>10} | {'waits':>9} "
                 f"{'total':>10} {'max':>10} {'p99':>11}  {other}"]
        for r in df.itertuples(index=False):
            name = {"lock": r.lock, "address": r.lock, "caller": r.caller,
                    "process": f"{r.vm} ({r.tgid})"}[self.by]
            waits = ("~" if r.estimated else "") + f"{r.contended:,}"     # ~: estimate
            lines.append(f"{str(name)[:34]:<34} {r.type:>10} {'K' if r.kvm else ' '} "
                         f"{r.now_waits / dt:>8,.0f} {fmt_ns(r.now_ns / dt):>10} | "
                         f"{waits:>9} {fmt_ns(r.total_ns):>10} {fmt_ns(r.max_ns):>10} "
                         f"{fmt_ns(r.p99_ns, not r.pct_exact):>11}  "
                         f"{r.caller if other == 'caller' else r.lock}")
        return lines

    def cycle(self, what):
        if what == "sort":
            self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        else:
            self.by = BYS[(BYS.index(self.by) + 1) % len(BYS)]


def run(session, pids, by, sort, limit, interval, iterations, batch, warn, echo,
        filters=None, kfilter=None):
    """A whole `top` session: refresh until q, Ctrl-C, SIGTERM/SIGHUP or `iterations`."""

    def make_view(sources, status, namers):
        return LiveView(sources, status, by=by, sort=sort, limit=limit, pids=pids,
                        namers=namers, filters=filters)
    try:
        with live_session(make_view, session, pids, warn, kfilter) as view:
            if batch:
                run_batch(view, interval, iterations, echo)
            else:
                run_curses(view, interval, iterations)
    except (KeyboardInterrupt, Stop):
        pass


def run_batch(view, interval, iterations, echo):
    """Plain text frames (not a terminal, or --batch), like `top -b`."""
    n = 0
    while not iterations or n < iterations:
        time.sleep(interval)
        echo("\n".join(view.refresh()) + "\n")
        n += 1


def run_curses(view, interval, iterations):
    import curses

    def loop(scr):
        curses.curs_set(0)
        scr.timeout(100)
        n, lines, next_t = 0, ["kvmlockprof top: first refresh in "
                               f"{interval:g} s ..."], time.monotonic() + interval
        while True:
            if time.monotonic() >= next_t:
                lines = view.refresh()
                n += 1
                next_t = time.monotonic() + interval
            _draw(scr, lines)
            if iterations and n >= iterations:
                return
            ch = scr.getch()
            if ch in (ord("q"), ord("Q")):
                return
            if ch in (ord("s"), ord("b")):
                view.cycle("sort" if ch == ord("s") else "by")
                next_t = time.monotonic()
    curses.wrapper(loop)


def _draw(scr, lines):
    import curses
    h, w = scr.getmaxyx()
    scr.erase()
    for y, line in enumerate(lines[:h]):
        try:
            scr.addnstr(y, 0, line, w - 1)
        except curses.error:
            pass
    scr.refresh()
