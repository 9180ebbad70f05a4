"""A recording as a timeline in the Chrome Trace Event format (the JSON object form:
`traceEvents`), which Perfetto, chrome://tracing and speedscope open:
`report --format trace-json`.

Each sampled wait is a complete event ("X") on its thread's track, from the wait's
start to its end (contention_end's timestamp minus the wait), named by the lock, its
type the category; threads and processes carry their names (a vCPU thread the VM's
`vcpuN`, from the registry). Function-probe events (each streamed table with a
timestamp and a thread) are slices where they carry a latency (`lat_ns`), instant
events otherwise. Times are microseconds from the recording's start."""
import json

from kvmlockprof.analysis import locks
from kvmlockprof.lazy import np, pd

PROBE_SKIP = {"contention", "stacks"}


def _frame(ts_us, dur_us, name, cat, pid, tid, ph, args=None):
    df = pd.DataFrame({"name": name, "cat": cat, "ph": ph, "ts": ts_us, "pid": pid,
                       "tid": tid})
    if dur_us is not None:
        df["dur"] = dur_us
    if ph == "i":
        df["s"] = "t"                           # an instant on its thread's track
    if args is not None:
        df["args"] = args
    return df


def _waits(rec, start, pids):
    aggs, samples = locks.annotate(rec)
    if samples.empty:
        return []
    if pids:
        samples = samples[samples["tgid"].isin(pids)]
    end = samples["ts_ns"].to_numpy(np.int64) - start
    wait = samples["wait_ns"].to_numpy(np.int64)
    args = [{"lock_addr": f"{a:#x}", "caller": c} for a, c in
            zip(samples["lock_addr"].tolist(), samples["caller"].astype(str).tolist())]
    return [_frame((end - wait) / 1e3, wait / 1e3, samples["lock"].astype(str).to_numpy(),
                   samples["type"].astype(str).to_numpy(), samples["tgid"].to_numpy(),
                   samples["tid"].to_numpy(), "X", args)]


def _probe_events(rec, start, pids):
    from kvmlockprof.catalog import CATALOG
    out = []
    for probe in CATALOG:
        for _, table in probe.streams:
            if table in PROBE_SKIP:
                continue
            df = rec.table(table)
            if df.empty or not {"ts_ns", "tid", "tgid"} <= set(df.columns):
                continue
            if pids:
                df = df[df["tgid"].isin(pids)]
            ts = df["ts_ns"].to_numpy(np.int64) - start
            lat = df["lat_ns"].to_numpy(np.int64) if "lat_ns" in df.columns else None
            name = np.full(len(df), table, dtype=object)
            if lat is not None:
                out.append(_frame((ts - lat) / 1e3, lat / 1e3, name, probe.name,
                                  df["tgid"].to_numpy(), df["tid"].to_numpy(), "X"))
            else:
                out.append(_frame(ts / 1e3, None, name, probe.name, df["tgid"].to_numpy(),
                                  df["tid"].to_numpy(), "i"))
    return out


def _names(rec, events):
    """process_name / thread_name metadata events for the pids and tids used."""
    if not events:
        return []
    used = pd.concat([e[["pid", "tid"]] for e in events]).drop_duplicates()
    vm = locks.vm_labels(rec)
    samples = rec.table("contention", ["tid", "comm"])
    comm = dict(zip(samples["tid"], samples["comm"].astype(str))) if not samples.empty else {}
    vcpu = locks.vcpu_labels(rec, {t: (p, comm.get(t, "")) for p, t in
                                   zip(used["pid"].tolist(), used["tid"].tolist())})
    rows = [{"name": "process_name", "ph": "M", "pid": int(p), "tid": int(p),
             "args": {"name": str(vm.get(int(p), p))}} for p in used["pid"].unique()]
    for p, t in zip(used["pid"].tolist(), used["tid"].tolist()):
        label = vcpu.get(t) or comm.get(t, str(t))
        rows.append({"name": "thread_name", "ph": "M", "pid": int(p), "tid": int(t),
                     "args": {"name": label}})
    return [pd.DataFrame(rows)]


def trace_json(rec, pids=None):
    """The Chrome Trace Event JSON text of a recording."""
    m = rec.manifest
    start = int(m.get("start_monotonic_ns") or 0)
    events = _waits(rec, start, pids) + _probe_events(rec, start, pids)
    frames = _names(rec, events) + events
    body = ",".join(f[1:-1] for f in (f.to_json(orient="records", double_precision=15)
                                      for f in frames) if len(f) > 2)
    other = json.dumps({"kvmlockprof": m.get("kvmlockprof_version"),
                        "kernel": m.get("kernel_release"), "host": m.get("host")})
    return (f'{{"displayTimeUnit": "ns", "otherData": {other}, '
            f'"traceEvents": [{body}]}}\n')
