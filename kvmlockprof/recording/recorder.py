"""`kvmlockprof record`: attach, stream, flush in chunks, detach on every exit path."""
import dataclasses
import datetime
import functools
import json
import os
import signal
import subprocess
import sys
import time

from kvmlockprof import __version__, catalog, lazy
from kvmlockprof.kernel import bpfload, bpfstats, handover, headers, host
from kvmlockprof.kernel.ksyms import Kallsyms
from kvmlockprof.lazy import np
from kvmlockprof.probes.contention import LOSSES
from kvmlockprof.probes.sources import SessionOptions, load_btf, open_sources, waits_source
from kvmlockprof.recording import filters as filters_mod  # Recorder's filters= hides it
from kvmlockprof.recording import processes
from kvmlockprof.recording import store
from kvmlockprof.recording.session import Stop, raise_stop
from kvmlockprof.recording.arrow import to_arrow
from kvmlockprof.recording.locknames import REGISTRY_TABLES, Namers, SessionNames
from kvmlockprof.recording.stacks import new_stack_ids, stack_ids_in, stacks_table
from kvmlockprof.recording.store import Writer, check_output
from kvmlockprof.workload import WORK_ENV

# What SessionNames.update reads of the aggregates (not the histograms: slow to convert)
NAMING_COLUMNS = ["lock_addr", "flags", "stack_id", "tgid", "count"]

# What each handler run costs (bpf_stats, ~90 ns more per run of any BPF program
# while on), sampled: a window opens at the first flush (start-up and every lock's
# first walk are behind) and again every COST_EVERY_S, and the manifest keeps the sum
# of all windows (handler_ns: the floor under every wait it times; probe_cost), so a
# command that starts slowly or changes pace is measured over its whole run. A window
# lasts a second, or until our programs have run COST_MIN_RUNS times (an idle host),
# at most COST_MAX_S.
COST_WINDOW_S = 1.0
COST_EVERY_S = 10.0
COST_MIN_RUNS = 1000
COST_MAX_S = 30.0
# A wait still in progress when the recording stops, begun this long before: a
# deadlock or a very long wait, named in the recording (in_progress) and the report.
IN_PROGRESS_NS = 10**9
REAP_S = 5.0             # for the command to end after SIGTERM, then after SIGKILL


# A snapshot table (the in-kernel aggregates) is rewritten when it changed, at most
# this often but always at the end: its file is only what a killed record leaves,
# and a rewrite costs ~1 ms per 1000 keys (bench/flush_cost.py).
SNAPSHOT_S = 5.0


class Snapshots:
    """Which snapshot tables a flush rewrites (see SNAPSHOT_S)."""

    def __init__(self, writer, every_s=SNAPSHOT_S):
        self.writer, self.every_s = writer, every_s
        self.last = {}                  # table: (when written, what)

    def put(self, table, t, now, final=False):
        when, was = self.last.get(table, (None, None))
        if was is not None and (was.equals(t) or (not final and now - when < self.every_s)):
            return False
        self.writer.snapshot(table, t)
        self.last[table] = (now, t)
        return True


def _lock_addresses(tables):
    """Lock addresses in the tables of probes that declare them (Probe.lock_columns):
    {table: numpy array or Arrow table}."""
    out = set()
    for probe in catalog.CATALOG:
        for table, cols in probe.lock_columns.items():
            t = tables.get(table)
            if t is None or len(t) == 0:
                continue
            for c in cols:
                col = t[c] if isinstance(t, np.ndarray) else t.column(c).to_numpy()
                out.update(np.unique(col).tolist())
    out.discard(0)
    return out


