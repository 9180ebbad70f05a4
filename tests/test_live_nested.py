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


def replay(events, pid):
    """({(lock, in an interrupt): nested waits}, {lock: interrupt waits}) of the
    process, from ftrace."""
    task, irq = {}, {}                  # open waits: tid -> {lock}, cpu -> {lock}
    nested, in_irq = Counter(), Counter()
    for tid, tgid, _ts, ev, f in events:
        lock, cpu, is_irq = f["lock_addr"], f["__cpu"], f["__irq"]
        mine = irq.setdefault(cpu, {}) if is_irq else task.setdefault(tid, {})
        if ev == "contention_begin":
            if lock in mine:
                continue                # (a mutex's next begin: the same wait)
            others = any(k != lock for k in mine) or \
                (is_irq and bool(task.get(tid)))
            mine[lock] = (others, tgid)
        elif ev == "contention_end" and lock in mine:
            was_nested, who = mine.pop(lock)
            if who == pid:
                nested[lock, is_irq] += was_nested
                in_irq[lock] += is_irq
    return +nested, +in_irq


def test_nested_and_interrupt_waits_match_ftrace(live, tmp_path):
    before = kernel_objects()
    ft = Ftrace(f"kvmlockprof-nested-{os.getpid()}",
                {"lock/contention_begin": None, "lock/contention_end": None})
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
    nested, in_irq = replay(events, pid)
    n = rec.table("nested_waits")
    n = n[n["tgid"] == pid]
    ours = Counter({(int(a), int(i)): int(k) for (a, i), k in
                    n.groupby(["lock_addr", "irq"])["count"].sum().items() if k})
    print(f"\nnested waits of the workload: ours {sum(ours.values())} on {len(ours)} locks, "
          f"ftrace's {sum(nested.values())} on {len(nested)}; interrupt waits "
          f"(whole host) ours {c['irq_waits']}, the workload's in ftrace "
          f"{sum(in_irq.values())}; lost_recursion {c['lost_recursion']}")
    assert sum(nested.values()) > 0, "no nested wait to compare: a heavier workload"
    # An event our program missed (it was running on the CPU: lost_recursion) changes
    # at most two: its own wait's, and an interrupt's over it before the next at its
    # level tells the missed end (a wait open at the same level is dropped then).
    slack = 2 * c["lost_recursion"]
    assert sum(abs(ours[k] - nested[k]) for k in set(ours) | set(nested)) <= slack, \
        (ours, nested)
    # the host's interrupt waits hold the workload's: those that came from user space
    # included (on x86 they run on the task's stack; the tracer's flags tell them)
    assert c["irq_waits"] >= sum(in_irq.values()) - slack
    # per VM, the time waited counts each instant once: its nested waits are left out
    vm = analysis.per_vm(rec).set_index("tgid").loc[pid]
    aggs = rec.aggregates
    total = int(aggs[aggs["tgid"] == pid]["total_ns"].sum())
    assert vm["nested_waits"] == sum(ours.values())
    assert vm["wait_ns"] == total - int(n["total_ns"].sum())
    assert "nested waits" in klp("report", out).stdout
