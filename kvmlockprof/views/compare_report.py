"""`kvmlockprof compare` output: text, CSV, JSON and a self-contained HTML page."""
import glob
import html
import json
import os

from kvmlockprof.analysis import compare
from kvmlockprof.lazy import np
from kvmlockprof.recording.store import RecordingError, load
from kvmlockprof.views import plots
from kvmlockprof.views.report import fmt_ns

def expand(paths):
    """Recording paths; a directory stands for the *.parquet files in it."""
    out = []
    for p in paths:
        if os.path.isdir(p) and not p.rstrip("/").endswith(".partial"):
            found = sorted(glob.glob(os.path.join(p, "*.parquet")))
            if not found:
                raise RecordingError(f"{p} holds no *.parquet recordings")
            out += found
        else:
            out.append(p)
    return out


def load_side(paths, where=None):
    """A side's recordings: files, directories of them, and datasets (`export
    --dataset`: each recording in it a run); where: only the recordings that this
    SQL condition on the `recordings` view keeps (`host = 'hv1'`)."""
    from kvmlockprof.recording import dataset
    files, sets = dataset.expand(paths)
    keep = None
    if where:
        keep = set(dataset.query(f"SELECT recording FROM recordings WHERE {where}",
                                 paths)["recording"])
        if not keep:
            raise RecordingError(f"no recording of {' '.join(paths)} has {where}")
    recs = [load(p) for p in files] + [r for d in sets for r in dataset.load_dataset(d)]
    return [r for r in recs if keep is None or dataset.recording_id(r.manifest) in keep]


def _is_ns(row):
    return row["unit"] == "ns"


def fmt_value(v, ns=False, signed=False):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if ns:
        s = fmt_ns(abs(v))
        return (("+" if v > 0 else "-" if v < 0 else "") + s) if signed else s
    if isinstance(v, float) and np.isinf(v):
        return "inf"
    mag = abs(v)
    s = f"{mag:,.0f}" if mag >= 100 else f"{mag:.3g}"
    return (("+" if v > 0 else "-" if v < 0 else "") if signed else
            ("-" if v < 0 else "")) + s


def fmt_ratio(r):
    if r is None or np.isnan(r):
        return "-"
    return "inf" if np.isinf(r) else f"x{r:.2f}"


def side_line(name, recs):
    m = [r.manifest for r in recs]
    dur = np.mean([x.get("duration_s", 0) for x in m])
    kernels = sorted({x.get("kernel_release", "?") for x in m})
    exits = np.mean([compare.work_rate(r, "exit") for r in recs])
    ops = np.mean([compare.work_rate(r, "memslot op") for r in recs])
    lost = max(compare.loss_fraction(r) for r in recs)
    return (f"{name}: {len(recs)} run{'s' if len(recs) > 1 else ''}, kernel "
            f"{', '.join(kernels)}, {dur:.1f} s each, {exits:,.0f} exits/s, "
            f"{ops:,.0f} memslot ops/s, {lost:.2%} of waits lost")


def header_lines(base, new, warnings, threshold, df=None):
    """The sides, the warnings and how the verdicts were reached (with the table
    `df`: over how many tests, and the intervals' level)."""
    runs = len(base) > 1 or len(new) > 1
    how = ("Welch's t over runs on the log of each run's value" if runs else
           "within the run (not run-to-run noise: record several runs for that): rates "
           "over 500 ms bins by their length, Welch's t on the mean wait, an exact test "
           "of p50/p99")
    tested = df["p_value"].notna() if df is not None else None
    family = f"the {int(tested.sum())} rows with a test" if tested is not None else \
        "the rows with a test"
    level = (f"{100 * df.loc[tested, 'ci_level'].iloc[0]:.4f}".rstrip("0").rstrip(".") + "% "
             if tested is not None and tested.any() else "")
    lines = [side_line("BASE", base), side_line("NEW ", new)]
    lines += [f"WARNING: {w}" for w in warnings]
    lines.append(f"Tests: {how}. Benjamini-Hochberg at a {compare.FDR:.0%} false discovery "
                 f"rate over {family} (with no real change a report flags anything "
                 f"{compare.FDR:.0%} of the time at most); intervals at {level}(the level "
                 f"BH used), a change counts when its interval excludes 0 and it is at "
                 f"least {threshold:.0%}")
    return lines


