"""plotly figures of a recording: the HTML report and the notebooks draw these.

Each function takes a Recording and returns a figure, or None when the
recording has nothing for it."""
import plotly.express as px
import plotly.graph_objects as go

from kvmlockprof.analysis import locks
from kvmlockprof.lazy import np
from kvmlockprof.views.report import fmt_ns


def _pow2(ns):
    """2^k ns said as 2^(k mod 10) of ns, us, ms, s (2^10 ns ~ 1 us: a label, ~2% to 7%
    off; the hover has the exact bounds)."""
    k = max(int(round(np.log2(ns))), 0) if ns > 0 else 0
    return f"{2 ** (k % 10)} {('ns', 'us', 'ms', 's', 'ks')[min(k // 10, 4)]}"


def bucket_label(lo, hi):
    """A log2 bucket as a reader says it: `1-2 us`, `256-512 ns`, `512 ns-1 us`."""
    a, b = _pow2(lo).split(), _pow2(hi).split()
    return f"{a[0]}-{b[0]} {a[1]}" if a[1] == b[1] else f"{a[0]} {a[1]}-{b[0]} {b[1]}"


def wait_histogram(rec, top_n=8):
    """Wait-time distribution of the heaviest locks (in-kernel log2 buckets): a lock a
    row, a bucket a column, each cell the share of that lock's waits (its own scale,
    so a light lock reads as well as the heaviest), its count written in and on hover;
    the buckets holding the lock's p50 and p99 framed."""
    hist = locks.wait_histogram(rec, top_n=top_n)
    if hist.empty:
        return None
    cols = hist[["lo_ns", "hi_ns"]].drop_duplicates().sort_values("lo_ns")
    labels = [bucket_label(lo, hi) for lo, hi in zip(cols["lo_ns"], cols["hi_ns"])]
    col_of = {lo: i for i, lo in enumerate(cols["lo_ns"])}
    order = hist.groupby("lock")["count"].sum().sort_values().index.tolist()  # (top last)
    count = np.zeros((len(order), len(labels)))
    for r in hist.itertuples(index=False):
        count[order.index(r.lock), col_of[r.lo_ns]] += r.count
    share = count / count.sum(axis=1, keepdims=True)
    bounds = [f"[{lo:.0f}, {hi:.0f}) ns" for lo, hi in zip(cols["lo_ns"], cols["hi_ns"])]
    fig = go.Figure(go.Heatmap(
        z=share, x=labels, y=order, colorscale="Blues", zmin=0, zmax=1,
        customdata=np.dstack([count, np.broadcast_to(np.array(bounds, dtype=object),
                                                     count.shape)]),
        text=[[f"{int(c)}" if c else "" for c in row] for row in count],
        texttemplate="%{text}", colorbar={"title": "share of<br>its waits"},
        hovertemplate="%{y}<br>%{customdata[1]}: %{customdata[0]} waits (%{z:.1%})"
                      "<extra></extra>"))
    # each lock's p50 and p99: the bucket its histogram reaches that share of its waits
    cum = np.cumsum(count, axis=1) / count.sum(axis=1, keepdims=True)
    for q, sym in ((0.5, "square-open"), (0.99, "diamond-open")):  # (frames: the counts
        # stay legible inside)
        at = [labels[int(np.argmax(row >= q - 1e-12))] for row in cum]
        fig.add_trace(go.Scatter(x=at, y=order, mode="markers", name=f"p{round(q * 100)}",
                                 marker={"symbol": sym, "size": 28, "color": "crimson",
                                         "line": {"width": 2}}))
    # (plotly's default margins take 180 px of the height: rows of 45 px besides)
    fig.update_layout(xaxis_title="wait (log2 bucket)", yaxis_title=None,
                      height=220 + 45 * len(order), margin={"t": 40, "b": 110},
                      legend={"orientation": "h", "y": -0.35, "yanchor": "top"})
    return fig


def timeline(rec, bin_ms=100, top_n=8):
    tl = locks.timeline(rec, bin_ms=bin_ms, top_n=top_n)
    if tl.empty:
        return None
    return px.line(tl, x="t_s", y="wait_ns", color="lock", markers=True,
                   hover_data=["waits"],
                   labels={"t_s": "time (s)", "wait_ns": f"wait per {bin_ms} ms (ns)"})


def per_thread(rec, limit=30):
    """Wait time per thread, coloured by VM (process)."""
    th = locks.per_thread(rec).head(limit)
    if th.empty:
        return None
    th = th.assign(thread=th["comm"].astype(str) + " (" + th["tid"].astype(str) + ")",
                   vm=th["vm"].astype(str) + " (" + th["tgid"].astype(str) + ")")
    return px.bar(th, x="thread", y="wait_ns", color="vm", hover_data=["waits", "kvm_waits"],
                  labels={"wait_ns": "wait (ns)", "vm": "VM / process"})


def _strip(frame):
    return frame.split("+", 1)[0]


