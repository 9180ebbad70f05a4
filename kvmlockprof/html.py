"""`report --html`: one self-contained page (plotly.js embedded, opens offline)."""
import html

import plotly.express as px
import plotly.io as pio

from . import analysis, probe_analysis, report


def _fig_html(fig, first):
    # plotly.js goes into the page once, inline: no CDN, works offline
    return pio.to_html(fig, full_html=False, include_plotlyjs=True if first else False)


def _table(df):
    return df.to_html(index=False, border=0, classes="t", escape=True) if not df.empty else \
        "<p>(none)</p>"


def render(rec, limit=20):
    top = analysis.top(rec, by="lock", limit=limit)
    parts = [f"<h2>Summary</h2><pre>{html.escape(chr(10).join(report.summary_lines(rec)))}</pre>",
             "<h2>Top locks</h2>",
             _table(top.assign(**{c: top[c].map(report.fmt_ns) for c in
                                  ("total_ns", "max_ns", "avg_ns", "p50_ns", "p99_ns")}))]
    figs = []
    hist = analysis.wait_histogram(rec, top_n=8)
    if not hist.empty:
        hist = hist.sort_values("lo_ns")
        hist["bucket"] = [f">={report.fmt_ns(v)}" for v in hist["lo_ns"]]
        figs.append(("Wait-time histogram (log2 buckets, in-kernel)",
                     px.bar(hist, x="bucket", y="count", color="lock", barmode="group",
                            category_orders={"bucket": list(dict.fromkeys(hist["bucket"]))},
                            labels={"bucket": "wait (log2 bucket)"})))
    tl = analysis.timeline(rec, bin_ms=100, top_n=8)
    if not tl.empty:
        figs.append(("Contention over time (100 ms bins, top locks)",
                     px.line(tl, x="t_s", y="wait_ns", color="lock", markers=True,
                             labels={"t_s": "time (s)", "wait_ns": "wait per bin (ns)"})))
    th = analysis.per_thread(rec).head(limit)
    if not th.empty:
        th = th.assign(thread=th["comm"].astype(str) + " (" + th["tid"].astype(str) + ")",
                       process=th["tgid"].astype(str))
        figs.append(("Wait time per thread", px.bar(th, x="thread", y="wait_ns",
                                                    color="process", hover_data=["waits"])))
    for i, (title, fig) in enumerate(figs):
        parts.append(f"<h2>{html.escape(title)}</h2>{_fig_html(fig, i == 0)}")
    for title, fn in report.PROBE_SECTIONS:
        df = fn(rec)
        if df is not None and not df.empty:
            parts.append(f"<h2>{html.escape(title)}</h2>{_table(df.head(limit))}")
    style = ("body{font-family:sans-serif;margin:2em} table.t{border-collapse:collapse;"
             "font-size:12px} table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #ddd}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kvmlockprof: "
            f"{html.escape(str(rec.path))}</title><style>{style}</style></head><body>"
            f"<h1>kvmlockprof report</h1>{''.join(parts)}</body></html>")
