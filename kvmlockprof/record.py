"""`kvmlockprof record`: attach, stream, flush in chunks, detach on every exit path."""
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from . import __version__, host
from .ksyms import Kallsyms
from .probes.contention import (LOSSES, ContentionProbe, new_stack_ids, samples_table,
                                stacks_table)
from .recording import Writer, check_output

WORK_ENV = "KVMLOCKPROF_WORK_OUT"     # the built-in workload writes its WorkDone here


class Stop(Exception):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so that `finally` detaches the probes."""


def _raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


class Recorder:
    def __init__(self, out, duration=None, pids=(), command=(), system_wide=False,
                 sample_every=1, flush_interval=1.0, force=False, progress=None,
                 ringbuf_mb=16):
        self.out = out
        self.duration = duration
        self.pids = list(pids)
        self.command = list(command)
        self.system_wide = system_wide
        self.sample_every = sample_every
        self.flush_interval = flush_interval
        self.force = force
        self.progress = progress
        self.ringbuf_mb = ringbuf_mb
        check_output(out, force)

    def _filter(self):
        """tgids to keep, or None for system-wide."""
        if self.pids:
            return self.pids
        if self.command and not self.system_wide:
            return []                   # the command's pid is added once it exists
        return None

    def run(self):
        """Record until the duration ends, the command exits or a signal; return the manifest."""
        self.manifest = self._manifest_head()
        old = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
        probe = child = None
        try:
            tgids = self._filter()
            probe = ContentionProbe(tgids=tgids, follow_fork=bool(self.command) and not
                                    self.pids, sample_every=self.sample_every,
                                    ringbuf_mb=self.ringbuf_mb)
            self.manifest["probes"] = {"contention": {
                "status": "attached", "method": "tracepoint",
                "targets": sorted(probe.attached), **probe.options}}
            self.ksyms = Kallsyms()
            self.writer = Writer(self.out)
            self.writer.manifest(self.manifest)
            self.seen_stacks = set()
            self.manifest["start_monotonic_ns"] = time.monotonic_ns()
            self.manifest["start"] = datetime.datetime.now().astimezone().isoformat()
            if self.command:
                child, self.work_file = self._spawn(probe, tgids)
            self._loop(probe, child)
        except (KeyboardInterrupt, Stop) as e:
            self.manifest["stopped_by"] = "SIGINT" if isinstance(e, KeyboardInterrupt) else str(e)
        finally:
            try:
                if probe is not None:
                    probe.detach()
                    if hasattr(self, "writer"):
                        self._flush(probe, final=True)
            finally:
                if probe is not None:
                    probe.close()
                if child is not None:
                    self._reap(child)
                for s, h in old.items():
                    signal.signal(s, h)
        if child is not None:
            self.manifest["command_exit_code"] = child.returncode
        self._read_work()
        return self.writer.finalize(self.manifest)

    # --- pieces ----------------------------------------------------------------------

    def _manifest_head(self):
        return {"format": "kvmlockprof-recording", "version": 1,
                "kvmlockprof_version": __version__,
                "kernel_release": host.kernel_release(), "host": host.hostname(),
                "machine": os.uname().machine, "command_line": sys.argv,
                "command": self.command, "pid_filter": self.pids,
                "system_wide": self._filter() is None, "duration_requested_s": self.duration,
                "headers": host.find_headers().describe(), "probes": {}}

    def _spawn(self, probe, tgids):
        """Start the command held at a gate until its pid is in the filter.

        A tiny Python holds it: Popen returns once that has started, and execvp
        keeps the pid, so nothing the command does runs before the filter knows it."""
        fd, work_file = tempfile.mkstemp(prefix="kvmlockprof-work-", suffix=".json")
        os.close(fd)
        gate_r, gate_w = os.pipe()
        env = dict(os.environ, **{WORK_ENV: work_file})
        gate = (f"import os, sys; os.read({gate_r}, 1); os.close({gate_r}); "
                "os.execvp(sys.argv[1], sys.argv[1:])")
        try:
            child = subprocess.Popen([sys.executable, "-c", gate, *self.command], env=env,
                                     pass_fds=(gate_r,))
        finally:
            os.close(gate_r)
        if tgids is not None:
            probe.add_tgids([child.pid])
            self.manifest["pid_filter"] = [child.pid]
        os.write(gate_w, b"1")
        os.close(gate_w)
        self.manifest["command_pid"] = child.pid
        return child, work_file

    def _loop(self, probe, child):
        deadline = time.monotonic() + self.duration if self.duration else None
        next_flush = time.monotonic() + self.flush_interval
        self.pending = []
        while True:
            now = time.monotonic()
            if deadline and now >= deadline:
                self.manifest["stopped_by"] = "duration"
                break
            if child is not None and child.poll() is not None:
                self.manifest["stopped_by"] = "command exited"
                break
            timeout = min(0.1, next_flush - now, (deadline - now) if deadline else 0.1)
            probe.wait(max(0.0, timeout))
            batch = probe.poll()
            if batch.size:
                self.pending.append(batch)
            if time.monotonic() >= next_flush:
                self._flush(probe)
                next_flush = time.monotonic() + self.flush_interval

    def _flush(self, probe, final=False):
        batch = probe.poll()
        if batch.size:
            self.pending.append(batch)
        events = np.concatenate(self.pending) if self.pending else \
            np.empty(0, probe.event_dtype)
        self.pending = []
        aggs = probe.aggregates()
        new = new_stack_ids(self.seen_stacks, events["stack_id"],
                            aggs.column("stack_id").to_numpy())
        self.writer.append("contention", samples_table(events))
        if new:
            self.writer.append("stacks", stacks_table(probe, new, self.ksyms))
        self.writer.snapshot("aggregates", aggs)
        counters = probe.counters()
        now_ns = time.monotonic_ns()
        self.manifest.update(
            counters=counters, losses={k: counters[k] for k in LOSSES},
            samples=self.writer.rows.get("contention", 0),
            end_monotonic_ns=now_ns,
            duration_s=(now_ns - self.manifest["start_monotonic_ns"]) / 1e9,
            end=datetime.datetime.now().astimezone().isoformat(),
            lock_symbols=self._lock_symbols(aggs), interrupted=not final)
        self.writer.manifest(self.manifest)
        if self.progress:
            self.progress(self.manifest)

    def _lock_symbols(self, aggs):
        addrs = np.unique(aggs.column("lock_addr").to_numpy()) if aggs.num_rows else []
        names = self.ksyms.data_symbols(addrs)
        return {f"{a:#x}": n for a, n in zip(np.asarray(addrs).tolist(), names) if n}

    def _reap(self, child):
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def _read_work(self):
        path = getattr(self, "work_file", None)
        if not path:
            return
        try:
            with open(path) as f:
                text = f.read()
            if text:
                self.manifest["work"] = json.loads(text)
        except (OSError, ValueError):
            pass
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
