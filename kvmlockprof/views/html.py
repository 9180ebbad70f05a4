"""`report --html`: one self-contained page (plotly.js embedded, opens offline)."""
import html

import plotly.io as pio

from kvmlockprof.analysis import locks as analysis
from kvmlockprof.views import plots, report

STYLE = ("body{font-family:sans-serif;margin:2em} table.t{border-collapse:collapse;"
         "font-size:12px} table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #ddd}")
def _table(df):
    if df is None or df.empty:
        return "<p>(none)</p>"
    df = df.assign(**{c: df[c].map(report.fmt_ns) for c in report.ns_columns(df)})
    return df.to_html(index=False, border=0, classes="t", escape=True)


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
    analysis.annotate(rec)          # the plots need every sample column: load them once
    page = _Page()
    page.h2("Summary")
    page.raw(f"<pre>{html.escape(chr(10).join(report.summary_lines(rec)))}</pre>")
    page.h2("Top locks")
    page.raw(_table(analysis.top(rec, by="lock", limit=limit).drop(columns=["pct_exact"])))
    page.raw("<p>p50/p90/p99 are exact where every wait of a row was sampled, else the "
             "upper bound of the log2 bucket holding them.</p>")
    page.h2("Wait-time histogram (in-kernel log2 buckets, heaviest locks)")
    page.fig(plots.wait_histogram(rec))
    page.h2("Contention over time (100 ms bins, heaviest locks)")
    page.fig(plots.timeline(rec))
    page.h2("Where the wait comes from: lock, caller, caller's caller (click to zoom)")
    page.fig(plots.stacks_icicle(rec))
    page.h2("Per VM (process)")
    page.raw(_table(analysis.per_vm(rec)))
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
