"""How often `compare`'s verdicts are wrong: its own verdict path (compare_values over
runs, single_test within a run, Benjamini-Hochberg over the report) on simulated
reports whose truth is set here.

Over runs, a report is `--locks` locks x 7 metrics, one value a run, as real runs have
them: lognormal run-to-run noise at a CV (each lock's CV x e^N(0, 0.3)), half of its
variance a host factor every lock of a run shares; waits/s, /exit and /memslot op one
count over different work (exits CV 10%, memslot ops 20%, with the host factor);
wait/s = count x mean wait; p50 and p99 move with the mean wait plus noise of their
own. A/A: both sides one distribution, a report's false flag is any flag. Power: lock
0's waits (mean, p50, p99, and wait/s with them) x2 on the NEW side, its mean wait's
noise at the CV; found = its mean wait flagged as regressed.

Within one run (one run a side), a report is 20 locks x 5 metrics (waits/s, wait/s,
mean, p50, p99 wait): Poisson waits at 50-5000/s, lognormal wait times (sigma
0.8-2.0), one side's run 2.0 s long and the other's 2.05 s.

    .venv/bin/python bench/compare_calibration.py [--reports 4000] [--quick]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results_io import RESULTS, save                       # noqa: E402
from kvmlockprof.analysis import compare                   # noqa: E402

METRICS = list(compare.LOCK_METRICS)
FLAGS = ("improved", "regressed")


def sd(cv):
    return np.sqrt(np.log1p(cv * cv))


def report_values(rng, runs, locks, cv, change=None, host=0.5, spread=0.3, tails=None):
    """{metric: (locks, runs) values} of one simulated report's runs (BASE first)."""
    n = sum(runs)
    if tails:
        def noise(size):
            return rng.standard_t(tails, size) / np.sqrt(tails / (tails - 2))
    else:
        def noise(size):
            return rng.normal(size=size)
    sc, sw = sd(cv) * np.exp(rng.normal(0, spread, (2, locks)))
    if change:
        sw[0] = sd(change[1])
    h, g = noise(n), noise(n)
    hw = (h + g) / np.sqrt(2)                       # the waits' host factor, 0.5 of the count's
    a, b = np.sqrt(host), np.sqrt(1 - host)
    count = sc[:, None] * (a * h + b * noise((locks, n)))
    wait = sw[:, None] * (a * hw + b * noise((locks, n)))
    if change:
        wait[0, runs[0]:] += np.log(change[0])
    exits = sd(0.1) * (a * h + b * noise(n))
    ops = sd(0.2) * (a * h + b * noise(n))
    count, mean = np.exp(7 + count), np.exp(8 + wait)
    return {"waits/s": count, "wait/s": count * mean, "waits/exit": count / np.exp(2 + exits),
            "waits/memslot op": count / np.exp(1 + ops), "mean wait": mean,
            "p50 wait": mean * 0.5 * np.exp(0.5 * sw[:, None] * noise((locks, n))),
            "p99 wait": mean * 9 * np.exp(0.7 * sw[:, None] * noise((locks, n)))}


def runs_scenario(rng, reports, runs=(5, 5), locks=20, cv=0.2, change=None, metrics=METRICS,
                  **kw):
    """compare_values() on `reports` simulated reports: the share that flag anything,
    the false discovery rate (the mean share of a report's flags that are false), and
    the share that flag lock 0's mean wait as regressed (or any of its changed rows)."""
    anything = found = found_lock = fdp = 0
    for _ in range(reports):
        v = report_values(rng, runs, locks, cv, change, **kw)
        rows = [("lock", f"lock{i}", m, *compare.LOCK_METRICS[m], v[m][i, :runs[0]],
                 v[m][i, runs[0]:]) for i in range(locks) for m in metrics]
        df = compare.compare_values(rows)
        flagged = df["verdict"].isin(FLAGS)
        truth = (df["name"] == "lock0") & df["metric"].isin(
            ["mean wait", "p50 wait", "p99 wait", "wait/s"]) if change else False
        anything += flagged.any()
        fdp += (flagged & ~truth).sum() / max(flagged.sum(), 1)
        found += bool(change) and bool((truth & (df["metric"] == "mean wait") &
                                        (df["verdict"] == "regressed")).any())
        found_lock += bool(change) and bool((truth & flagged).any())
    out = {"reports": reports, "runs": list(runs), "locks": locks, "rows": locks * len(metrics),
           "cv": cv, "change": change, **kw,
           "flag_anything": anything / reports, "fdr": fdp / reports}
    if change:
        out.update(found_mean_wait=found / reports, found_lock=found_lock / reports)
    return out


