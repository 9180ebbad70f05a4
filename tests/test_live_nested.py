"""Live: nested waits (a wait begun inside another wait of its task: a mutex's
wait_lock, an interrupt over a waiting task) and waits in interrupt context,
against an ftrace instance of lock:contention_*: its events are replayed here with
the kernel tracer's own context flags, never with project code. The plain rule: a
task's wait begins nested when another wait of that task is open; an interrupt's
when another interrupt wait of that CPU, or a wait of the task it interrupted, is
open (a mutex begins again while it waits: that is the same wait)."""
import os
from collections import Counter

import pytest

import kvmlockprof
from kvmlockprof.analysis import locks as analysis
from conftest import assert_none_left, kernel_objects, klp, workload_argv
from ftrace import Ftrace

pytestmark = pytest.mark.live


# An interrupt that comes between the two tracers' handlers of its task's begin or end
# (ftrace's runs first: attached first) sees the task's wait open in one and not in the
# other: an interrupt's wait this soon after one of them may be told nested either way.
EDGE_NS = 20_000


def replay(events, pid):
    """Of the process, from ftrace: {(lock, in an interrupt): nested waits}; the
    same of those either tracer may tell either way: begun before the process ran
    its command (its last exec: record adds the pid to its filter between its fork
    and that exec, a wait over the fork's own code, record's, may or may not be
    seen) or an interrupt's within EDGE_NS of its task's begin or end; and
    {lock: interrupt waits begun since the exec}."""
    execs = [ts for _tid, _tgid, ts, ev, f in events
             if ev == "sched_process_exec" and f.get("pid") == pid]
    assert execs, "ftrace saw no exec of the command"
    since = execs[-1]
    task, irq = {}, {}                  # open waits: tid -> {lock}, cpu -> {lock}
    last = {}                           # tid -> its task context's last begin or end
    nested, either, in_irq = Counter(), Counter(), Counter()
    for tid, tgid, ts, ev, f in events:
        if ev not in ("contention_begin", "contention_end"):
            continue
        lock, cpu, is_irq = f["lock_addr"], f["__cpu"], f["__irq"]
        mine = irq.setdefault(cpu, {}) if is_irq else task.setdefault(tid, {})
        if not is_irq:
            last[tid] = ts
        if ev == "contention_begin":
            if lock in mine:
                continue                # (a mutex's next begin: the same wait)
            others = any(k != lock for k in mine) or \
                (is_irq and bool(task.get(tid)))
            edge = ts < since or (is_irq and ts - last.get(tid, -EDGE_NS) < EDGE_NS)
            mine[lock] = (others, tgid, ts >= since, edge)
        elif lock in mine:
            was_nested, who, counted, edge = mine.pop(lock)
            if who == pid:
                nested[lock, is_irq] += was_nested
                either[lock, is_irq] += edge
                in_irq[lock] += is_irq and counted
    return +nested, +either, +in_irq


def test_nested_and_interrupt_waits_match_ftrace(live, tmp_path):
    before = kernel_objects()
    ft = Ftrace(f"kvmlockprof-nested-{os.getpid()}",
                {"lock/contention_begin": None, "lock/contention_end": None,
                 "sched/sched_process_exec": None})
    try:
        out = tmp_path / "n.parquet"
        klp("record", "-q", "-o", out, "--",
            *workload_argv("--duration", 4, "--vcpus", 2, "--churn"))
        ft.stop()
        events = ft.events()
        assert ft.overruns() == 0
    finally:
        ft.remove()
    assert_none_left(before)
    rec = kvmlockprof.load(out)
    pid, c = rec.manifest["command_pid"], rec.manifest["counters"]
    nested, either, in_irq = replay(events, pid)
    n = rec.table("nested_waits")
    n = n[n["tgid"] == pid]
    ours = Counter({(int(a), int(i)): int(k) for (a, i), k in
                    n.groupby(["lock_addr", "irq"])["count"].sum().items() if k})
    print(f"\nnested waits of the workload: ours {sum(ours.values())} on {len(ours)} locks, "
          f"ftrace's {sum(nested.values())} on {len(nested)}; interrupt waits "
          f"(of the recorded processes) ours {c['irq_waits']}, the workload's in ftrace "
          f"{sum(in_irq.values())}; lost_recursion {c['lost_recursion']}, begins under our end "
          f"handler {c.get('begin_under_end')}; waits either "
          f"tracer may tell either way {sum(either.values())}")
    assert sum(nested.values()) > 0, "no nested wait to compare: a heavier workload"
    # An event our program missed (it was running on the CPU: lost_recursion) changes
    # at most two: its own wait's, and an interrupt's over it before the next at its
    # level tells the missed end (a wait open at the same level is dropped then).
    slack = 2 * c["lost_recursion"]
    differ = {(hex(a), i): (ours[a, i], nested[a, i]) for a, i in set(ours) | set(nested)
              if ours[a, i] != nested[a, i]}
    assert sum(abs(o - t) for o, t in differ.values()) <= slack + sum(either.values()), \
        (differ, either)
    # the recorded processes' interrupt waits hold the command's: those that came from
    # user space included (on x86 they run on the task's stack; the tracer's flags
    # tell them)
    assert c["irq_waits"] >= sum(in_irq.values()) - slack
    # per VM, the time waited counts each instant once: its nested waits are left out
    vm = analysis.per_vm(rec).set_index("tgid").loc[pid]
    aggs = rec.aggregates
    total = int(aggs[aggs["tgid"] == pid]["total_ns"].sum())
    assert vm["nested_waits"] == sum(ours.values())
    assert vm["wait_ns"] == total - int(n["total_ns"].sum())
    assert "nested waits" in klp("report", out).stdout
