"""An ftrace instance of the tests' own: the kernel's tracepoints recorded by the
kernel's tracer (trace_clock mono, CLOCK_MONOTONIC as bpf_ktime_get_ns), read back
as (tid, tgid, ts_ns, event, {field: int}) in time order: no project code involved."""
import os
import re

from kvmlockprof.kernel import tracefs

_FIELD = re.compile(r"(\w+)=(0x[0-9a-f]+|-?\d+)")
_EVENT = re.compile(r"\d: (\w+): ")        # "... 9237.124334: sys_enter_ioctl: ..."


class Ftrace:
    def __init__(self, name, events, buffer_kb=65536):
        """events: {"category/event": filter expression or None}."""
        self.dir = os.path.join(tracefs.tracefs_path(), "instances", name)
        self.events_on = list(events)
        os.mkdir(self.dir)
        self._write("trace_clock", "mono")
        self._write("buffer_size_kb", str(buffer_kb))
        self._write("options/hash-ptr", "0")
        self._write("options/record-tgid", "1")
        for e, flt in events.items():
            if flt:
                self._write(f"events/{e}/filter", flt)
            self._write(f"events/{e}/enable", "1")

    def _write(self, f, v):
        with open(os.path.join(self.dir, f), "w") as fh:
            fh.write(v)

    def _read(self, f):
        with open(os.path.join(self.dir, f)) as fh:
            return fh.read()

    def stop(self):
        self._write("tracing_on", "0")

    def events(self):
        """The buffer read twice, raw (ns timestamps, tid) and with fields: the same
        events in the same order."""
        self._write("options/raw", "1")
        raw = [ln for ln in self._read("trace").splitlines() if not ln.startswith("#")]
        self._write("options/raw", "0")
        self._write("options/fields", "1")
        text = [ln for ln in self._read("trace").splitlines() if not ln.startswith("#")]
        self._write("options/fields", "0")
        assert len(raw) == len(text)
        tgids = {}
        with open(os.path.join(tracefs.tracefs_path(), "saved_tgids")) as fh:
            saved = fh.read()                   # (one table for every instance)
        for line in saved.splitlines():
            pid, tgid = line.split()
            tgids[int(pid)] = int(tgid)
        out = []
        for r, t in zip(raw, text):
            pid, cpu, ts = r.split()[:3]
            rest = t.partition("] ")[2]
            ev = _EVENT.search(rest).group(1)
            fields = {k: int(v, 0) for k, v in _FIELD.findall(t.split(ev + ": ", 1)[1])}
            # the tracer's own context flags (irq-info: "d.h1."): its third says
            # hardirq (h, H), softirq (s) or NMI (z, Z)
            flags = rest.split()[0]
            fields["__cpu"] = int(cpu.strip("[]"))
            fields["__irq"] = int(len(flags) >= 3 and flags[2] in "hHszZ")
            out.append((int(pid), tgids.get(int(pid), -1), int(ts), ev, fields))
        return out

    def overruns(self):
        return sum(int(m) for m in re.findall(r"^overrun: (\d+)",
                                              "".join(self._read(f"per_cpu/{c}/stats")
                                                      for c in os.listdir(
                                                          os.path.join(self.dir, "per_cpu"))),
                                              re.M))

    def remove(self):
        for e in self.events_on:
            self._write(f"events/{e}/enable", "0")
        os.rmdir(self.dir)