def single_observations(rng, rate, sigma, mu, seconds):
    """_single_observations()'s shape for one lock of one simulated run."""
    nb = int(np.ceil(seconds * 1e9 / compare.BIN_NS))
    exposure = np.clip(seconds - np.arange(nb) * compare.BIN_NS / 1e9, 0, compare.BIN_NS / 1e9)
    n = rng.poisson(rate * seconds)
    ts = rng.uniform(0, seconds, n)
    waits = rng.lognormal(mu, sigma, n).round() + 1
    b = np.minimum((ts * 1e9 // compare.BIN_NS).astype(int), nb - 1)
    obs = {"waits/s": ("rate", np.bincount(b, minlength=nb).astype(float), exposure),
           "wait/s": ("rate", np.bincount(b, weights=waits, minlength=nb), exposure)}
    for metric, stat in (("mean wait", "mean"), ("p50 wait", 0.5), ("p99 wait", 0.99)):
        if n >= compare.MIN_WAITS[metric]:
            obs[metric] = (stat, waits, None, None)
    return obs


def single_scenario(rng, reports, locks=20, seconds=(2.0, 2.05)):
    """A/A single-run reports: per metric the share of rows rejected at 5% alone,
    and the share of reports BH flags anything in (threshold 5%)."""
    anything, rejected, tested = 0, {}, {}
    for _ in range(reports):
        p, ratio = [], []
        for _ in range(locks):
            rate, sigma = np.exp(rng.uniform(np.log(50), np.log(5000))), rng.uniform(0.8, 2.0)
            b, n = (single_observations(rng, rate, sigma, 9, s) for s in seconds)
            for metric in b.keys() & n.keys():
                value = compare.observed_value(b[metric])[0]
                t = compare.single_test(b[metric], n[metric], value)
                if t is None:
                    continue
                p.append(t.p())
                ratio.append(compare.observed_value(n[metric])[0] / value)
                tested[metric] = tested.get(metric, 0) + 1
                rejected[metric] = rejected.get(metric, 0) + (p[-1] <= 0.05)
        adj = compare.bh_adjusted(p)
        anything += ((adj <= compare.FDR) & (np.abs(np.array(ratio) - 1) >= 0.05)).any()
    return {"reports": reports, "locks": locks, "seconds": list(seconds),
            "flag_anything": anything / reports,
            "row_rejected_at_5pct": {m: rejected[m] / tested[m] for m in tested}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reports", type=int, default=4000, help="reports a headline scenario")
    ap.add_argument("--others", type=int, default=1000, help="reports every other scenario")
    ap.add_argument("--single", type=int, default=300, help="single-run A/A reports")
    ap.add_argument("--quick", action="store_true", help="a tenth of each")
    ap.add_argument("-o", "--output", default=os.path.join(RESULTS, "compare-calibration.json"))
    a = ap.parse_args()
    if a.quick:
        a.reports, a.others, a.single = a.reports // 10, a.others // 10, a.single // 10
    rng = np.random.default_rng(2026)
    t0 = time.time()
    x2 = (2.0, 0.4)
    # the family as a reviewer narrows it beforehand: compare -L LOCK --metric 'mean wait'
    focused = dict(locks=1, metrics=["mean wait"])
    headline = {"a_a": runs_scenario(rng, a.reports, (5, 5), 20, 0.2),
                "power_2x_cv40_5_runs": runs_scenario(rng, a.reports, (5, 5), 20, 0.4, x2),
                "a_a_focused": runs_scenario(rng, a.reports, (5, 5), cv=0.4, **focused),
                "power_2x_cv40_5_runs_focused": runs_scenario(rng, a.reports, (5, 5), cv=0.4,
                                                              change=x2, **focused)}
    scenarios = [
        runs_scenario(rng, a.others, (3, 3), 20, 0.2),
        runs_scenario(rng, a.others, (10, 10), 20, 0.2),
        runs_scenario(rng, a.others, (5, 5), 20, 0.4),
        runs_scenario(rng, a.others, (3, 6), 20, 0.4),
        runs_scenario(rng, a.others, (5, 5), 20, 0.2, tails=3),
        runs_scenario(rng, a.others, (5, 5), 20, 0.2, host=0.0, spread=0.7),
        runs_scenario(rng, a.others, (5, 5), 20, 0.2, host=0.9),
        runs_scenario(rng, a.others, (5, 5), 3, 0.2),
    ] + [runs_scenario(rng, a.others, (n, n), locks, 0.4, x2)
         for n, locks in ((3, 20), (10, 20), (12, 20), (15, 20), (20, 20), (5, 1), (5, 3),
                          (5, 5))] + [
        runs_scenario(rng, a.others, (5, 5), 1, 0.4, x2, metrics=["mean wait"]),
        runs_scenario(rng, a.others, (5, 5), 20, 0.2, (2.0, 0.2)),
        runs_scenario(rng, a.others, (5, 5), 20, 0.4, (3.0, 0.4)),
    ]
    single = single_scenario(rng, a.single)
    took = time.time() - t0
    print(f"{'runs':>6} {'rows':>5} {'CV':>4} {'change':>10} {'other':>22} "
          f"{'flags anything':>14} {'FDR':>5} {'found':>6} {'lock 0':>6}")
    for s in [*headline.values(), *scenarios]:
        other = ", ".join(f"{k}={s[k]}" for k in ("tails", "host", "spread") if k in s)
        found, lock = (f"{s[k]:.1%}" if s["change"] else "-"
                       for k in ("found_mean_wait", "found_lock"))
        change = f"x{s['change'][0]:g} @{s['change'][1]:.0%}" if s["change"] else "A/A"
        print(f"{'+'.join(map(str, s['runs'])):>6} {s['rows']:>5} {s['cv']:>4.0%} {change:>10} "
              f"{other:>22} {s['flag_anything']:>14.1%} {s['fdr']:>5.1%} {found:>6} {lock:>6}")
    print(f"one run a side, 2.0 vs 2.05 s, A/A: a report flags anything "
          f"{single['flag_anything']:.1%} of {single['reports']}; rows rejected at 5% alone: " +
          ", ".join(f"{m} {r:.1%}" for m, r in single["row_rejected_at_5pct"].items()))
    h = headline
    print(f"headline ({a.reports} reports each, 20 locks x 7 metrics, 5 runs a side): A/A "
          f"flags anything in {h['a_a']['flag_anything']:.1%} of reports; a 2x mean wait at "
          f"CV 40% is found {h['power_2x_cv40_5_runs']['found_mean_wait']:.1%}; with the "
          f"family one lock's mean wait (compare -L LOCK --metric 'mean wait'): A/A at CV 40% "
          f"flags {h['a_a_focused']['flag_anything']:.1%}, the 2x change is found "
          f"{h['power_2x_cv40_5_runs_focused']['found_mean_wait']:.1%}  ({took:.0f} s)")
    save({"rule": f"Welch's t on logs, Benjamini-Hochberg at FDR {compare.FDR}",
          "headline": headline, "scenarios": scenarios, "single_run": single,
          "seconds": round(took, 1)}, a.output)


if __name__ == "__main__":
    main()
