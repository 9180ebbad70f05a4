"""How long the CPU can be held between two probes of one tracepoint.

Two programs that only read the clock, attached one after the other to
lock:contention_begin and contention_end (nothing of kvmlockprof's): the second
takes the time since the first's, per lock. Any gap beyond the ~100-300 ns of
the tracepoint's own call is time the CPU spent elsewhere inside the tracepoint,
between one tool's timestamp and the next tool's, which moves a wait as those
two tools time it (tests/test_live_oracle.py: shifted()). Measured while the
built-in workload runs:
    .venv/bin/python bench/probe_stalls.py [--workload "--duration 4 --vcpus 2 --churn"]
"""
import argparse
import os
import shlex
import subprocess
import sys
from collections import Counter, defaultdict

from kvmlockprof.kernel import bpfload

from results_io import RESULTS, save      # bench/ is on sys.path when run as a script

FIRST = r"""
BPF_TABLE_PUBLIC("percpu_array", u32, u64, stall_first, 2);
static inline int stamp(u32 tp) {
    u64 now = bpf_ktime_get_ns(); stall_first.update(&tp, &now); return 0;
}
RAW_TRACEPOINT_PROBE(contention_begin) { return stamp(0); }
RAW_TRACEPOINT_PROBE(contention_end) { return stamp(1); }
"""
SECOND = r"""
struct gap_key { u64 lock; u32 tp; u32 slot; };
BPF_TABLE("extern", u32, u64, stall_first, 2);
BPF_HASH(gaps, struct gap_key, u64, 16384);
static inline int gap(struct bpf_raw_tracepoint_args *ctx, u32 tp) {
    u64 now = bpf_ktime_get_ns(), *t = stall_first.lookup(&tp), zero = 0;
    if (!t || !*t)
        return 0;
    struct gap_key k = {.lock = ctx->args[0], .tp = tp, .slot = bpf_log2l(now - *t)};
    *t = 0;
    u64 *n = gaps.lookup_or_try_init(&k, &zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
RAW_TRACEPOINT_PROBE(contention_begin) { return gap(ctx, 0); }
RAW_TRACEPOINT_PROBE(contention_end) { return gap(ctx, 1); }
"""
STALL_SLOT = 12             # bpf_log2l slot s: [2^(s-1), 2^s) ns; from 2048 ns, ten times the call


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="--duration 4 --vcpus 2 --churn")
    ap.add_argument("--top", type=int, default=6, help="locks shown")
    a = ap.parse_args()
    first = bpfload.compile_bpf(text=FIRST)
    second = bpfload.compile_bpf(text=SECOND)
    try:
        subprocess.run([sys.executable, "-m", "kvmlockprof", "workload",
                        *shlex.split(a.workload)], check=True, stdout=subprocess.DEVNULL)
        hist = defaultdict(Counter)
        for k, v in second["gaps"].items():
            hist[(k.lock, ("contention_begin", "contention_end")[k.tp])][k.slot] += v.value
    finally:
        second.cleanup()
        first.cleanup()
    rows = []
    for (lock, tp), h in hist.items():
        n = sum(h.values())
        stalls = sum(c for s, c in h.items() if s >= STALL_SLOT)
        rows.append({"lock": f"{lock:#x}", "tracepoint": tp, "events": n, "stalls": stalls,
                     "share": stalls / n, "max_ns_below": 2 ** max(h)})
    rows.sort(key=lambda r: -r["events"])
    print(f"gaps of >= {2 ** (STALL_SLOT - 1)} ns between two adjacent probes:")
    for r in rows[:2 * a.top]:
        print(f"  {r['lock']:>18} {r['tracepoint']:<17} {r['events']:>7} events, "
              f"{r['stalls']:>5} stalls ({r['share']:.1%}), longest < {r['max_ns_below']} ns")
    save({"workload": a.workload, "stall_ns": 2 ** (STALL_SLOT - 1), "locks": rows},
         os.path.join(RESULTS, "probe-stalls.json"))


if __name__ == "__main__":
    main()
