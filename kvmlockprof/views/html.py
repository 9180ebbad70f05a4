"""`report --html`: one self-contained page (plotly.js embedded, opens offline)."""
import html

import plotly.io as pio

from kvmlockprof.analysis import locks
from kvmlockprof.lazy import pd
from kvmlockprof.views import plots, report

STYLE = ("body{font-family:sans-serif;margin:2em} table.t{border-collapse:collapse;"
         "font-size:12px} table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #ddd}"
         " pre{white-space:pre-wrap;overflow-wrap:anywhere} details,div.off{font-size:12px}")
# Flags shown as the text report's marks, not True/False
MARKS = {"kvm": "K", "estimated": "~"}


def _table(df):
    """A DataFrame as an HTML table: times with their unit (the column name loses its
    `_ns`), flags as marks."""
    if df is None or df.empty:
        return "<p>(none)</p>"
    ns = report.ns_columns(df)
    df = df.assign(**{c: df[c].map(report.fmt_ns) for c in ns},
                   **{c: df[c].map(lambda v: f"{v:.1%}" if v == v else "-")
                      for c in df.columns if c.endswith(("ratio", "share"))
                      and pd.api.types.is_float_dtype(df[c])},
                   **{c: df[c].map(lambda v, m=m: m if v is True or v == 1 else "")
                      for c, m in MARKS.items() if c in df.columns and df[c].dtype == bool})
    df = df.rename(columns={c: c.removesuffix("_ns_bound").removesuffix("_ns") +
                            (" (bound)" if c.endswith("_bound") else "") for c in ns})
    return df.to_html(index=False, border=0, classes="t", escape=True)


def _summary(rec):
    """The text summary, with each probe that did not attach one collapsed line (its
    reason inside)."""
    out, lines = [], report.summary_lines(rec, verbose=True)
    plain = [x for x in lines if not (x.startswith("probe ") and "NOT attached" in x)]
    out.append(f"<pre>{html.escape(chr(10).join(plain))}</pre>")
    for x in lines:
        if x.startswith("probe ") and "NOT attached" in x:
            head, _, why = x.partition(" (NOT attached: ")
            why = why.removesuffix(")").strip()
            out.append(f"<details><summary>{html.escape(head)}</summary>{html.escape(why)}"
                       f"</details>" if why else f"<div class='off'>{html.escape(head)}</div>")
    return "".join(out)


class _Page:
    def __init__(self):
        self.parts, self.js_included = [], False

    def h2(self, title):
        self.parts.append(f"<h2>{html.escape(title)}</h2>")

    def raw(self, text):
        self.parts.append(text)

    def fig(self, fig):
        if fig is None:
            self.raw("<p>(no data)</p>")
            return
        # plotly.js goes into the page once, inline: no CDN, works offline
        self.raw(pio.to_html(fig, full_html=False, include_plotlyjs=not self.js_included))
        self.js_included = True


def render(rec, limit=20):
    locks.annotate(rec)             # the plots need every sample column: load them once
    page = _Page()
    page.h2("Summary")
    page.raw(_summary(rec))
    page.h2("Top locks")
    page.raw(_table(report.with_owner(rec, locks.top(rec, by="lock", limit=limit), "lock")
                    .drop(columns=["pct_exact"])))
    page.raw("<p>p50/p90/p99 are nearest-rank quantiles: exact where every wait of a row "
             "was sampled, else the upper bound of the log2 bucket holding them.</p>")
    page.h2("Wait-time histogram (in-kernel log2 buckets, heaviest locks)")
    page.fig(plots.wait_histogram(rec))
    page.h2("Contention over time (100 ms bins, heaviest locks)")
    page.fig(plots.timeline(rec))
    page.h2("Where the wait comes from: lock, caller, caller's caller (click to zoom)")
    page.fig(plots.stacks_icicle(rec))
    page.h2("Per VM (process)")
    page.raw(_table(locks.per_vm(rec)))
    page.h2("Per vCPU / thread")
    page.fig(plots.per_thread(rec, limit=limit))
    figs = plots.probe_figures(rec)
    for sec in report.probe_sections():
        df = sec.frame(rec)
        if df is None or df.empty:
            continue
        page.h2(sec.title)
        if figs.get(sec.key) is not None:
            page.fig(figs[sec.key])
        page.raw(_table(df.head(limit)))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kvmlockprof: "
            f"{html.escape(str(rec.path))}</title><style>{STYLE}</style></head><body>"
            f"<h1>kvmlockprof report</h1>{''.join(page.parts)}</body></html>")
