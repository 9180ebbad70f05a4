"""Accuracy of the default's by-caller answer against perf's exact one, at several
contention levels, over several runs.

Each run is tests/test_live_peer.py's comparison: kvmlockprof record with its
defaults (stack walks for at most 250 waits/s per CPU, the other waits spread over
their lock's walked callers) attached first, around `perf lock contention -ab -v`
(every wait's stack, `make peer`'s build) around the built-in workload. Per run: perf's
top 10 callers on KVM's stacks only, each one's share of the ten's wait time on each
side (bench/peer.py caller_shares), and the error, ours less perf's, in points.
Prints, per level, the largest error of each run and the mean absolute error per
caller; writes JSON (bench/results/peer-accuracy.json).
Example: python bench/peer_accuracy.py --rounds 4
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import peer
from results_io import RESULTS, save

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kvmlockprof  # noqa: E402

# The workload's settings, lightest contention first (memslot churn is the storm).
LEVELS = {"moderate": ["--vcpus", "2"],
          "storm": ["--vcpus", "2", "--churn"],
          "storm-4vcpus": ["--vcpus", "4", "--churn"]}


def one_run(perf, level, seconds):
    with tempfile.TemporaryDirectory() as d:
        said, out, cost = peer.stacked(perf, Path(d), [], workload=LEVELS[level],
                                       seconds=seconds)
        rec = kvmlockprof.load(out)
        top, ours, theirs = peer.caller_shares(rec, peer.parse_perf_callers(said))
        return {"callers": {c: {"ours": ours[c], "perf": theirs[c]} for c in top},
                "max_abs_error": max((abs(ours[c] - theirs[c]) for c in top), default=None),
                "skew_ns": peer.skew_ns(rec), "perf_handler_ns": cost}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=6, help="workload seconds a run")
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "peer-accuracy.json"))
    a = ap.parse_args()
    perf, _ = peer.find(verbose=False)
    if not perf:
        sys.exit("no built perf with lock contention -b here: run `make peer`")
    result = {"rounds": a.rounds, "seconds": a.seconds, "levels": {}}
    for level in a.levels.split(","):
        runs = [one_run(perf, level, a.seconds) for _ in range(a.rounds)]
        per_caller = {}
        for r in runs:
            for c, v in r["callers"].items():
                per_caller.setdefault(c, []).append(abs(v["ours"] - v["perf"]))
        result["levels"][level] = {"workload": LEVELS[level], "runs": runs}
        worst = [r["max_abs_error"] for r in runs if r["max_abs_error"] is not None]
        print(f"{level} ({' '.join(LEVELS[level])}): largest error of each run, points: "
              + ", ".join(f"{100 * w:.1f}" for w in worst))
        for c, errs in sorted(per_caller.items(), key=lambda kv: -max(kv[1]))[:6]:
            print(f"  {c:<44} mean |error| {100 * statistics.mean(errs):4.1f} points, "
                  f"largest {100 * max(errs):4.1f} ({len(errs)} runs)")
    save(result, a.output)


if __name__ == "__main__":
    main()