class Recorder:
    def __init__(self, out, session=SessionOptions(), duration=None, pids=(), command=(),
                 system_wide=False, flush_interval=1.0, force=False, progress=None,
                 warn=None, filters=None, labels=None):
        """session: its SessionOptions (the probes and each source's options); filters:
        perf's -L/-Y/-S/--tid/-G as {locks, types, callstacks, tids, cgroups}
        (recording.filters: the kernel applies what it can, the reader the rest).
        Checks what needs no privileges (the probe names, the options, the output
        file) here, before anything is loaded."""
        self.out = out
        self.labels = {k: v for k, v in (labels or {}).items() if v}   # host, run: a fleet's
        self.filters = {k: tuple(v) for k, v in (filters or {}).items() if v}
        self.kfilter, self.read_filter = filters_mod.split(
            **self.filters, kallsyms=Kallsyms)
        self.duration = duration
        self.pids = list(pids)
        self.command = list(command)
        self.system_wide = system_wide
        # a command's children join it, unless processes were named
        self.session = dataclasses.replace(session, contention=dataclasses.replace(
            session.contention, follow_fork=bool(self.command) and not self.pids),
            # what needs resolving (--watch's symbols) is resolved now
            probe_options={name: o.resolved() if hasattr(o, "resolved") else o
                           for name, o in session.probe_options.items()})
        self.flush_interval = flush_interval
        self.force = force
        self.progress = progress
        self.warn = warn or (lambda msg: None)
        self.cost = None                # the handler-cost window while it is open
        self.cost_total, self.cost_seconds, self.next_cost = {}, 0.0, 0.0   # windows' sums
        self.in_progress = None         # waits begun long before the stop, never ended
        self.lock_addrs, self.more_named_for = set(), None   # other probes' lock addresses
        self.session.requested()        # an unknown probe name fails here, early
        check_output(out, force)

    def _filter(self):
        """tgids to keep, or None for system-wide."""
        if self.pids:
            return self.pids
        if self.command and not self.system_wide:
            return []                   # the command's pid is added once it exists
        return None

    def _open_sources(self):
        """The sources, and the lock namers made from the BTF where the probes were
        loaded (the BTF is never read in this process)."""
        tgids = self._filter()
        kbtf = functools.cache(self._btf)           # (read in the child, when needed)
        sources, _, memory, self.namers = open_sources(
            self.session, tgids=tgids, kfilter=self.kfilter, warn=self.warn,
            status=self.manifest["probes"], kbtf=kbtf,
            also=lambda warn: Namers.of(kbtf(), self.manifest.get("kvm_objects")))
        if self.namers.btf_error:
            self.manifest["kvm_objects"] = self.namers.btf_error
        self.manifest["kernel_memory"] = dict(memory, limit_mb=self.session.kernel_mem_mb)
        # what the compile cost, in the loader child that did it (kernel/handover.py)
        self.manifest["loader_peak_rss_kb"] = handover.last_peak_rss_kb
        return sources

    def _btf(self):
        kbtf, error = load_btf(self.warn)
        if error:
            self.manifest["kvm_objects"] = {"error": error}
        return kbtf

    def run(self):
        """Record until the duration ends, the command exits or a signal; return the manifest."""
        self.manifest = self._manifest_head()
        old = {s: signal.signal(s, raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
        self.sources, child = {}, None
        try:
            self.sources = self._open_sources()
            lazy.import_all(pandas=False)
            # counting starts at the attach, not after the set-up below (kallsyms,
            # lock names: a second or more), else the rates read high
            c = self._waits()
            self.manifest["start_monotonic_ns"] = c.armed_ns if c else time.monotonic_ns()
            self.manifest["start"] = datetime.datetime.now().astimezone().isoformat()
            self.ksyms = Kallsyms()
            self.names = SessionNames(self.ksyms, namers=self.namers)
            if c:
                self.names.kernel_namer.run_queues(c.run_queues_or_none(self.warn))
                self.names.slab_lookup = getattr(c, "slab_caches", None)
                if hasattr(c, "take_owner_stacks"):
                    c.take_owner_stacks(self.ksyms.frames)
            bpfload.release_memory()
            self.writer = Writer(self.out)
            self.snapshots = Snapshots(self.writer)
            self.writer.manifest(self.manifest)
            self.seen_stacks = {name: set() for name in self.sources}
            self.named_for = None           # what the lock names were last worked out from
            self.pending = {}
            if self.command:
                child, self.work_fd = self._spawn(self._filter())
            self._loop(child)
        except (KeyboardInterrupt, Stop) as e:
            self.manifest["stopped_by"] = "SIGINT" if isinstance(e, KeyboardInterrupt) else str(e)
        finally:
            try:
                for src in self.sources.values():
                    src.detach()
                if self._waits() and not self._failed():
                    self.in_progress = self._waits().waits_in_progress(
                        self._threads(), IN_PROGRESS_NS)
                    self.manifest["in_progress_min_ns"] = IN_PROGRESS_NS
                if hasattr(self, "writer") and not self._failed():
                    self._flush(final=True)
            finally:
                if self.cost:
                    self.cost.close()
                for src in self.sources.values():
                    src.close()
                if child is not None:
                    self._reap(child)
                for s, h in old.items():
                    signal.signal(s, h)
        if not hasattr(self, "writer"):
            raise KeyboardInterrupt          # stopped before anything was recorded
        if child is not None:
            self.manifest["command_exit_code"] = child.returncode
        self._read_work()
        return self.writer.finalize(self.manifest)

    # --- pieces ----------------------------------------------------------------------

    @staticmethod
    def _failed():
        """Unwinding from an error (not a stop): skip the final flush, which would
        most likely fail the same way (a full disk) and hide the first error."""
        exc = sys.exc_info()[1]
        return exc is not None and not isinstance(exc, (KeyboardInterrupt, Stop))

    def _manifest_head(self):
        return {"format": store.FORMAT, "version": store.VERSION,
                "kvmlockprof_version": __version__,
                "kernel_release": host.kernel_release(),
                "host": self.labels.get("host") or host.hostname(),
                **({"run": self.labels["run"]} if "run" in self.labels else {}),
                "machine": os.uname().machine, "command_line": sys.argv,
                "command": self.command, "pid_filter": self.pids,
                "filters": filters_mod.manifest_entry(self.kfilter, self.read_filter,
                                                      **{k: v for k, v in self.filters.items()
                                                         if k != "callstacks"}),
                "system_wide": self._filter() is None, "duration_requested_s": self.duration,
                "headers": headers.find_headers().describe(), "probes": {}}

    def _spawn(self, tgids):
        """Start the command held at a gate until its pid is in the filter.

        A tiny Python holds it: Popen returns once that has started, and execvp
        keeps the pid, so nothing the command does runs before the filter knows it."""
        # in memory, not on the recording's disk: a full disk (record's error, which
        # stops the command) still gets the work done, and no exit leaves a file behind
        work_fd = os.memfd_create("kvmlockprof-work")
        gate_r, gate_w = os.pipe()
        env = dict(os.environ, **{WORK_ENV: f"/proc/self/fd/{work_fd}"})
        gate = (f"import os, sys; os.read({gate_r}, 1); os.close({gate_r}); "
                "os.execvp(sys.argv[1], sys.argv[1:])")
        try:
            child = subprocess.Popen([sys.executable, "-c", gate, *self.command], env=env,
                                     pass_fds=(gate_r, work_fd))
        except BaseException:
            os.close(work_fd)
            raise
        finally:
            os.close(gate_r)
        if tgids is not None and self._waits():
            self._waits().add_tgids([child.pid])
            self.manifest["pid_filter"] = [child.pid]
        os.write(gate_w, b"1")
        os.close(gate_w)
        self.manifest["command_pid"] = child.pid
        return child, work_fd

    def _cost_window(self, final):
        """Open a handler-cost window at the first flush and every COST_EVERY_S after,
        close each a second later, and keep the sums: the contention handlers' ns
        per run (handler_ns), what each function probe costs (probe_cost: calls/s,
        ns a call, share of one CPU) and each of their programs (program_ns)."""
        c = self._waits()
        f = next((s for s in self.sources.values() if s is not c), None)
        now = time.monotonic()
        if self.cost:
            if final or now >= self.cost_until + COST_MAX_S - COST_WINDOW_S or (
                    now >= self.cost_until and self.cost.runs() >= COST_MIN_RUNS):
                for n, r in self.cost.finish().items():
                    t = self.cost_total.setdefault(n, {"runs": 0, "ns": 0})
                    t["runs"] += r["runs"]
                    t["ns"] += r["ns"]
                self.cost_seconds += self.cost.seconds
                total = {n: dict(t, ns_per_run=t["ns"] / t["runs"] if t["runs"] else None)
                         for n, t in self.cost_total.items()}
                self.manifest["handler_ns"] = {n: total[n] for n in c.prog_fds()} if c else {}
                self.manifest["probe_cost"] = self._probe_cost(total, self.cost_seconds)
                # per function program (one per symbol and method): which entry point costs
                self.manifest["program_ns"] = {n: total[n] for n in self.fn_progs}
                self.cost = None
                self.next_cost = now + COST_EVERY_S
        elif (c or f) and not final and now >= self.next_cost and \
                self.manifest.get("handler_ns", {}).get("error") is None:
            self.fn_progs = f.prog_fds() if f else {}
            self.cost = bpfstats.CostWindow(
                {**(c.prog_fds() if c else {}),
                 **{n: fd for n, (fd, _) in self.fn_progs.items()}})
            self.cost_until = now + COST_WINDOW_S
            if not self.cost.start():
                self.cost = None
                self.manifest["handler_ns"] = {"error": "bpf_stats unavailable (kernel < 5.8)"}

    def _probe_cost(self, runs, seconds):
        """{probe: {"calls_per_s", "ns_per_call", "cpu_share"}}: a program serving
        several probes counts for each."""
        out = {}
        for n, (_, probes) in self.fn_progs.items():
            for p in probes:
                o = out.setdefault(p, {"runs": 0, "ns": 0})
                o["runs"] += runs[n]["runs"]
                o["ns"] += runs[n]["ns"]
        return {p: {"calls_per_s": o["runs"] / seconds,
                    "ns_per_call": o["ns"] / o["runs"] if o["runs"] else None,
                    "cpu_share": o["ns"] / (seconds * 1e9)} for p, o in out.items()}

    def _poll(self):
        for src in self.sources.values():
            for table, batch in src.poll().items():
                if batch.size:
                    self.pending.setdefault(table, []).append(batch)

    def _loop(self, child):
        deadline = time.monotonic() + self.duration if self.duration else None
        next_flush = time.monotonic() + self.flush_interval
        while True:
            now = time.monotonic()
            if deadline and now >= deadline:
                self.manifest["stopped_by"] = "duration"
                break
            if child is not None and child.poll() is not None:
                self.manifest["stopped_by"] = "command exited"
                break
            until = min(next_flush, deadline) if deadline else next_flush
            self._step(max(0.0, min(0.1, until - now)))
            if time.monotonic() >= next_flush:
                self._flush()
                next_flush = time.monotonic() + self.flush_interval

    def _step(self, timeout):
        """Wait up to `timeout` s for samples, then take in what the rings hold."""
        waiter = self._waits()
        if waiter:
            waiter.wait(timeout)        # woken early when its ring fills up
        else:
            time.sleep(timeout)
        self._poll()

    def _flush(self, final=False):
        self._cost_window(final)
        self._poll()
        counters, probe_counters = {}, {}
        contention_aggs, registry = None, {}       # for the lock names
        for name, src in self.sources.items():
            dtypes = src.event_dtypes()
            events = {t: np.concatenate(self.pending.pop(t)) if t in self.pending else
                      np.empty(0, dt) for t, dt in dtypes.items()}
            snaps = src.snapshots()
            if final and src.role == "waits" and self.in_progress is not None:
                snaps["in_progress"] = self.in_progress
            for table, arr in events.items():
                self.writer.append(table, to_arrow(arr))
            new = new_stack_ids(self.seen_stacks[name], stack_ids_in(events, snaps))
            if new:
                stacks = stacks_table(src, name, new, self.ksyms)
                self.writer.append("stacks", stacks)
                if src.role == "waits":
                    self.names.add_stacks(stacks)
            for table, snap in snaps.items():
                if table not in REGISTRY_TABLES:        # those: as lifetimes, below
                    self.snapshots.put(table, snap, time.monotonic(), final)
            self._learn_processes(events, snaps)
            self.lock_addrs |= _lock_addresses({**events, **snaps})
            if src.role == "waits":
                counters = src.counters()
                contention_aggs = snaps["aggregates"]
            else:
                probe_counters.update(src.counters())
                registry = {t: snaps[t] for t in REGISTRY_TABLES if t in snaps}
        if registry:
            # Every VM/vCPU lifetime seen so far, not just those alive now: the
            # recording's vms/vcpus tables keep an address's earlier owners.
            self.names.observe(**registry)
            for table, t in self.names.registry.tables().items():
                self.writer.snapshot(table, t)
        # named again only when a new address or a new VM/vCPU lifetime appears (every
        # address seen so far: a streamed one is in this flush's batch only)
        seen = (len(self.lock_addrs), self.names.registry.version)
        if self.lock_addrs and seen != self.more_named_for:
            self.names.name_more(self.lock_addrs)
            self.more_named_for = seen
        if contention_aggs is not None:
            # Aggregate rows are never removed, so the same row count means the same
            # (lock, process, stack) set, and the same registry version the same
            # owners: nothing new to name (a third of a flush's CPU).
            seen = (contention_aggs.num_rows, self.names.registry.version)
            if seen != self.named_for:
                # (a lock is told when its aggregate row is made: none without a new row)
                self.names.kernel_namer.lock_kinds(self._waits().lock_kinds())
                self.names.update({c: contention_aggs.column(c).to_numpy()
                                   for c in NAMING_COLUMNS})
                self.manifest.update(self.names.manifest())
                self.named_for = seen
            self.manifest["top_lock"] = self._top_lock(contention_aggs)
        elif registry:
            self.manifest.update(self.names.manifest())
        now_ns = time.monotonic_ns()
        self.manifest.update(
            counters=counters, losses={k: counters[k] for k in LOSSES if k in counters},
            probe_counters=probe_counters,
            samples=sum(self.writer.rows.get(t, 0) for t in
                        (self._waits().event_dtypes() if self._waits() else ())),
            end_monotonic_ns=now_ns,
            duration_s=(now_ns - self.manifest["start_monotonic_ns"]) / 1e9,
            end=datetime.datetime.now().astimezone().isoformat(), interrupted=not final)
        self.writer.manifest(self.manifest)
        if self.progress:
            self.progress(self.manifest)

    def _waits(self):
        return waits_source(self.sources)

    def _threads(self):
        """Thread ids of the processes recorded (every thread of the host when
        system-wide)."""
        tgids = self.manifest.get("pid_filter") if not self.manifest.get("system_wide") \
            else None
        out = []
        for tgid in tgids if tgids is not None else \
                [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                out += [int(t) for t in os.listdir(f"/proc/{tgid}/task")]
            except (OSError, ValueError):
                pass
        return out

    def _learn_processes(self, events, snaps):
        """Name the processes seen (events: numpy arrays, snaps: Arrow tables)."""
        tgids = set()
        for arr in events.values():
            if "tgid" in (arr.dtype.names or ()):
                tgids.update(np.unique(arr["tgid"]).tolist())
        for t in snaps.values():
            if "tgid" in t.column_names:
                tgids.update(np.unique(t.column("tgid").to_numpy()).tolist())
        processes.learn(self.manifest.setdefault("processes", {}), tgids)

    def _top_lock(self, aggs):
        """The lock with the most wait so far (for the progress line)."""
        if not aggs.num_rows:
            return None
        addr = aggs.column("lock_addr").to_numpy()
        total = aggs.column("total_ns").to_numpy()
        uniq, inv = np.unique(addr, return_inverse=True)
        sums = np.bincount(inv, weights=total)
        i = int(np.argmax(sums))
        a = f"{int(uniq[i]):#x}"
        return {"lock": self.names.display().get(a, a), "total_ns": int(sums[i])}

    def _reap(self, child):
        """Stop the command; one that SIGKILL does not end either (a thread blocked in
        the kernel for good: the deadlock a recording may be about) is left behind,
        its blocked threads in the manifest, so that the recording still ends."""
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(REAP_S)
            except subprocess.TimeoutExpired:
                child.kill()
                try:
                    child.wait(REAP_S)
                except subprocess.TimeoutExpired:
                    self.manifest["command_stuck"] = {
                        "pid": child.pid, "threads": processes.stuck_threads(child.pid)}

    def _read_work(self):
        fd = getattr(self, "work_fd", None)
        if fd is None:
            return
        try:
            with os.fdopen(fd, "rb") as f:          # (closes it)
                text = f.read()
            if text:
                self.manifest["work"] = json.loads(text)
        except (OSError, ValueError):
            pass