def text(df, base, new, warnings, threshold):
    lines = header_lines(base, new, warnings, threshold, df) + [""]
    whats = [f"{r['name']}  {r['metric']}".strip() if r["kind"] == "lock" else
             f"[probe] {r['name']}" for _, r in df.iterrows()]
    w = min(100, max([58] + [len(x) for x in whats]))     # lock order edges are long
    lines.append(f"{'verdict':<22} {'what':<{w}} {'base':>10} {'new':>10} {'change':>11} "
                 f"{'CI of change':>25} {'ratio':>7} {'ratio CI':>16} {'p (BH)':>8}")
    for what, (_, r) in zip(whats, df.iterrows()):
        ns = _is_ns(r)
        ci = (f"[{fmt_value(r['ci_low'], ns, True)}, {fmt_value(r['ci_high'], ns, True)}]"
              if not np.isnan(r["ci_low"]) else "-")
        rci = (f"[{fmt_ratio(r['ratio_ci_low'])}, {fmt_ratio(r['ratio_ci_high'])}]"
               if not np.isnan(r["ratio_ci_low"]) else "-")
        padj = f"{r['p_adjusted']:.2g}" if r["p_adjusted"] == r["p_adjusted"] else "-"
        lines.append(f"{r['verdict']:<22} {what[:w]:<{w}} {fmt_value(r['base'], ns):>10} "
                     f"{fmt_value(r['new'], ns):>10} {fmt_value(r['change'], ns, True):>11} "
                     f"{ci:>25} {fmt_ratio(r['ratio']):>7} {rci:>16} {padj:>8}")
    if df.empty:
        lines.append("(nothing to compare: neither side recorded contention or probe data)")
    counts = df["verdict"].value_counts()
    lines += ["", "  ".join([f"{k}: {counts.get(k, 0)}" for k in
                             ("regressed", "improved", "no significant change")] +
                            [f"{k}: {counts[k]}" for k in (compare.NEW, compare.GONE)
                             if counts.get(k)])]
    return "\n".join(lines) + "\n"


def as_json(df, base, new, warnings, threshold):
    return json.dumps({"base": [str(r.path) for r in base], "new": [str(r.path) for r in new],
                       "threshold": threshold, "fdr": compare.FDR, "warnings": warnings,
                       "rows": json.loads(df.to_json(orient="records",
                                                      double_precision=15))},
                      indent=1)


def page(df, base, new, warnings, threshold):
    """A self-contained page: the header, a forest plot of ratio CIs, the table."""
    import plotly.io as pio
    head = "\n".join(header_lines(base, new, warnings, threshold, df))
    parts = [f"<h1>kvmlockprof compare</h1><pre>{html.escape(head)}</pre>"]
    fig = plots.compare_forest(df)
    if fig is not None:
        parts.append("<h2>Change per metric (NEW / BASE, its interval)</h2>" +
                     pio.to_html(fig, full_html=False, include_plotlyjs=True))
    dist = plots.compare_distributions(df, base, new)
    if dist is not None:
        parts.append("<h2>Flagged locks: the wait distributions, BASE and NEW side by side"
                     "</h2>" + pio.to_html(dist, full_html=False, include_plotlyjs=fig is None))
    parts.append("<h2>All metrics</h2>" + df.to_html(index=False, border=0, classes="t"))
    style = ("body{font-family:sans-serif;margin:2em} table.t{border-collapse:collapse;"
             "font-size:12px} table.t td,table.t th{padding:2px 8px;"
             "border-bottom:1px solid #ddd}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kvmlockprof compare"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
