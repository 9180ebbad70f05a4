"""Overhead of `kvmlockprof record` in aggregate mode, resolved to ~1%: its contention
probe attached and detached every half second under the built-in workload, hundreds of
times.

bench/overhead.py starts and stops whole profiler processes, so its windows are
seconds long and few, and this host's work rate swings by 10-25% within seconds:
30 rounds resolve about +-5%. Here one `record` runs (record.Recorder, as the command
line makes it: --probes contention, aggregates only, the default --stack-budget), and
its contention tracepoints are attached and detached in turn, off, on, off, on, ...
every --window s. While attached, record's own loop runs: it polls the ring every
0.1 s and flushes (the aggregates read and written as Parquet, new stacks symbolised
and written, lock names, the manifest) once per --flush s of attached time, so all
of record's CPU but its start-up is in the cost. A window is measured from --settle s
after its attach or detach returned (a detach waits out an RCU grace period) to the
next toggle, from the workload's progress reports. Each attached window's rate over
the mean of the detached windows beside it (geometric mean) is one ratio; the result
is their geometric mean with a bootstrap 95% interval (bench/overhead.py says why not
the median).

Several stack budgets (--stack-budget 250,50) take the attached windows in turn,
set while detached: each is measured against the same workload minutes, and
each pair of neighbouring attached windows gives a paired ratio between them,
which resolves what two sequential runs (1-3% apart on this host) cannot.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from overhead import (KLP, WORK, Progress, cpu_seconds, geomean_ci,  # noqa: E402
                      log_ratios_aligned)
from results_io import RESULTS, save                      # noqa: E402
from kvmlockprof.probes.contention import STACK_BUDGET, ContentionOptions  # noqa: E402
from kvmlockprof.probes.sources import SessionOptions  # noqa: E402
from kvmlockprof.recording.recorder import Recorder                  # noqa: E402


def span_rates(history, spans):
    """Work per second in each (t0, t1) span, between the first and last progress
    report inside it (None with fewer than two)."""
    rows = np.array([(p["t"],) + tuple(p[k] for k in WORK) for p in history])
    out = []
    for t0, t1 in spans:
        i = np.searchsorted(rows[:, 0], t0, side="left")
        j = np.searchsorted(rows[:, 0], t1, side="right")
        out.append(None if j - i < 2 else
                   (rows[j - 1, 1:] - rows[i, 1:]) / (rows[j - 1, 0] - rows[i, 0]))
    return out


class ToggledRecord(Recorder):
    """`record` whose loop attaches and detaches its contention probe in turn."""

    def __init__(self, out, windows, window, settle, flush, on_window, budgets,
                 sample_every, stack_every):
        session = SessionOptions(probes=("contention",), contention=ContentionOptions(
            stack_budget=budgets[0], sample_every=sample_every, stack_every=stack_every))
        super().__init__(out, session, system_wide=True, force=True, flush_interval=flush)
        self.windows, self.window, self.settle = windows, window, settle
        self.budgets = budgets              # the attached windows' stack budgets, in turn
        self.on_window = on_window          # (budget or None, t0, t1) after each window
        self.owed = 0.0                     # attached seconds since the last flush

    def _serve(self, until):
        """record's loop (Recorder._loop) until `until`, flushing once per
        flush_interval of attached time."""
        start = time.monotonic()
        while (now := time.monotonic()) < until:
            self._step(max(0.0, min(0.1, until - now)))
            if self.owed + time.monotonic() - start >= self.flush_interval:
                self._flush()
                self.owed, start = 0.0, time.monotonic()
        self.owed += time.monotonic() - start

    def _loop(self, child):
        probe = self.sources["contention"]
        probe.detach()
        time.sleep(2)                                   # the workload warms up
        for i in range(2 * self.windows + 1):
            on = i % 2 == 1
            budget = self.budgets[(i // 2) % len(self.budgets)] if on else None
            if on:
                probe.set_stack_budget(budget)
            if i:
                (probe.attach if on else probe.detach)()
            t0 = time.monotonic() + self.settle
            t1 = t0 - self.settle + self.window
            if on:
                self._serve(t1)
            else:
                time.sleep(max(0.0, t1 - time.monotonic()))
            self.on_window(budget, t0, t1)
            if i and i % 200 == 0:
                print(f"{i // 2}/{self.windows} windows", flush=True)
        self.manifest["stopped_by"] = "bench"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=1200, help="attached windows")
    ap.add_argument("--window", type=float, default=0.5, help="seconds per window")
    ap.add_argument("--settle", type=float, default=0.1)
    ap.add_argument("--flush", type=float, default=1.0)
    ap.add_argument("--stack-budget", default=str(STACK_BUDGET),
                    help="walks/s per CPU; several (250,50): the attached windows take "
                         "them in turn, and each is compared with the first")
    ap.add_argument("--stack-every", type=int, default=1,
                    help="as record's (a huge N: no stack walks, to price them)")
    ap.add_argument("--sample-every", type=int, default=0)
    ap.add_argument("--workload", default="--vcpus 2 --churn")
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "overhead-toggle.json"))
    a = ap.parse_args()
    budgets = [int(b) for b in a.stack_budget.split(",")]
    duration = a.windows * 2 * a.window * 1.3 + 60
    wl = subprocess.Popen(KLP + ["workload", "--duration", str(duration), "--progress-every",
                                 "0.05", *a.workload.split()], stdout=subprocess.PIPE, text=True)
    progress = Progress(wl)
    progress.now()
    spans = []                                      # (budget or None, t0, t1)
    clock = {}

    def on_window(budget, t0, t1):
        if not spans:
            clock.update(own0=cpu_seconds(os.getpid()), start=time.monotonic())
        clock.update(own=cpu_seconds(os.getpid()) - clock["own0"], end=time.monotonic())
        spans.append((budget, t0, t1))

    out = tempfile.mkdtemp(prefix="kvmlp-toggle-")
    rec = ToggledRecord(os.path.join(out, "r.parquet"), a.windows, a.window, a.settle, a.flush,
                        on_window, budgets, sample_every=a.sample_every,
                        stack_every=a.stack_every)
    try:
        manifest = rec.run()
    finally:
        wl.send_signal(signal.SIGTERM)
        wl.wait(60)
        shutil.rmtree(out, ignore_errors=True)
    on_time = a.windows * a.window
    counters = manifest["counters"]
    rates = span_rates(progress.history, [(t0, t1) for _, t0, t1 in spans])
    # attached window i between detached windows i - 1 and i + 1, all three measured
    ons = [i for i in range(1, len(spans) - 1, 2)
           if all(r is not None for r in rates[i - 1:i + 2])]
    rng = np.random.default_rng(0)
    result = {"workload": a.workload, "window_s": a.window, "settle_s": a.settle,
              "stack_budget": budgets[0] if len(budgets) == 1 else budgets,
              "stack_every": a.stack_every, "sample_every": a.sample_every,
              "windows": len(ons), "counters": counters,
              "own_cpu_share_while_attached": clock["own"] / on_time,
              "elapsed_s": clock["end"] - clock["start"],
              "budgets": [b for b, _, _ in spans],
              "rates": {k: [None if r is None else float(r[j]) for r in rates]
                        for j, k in enumerate(WORK)},
              "estimator": "geometric mean of paired ratios", "summary": {}}
    print(f"\n{len(ons)} attached windows of {a.window} s "
          f"(stack budget {a.stack_budget}, stack every {a.stack_every}, "
          f"sample every {a.sample_every})")
    # each attached window's log ratio to the detached windows beside it (nan: unmeasured)
    lr, unmeasured = {}, np.ones(len(spans), bool)
    unmeasured[ons] = False
    for j, k in enumerate(WORK):
        r = np.array([np.nan if x is None else x[j] for x in rates])
        lr[k] = log_ratios_aligned(r, np.roll(r, 1), np.roll(r, -1))
        lr[k][unmeasured] = np.nan
    summary = result["summary"]
    for b in budgets:
        mine = [i for i in ons if spans[i][0] == b]
        for k in WORK:
            x = lr[k][mine]
            ratio, lo, hi = geomean_ci(x[np.isfinite(x)], rng)
            row = {"ratio": ratio, "ci95": [lo, hi], "n": int(np.isfinite(x).sum())}
            (summary.setdefault(str(b), {}) if len(budgets) > 1 else summary)[k] = row
            print(f"{'budget ' + str(b) + ' ' if len(budgets) > 1 else ''}{k:<10} "
                  f"ratio {ratio:.3f} [{lo:.3f}, {hi:.3f}]")
    # budget b's window over the first budget's window just before it, in one cycle
    n = len(budgets)
    for m, b in enumerate(budgets[1:], 1):
        for k in WORK:
            d = np.array([lr[k][1 + 2 * (c + m)] - lr[k][1 + 2 * c]
                          for c in range(0, (len(spans) - 1) // 2 - m, n)])
            d = d[np.isfinite(d)]
            ratio, lo, hi = geomean_ci(d, rng)
            result.setdefault("paired", {}).setdefault(f"{b}/{budgets[0]}", {})[k] = \
                {"ratio": ratio, "ci95": [lo, hi], "n": len(d)}
            print(f"budget {b} / budget {budgets[0]}, paired, {k:<10} "
                  f"ratio {ratio:.3f} [{lo:.3f}, {hi:.3f}] ({len(d)} pairs)")
    print(f"this process's CPU per attached second (share of one CPU; it includes the "
          f"attaching and detaching): {result['own_cpu_share_while_attached']:.2%}")
    save(result, a.output)


if __name__ == "__main__":
    main()