def stacks_icicle(rec, depth=10, min_share=0.002):
    """Where the wait comes from: lock, then its caller, that caller's caller ...
    (callee-rooted, like `perf report --no-children -G` inverted), sized by wait time
    (a lock's waits without a walked stack spread over its walked ones: estimates)."""
    aggs, _ = locks.annotate(rec)
    if aggs.empty:
        return None
    aggs = locks.spread_unwalked(aggs)
    info = locks.contention_stacks(rec)
    st = locks.stacks_of(rec).set_index("stack_id")
    per = aggs.groupby(["lock", "type", "stack_id"])["total_ns"].sum()
    total = per.sum()
    if total <= 0:
        return None
    values = {}
    for (lock, typ, sid), ns in per.items():
        if ns < min_share * total:
            ns_path = [f"{lock} ({typ})", "(small stacks)"]
        elif sid in info.index:
            frames = list(st.loc[sid, "frames"])
            lockf = list(st.loc[sid, "lock_frame"])
            callers = [_strip(f) for f, lk in zip(frames, lockf) if not lk][:depth]
            ns_path = [f"{lock} ({typ})", *callers]
        else:
            ns_path = [f"{lock} ({typ})", "[stack not sampled]" if sid == locks.NO_STACK
                       else "[no stack]"]
        for k in range(1, len(ns_path) + 1):
            key = tuple(ns_path[:k])
            values[key] = values.get(key, 0) + int(ns)
    ids = ["all"] + ["/".join(k) for k in values]
    labels = ["all locks"] + [k[-1] for k in values]
    parents = [""] + ["/".join(k[:-1]) if len(k) > 1 else "all" for k in values]
    vals = [int(total)] + list(values.values())
    fig = go.Figure(go.Icicle(ids=ids, labels=labels, parents=parents, values=vals,
                              branchvalues="total", maxdepth=6,
                              hovertext=[fmt_ns(v) for v in vals],
                              hovertemplate="%{label}<br>%{hovertext} waited"
                                            "<br>%{percentRoot:.1%} of all<extra></extra>"))
    fig.update_layout(margin=dict(t=10, l=10, r=10, b=10), height=600)
    return fig


def probe_figures(rec):
    """{section key: figure} of every probe section that has data."""
    from kvmlockprof.catalog import CATALOG
    figs = {}
    for probe in CATALOG:
        for sec in probe.sections:
            fig = sec.figure(rec) if sec.figure else None
            if fig is not None:
                figs[sec.key] = fig
    return figs


def compare_distributions(df, base, new, limit=6):
    """Each flagged lock row (improved, regressed) of a compare: its lock's wait
    distribution on both sides, side by side (the log2 buckets, each side's share of
    its waits, counts on hover)."""
    from plotly.subplots import make_subplots
    from kvmlockprof.analysis import compare
    rows = df[(df["kind"] == "lock") & df["verdict"].isin(["improved", "regressed"]) &
              ~df["name"].astype(str).str.startswith("? ")]    # (bare addresses: no lock)
    rows = rows.drop_duplicates("name").head(limit)
    if rows.empty:
        return None
    fig = make_subplots(rows=len(rows), cols=1, vertical_spacing=0.08 / max(len(rows), 1),
                        subplot_titles=[f"{r.name}: {r.metric} {r.verdict}"
                                        for r in rows.itertuples(index=False)])
    for i, r in enumerate(rows.itertuples(index=False), 1):
        sides = [(side, compare.lock_distribution(recs, r.name), colour) for side, recs, colour
                 in (("BASE", base, "#1f77b4"), ("NEW", new, "#d62728"))]
        los = [lo for _, (lo, _, n), _ in sides for lo in lo[n > 0]]
        if not los:
            continue
        # every bucket from the fastest to the slowest, in order (empty ones too)
        k = np.arange(int(np.log2(max(min(los), 1))), int(np.log2(max(max(los), 1))) + 1)
        axis = [bucket_label(2.0 ** j, 2.0 ** (j + 1)) for j in k]
        fig.update_xaxes(categoryorder="array", categoryarray=axis, row=i, col=1)
        for side, (lo, hi, n), colour in sides:
            if not len(n) or not n.sum():
                continue
            share = n / n.sum()
            fig.add_trace(go.Bar(x=[bucket_label(a, b) for a, b in zip(lo, hi)], y=share,
                                 name=side, marker_color=colour, showlegend=i == 1,
                                 customdata=n, hovertemplate=f"{side} %{{x}}: "
                                 "%{customdata:.0f} waits (%{y:.1%})<extra></extra>"),
                          row=i, col=1)
        fig.update_yaxes(tickformat=".0%", row=i, col=1)
    fig.update_layout(barmode="group", height=260 * len(rows), bargap=0.15)
    return fig


def compare_forest(df, limit=40):
    """The compare table as a forest plot: NEW/BASE ratio with its interval per metric
    (at the report's level, ci_level; log x; metrics whose BASE is 0 have no finite
    ratio and are left out)."""
    finite = df[np.isfinite(df["ratio"].astype(float)) & df["ratio_ci_low"].notna() &
                np.isfinite(df["ratio_ci_high"].astype(float)) & (df["ratio"] > 0)]
    if finite.empty:
        return None
    finite = finite.head(limit).assign(
        what=lambda d: d["name"] + "  " + d["metric"],
        plus=lambda d: d["ratio_ci_high"] - d["ratio"],
        minus=lambda d: d["ratio"] - d["ratio_ci_low"].clip(lower=1e-9))
    fig = px.scatter(finite, x="ratio", y="what", color="verdict", error_x="plus",
                     error_x_minus="minus", log_x=True, height=max(400, 22 * len(finite)),
                     labels={"ratio": "NEW / BASE (interval)", "what": ""})
    fig.add_vline(x=1, line_dash="dot")
    return fig
