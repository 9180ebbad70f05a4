"""kvmlockprof against the real peer, `perf lock contention -b` (BPF mode, built with
skeletons by `make peer`, bench/peer.py): the same waits, counted and timed by both.

kvmlockprof records perf as its command (`kvmlockprof record -- perf lock contention
-ab -v -- workload`), so record's window holds perf's, which holds the workload's:
every wait of a KVM stack (a stack through kvm_*: only the workload's VM makes them)
is inside both. perf 6.1 keys its entries by the 8 frames under the tracepoint
(`-v` prints them); kvmlockprof, with every stack walked (`--stack-budget 0`), keeps
the whole stack: the test cuts it the same way, itself.

The order matters: a tracepoint runs its programs in the order they attached. Ours
attach first, so at contention_begin ours takes its clock (after its stack walk, which
it leaves out of the wait) and perf's handler (its own walk included) runs inside our
wait as inside its own; at contention_end ours takes its clock first and perf's after
our whole handler. So each wait reads longer in perf than in ours by our end handler,
which the kernel measures (bpf_stats: record's handler_ns), a near constant whatever
the stack. (With perf first, our waits would lose perf's stack walk, which grows with
the stack's depth: rq-lock waits under __schedule read 6 us short of perf's 13.)
perf 6.1 keeps one wait a task: a wait nested in another of the same task (a
run-queue lock in __schedule while the task sleeps on a mutex) is ours only.

The lab test compares by lock address, with perf 6.12's -l, in the 6.12 guest.

Skipped, with the reason, where no built perf is cached: building it takes minutes
(`make peer`), and CI runs `make test` only."""
import glob
import json
import os
import re
import shlex
import shutil
import sys

import pytest

import kvmlockprof
from kvmlockprof.analysis import locks
from kvmlockprof.locktypes import LCB_F_SPIN
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
from peer import (caller_shares, end_misses, handler_ns, parse_perf,  # noqa: E402
                  parse_perf_callers, skew_ns, stacked)

CACHE = os.environ.get("KVMLOCKPROF_PEER_CACHE", "/var/cache/kvmlockprof/peer")
DEPTH = 8                   # perf's --max-stack default
# The frames above the function that fired the tracepoint, in kvmlockprof's stacks
# (its program and the tracing calls that reach it); perf's stacks skip them.
TRACING = re.compile(r"^(bpf_prog_|bpf_trace_run|__bpf_trace_|__traceiter_|trace_call_bpf"
                     r"|__SCT__|perf_trace_)")


def peer_perf():
    try:
        state = json.load(open(os.path.join(CACHE, "state.json")))
    except (OSError, ValueError):
        return None
    entry = state.get(f"6.1@{os.uname().release}") or next(
        (v for k, v in state.items() if k.endswith("@" + os.uname().release) and v.get("ok")),
        {})
    perf = entry.get("perf")
    return perf if entry.get("ok") and perf and os.access(perf, os.X_OK) else None


def need_perf():
    """The built peer: in CI (make test builds it) its absence fails, elsewhere skips."""
    perf = peer_perf()
    if not perf:
        why = f"no built `perf lock contention -b` in {CACHE}: `make peer` builds it"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return perf


def ours_by_stack(rec):
    """kvmlockprof's waits by the same key: the DEPTH frames under the tracing frames."""
    st = rec.stacks
    st = st[st["source"] == "contention"] if "source" in st.columns else st
    key_of = {}
    for sid, frames in zip(st["stack_id"], st["frames"]):
        frames = [f.split(" ")[0] for f in frames]
        i = next((i for i, f in enumerate(frames) if not TRACING.match(f)), len(frames))
        key_of[int(sid)] = tuple(frames[i:i + DEPTH])
    s = rec.samples
    out = {}
    for sid, g in s.groupby("stack_id"):
        k = key_of.get(int(sid))
        if k is None:
            continue
        n, total = out.get(k, (0, 0.0))
        out[k] = (n + len(g), total + float(g["wait_ns"].sum()))
    return out


def kvm_keys(d):
    return {k: v for k, v in d.items() if any(f.startswith("kvm_") for f in k)}


@pytest.fixture(scope="module")
def side_by_side(live, tmp_path_factory):
    said, out, cost = stacked(need_perf(), tmp_path_factory.mktemp("peer"),
                              ["--stack-budget", "0"])
    return parse_perf(said), kvmlockprof.load(out), said, cost


@pytest.fixture(scope="module")
def default_side_by_side(live, tmp_path_factory):
    """record with its defaults (stacks for at most 250 waits/s a CPU, the rest spread)
    around perf lock contention -ab -v (every wait's stack) on the churn workload."""
    said, out, cost = stacked(need_perf(), tmp_path_factory.mktemp("peer-default"), [])
    return parse_perf_callers(said), kvmlockprof.load(out), cost


def test_default_per_caller_shares_agree_with_perf(default_side_by_side):
    """The default's answer by caller (an estimate: the unwalked waits spread over
    their lock's walked callers) against perf's exact one in the same window: each of
    perf's top 10 callers on KVM's stacks only (parse_perf_callers), its share of those
    ten's wait time within 2 points, the callers above 5% in the same order, and `~` on
    the rows the report estimates."""
    from kvmlockprof.views import report
    theirs, rec, cost = default_side_by_side
    top, so, st = caller_shares(rec, theirs)
    print(f"\nper wait, kvmlockprof's time + {skew_ns(rec):.0f} ns (handlers: perf's {cost}, "
          f"ours {(rec.manifest.get('handler_ns') or {}).get('contention_begin')})")
    print("\ncaller: kvmlockprof (default) | perf (every stack), share of the ten's wait")
    for c in top:
        print(f"  {c:<48} {so.get(c, 0):7.1%} | {st[c]:7.1%}")
    for c in top:
        assert abs(so.get(c, 0) - st[c]) <= 0.02, (c, so.get(c, 0), st[c])
    big = [c for c in top if st[c] > 0.05]
    assert sorted(big, key=lambda c: -so.get(c, 0)) == big, big
    text = report.render(rec, by="caller", limit=30)
    for r in locks.top(rec, by="caller", limit=30).itertuples():
        line = next(x for x in text.splitlines() if x.rstrip().endswith(str(r.caller)) and
                    str(r.lock) in x)
        assert line.split()[0].startswith("~") == bool(r.estimated), line


def test_per_stack_counts_and_totals_agree_with_perf(side_by_side):
    theirs, rec, text, cost = side_by_side
    losses = rec.manifest["losses"]
    # A wait whose stack could not be stored has no key, and the kernel skips our
    # program for an event that fires while a BPF program (perf's) runs on that CPU
    # (lost_recursion): both counted, both within the 1% below.
    print(f"\nkvmlockprof losses: {losses}")
    assert not any(v for k, v in losses.items() if k not in ("stack_failures",
                                                             "lost_recursion")), losses
    ours = ours_by_stack(rec)
    mine, peer = kvm_keys(ours), kvm_keys(theirs)
    assert len(peer) >= 5 and len(mine) >= 5, (len(peer), len(mine))
    both = set(mine) & set(peer)
    n_mine, n_peer = sum(mine[k][0] for k in both), sum(peer[k][0] for k in both)
    t_mine, t_peer = sum(mine[k][1] for k in both), sum(peer[k][1] for k in both)
    only_ours = sum(v[0] for k, v in mine.items() if k not in peer)
    only_perf = sum(v[0] for k, v in peer.items() if k not in mine)
    # each of perf's waits ends after our end handler (skew_ns)
    shift = skew_ns(rec)
    bad = re.search(r"bad: (\d+), total: (\d+)", text)
    print(f"\nKVM stacks in both: {len(both)}, kvmlockprof {n_mine} waits {t_mine / 1e6:.2f} ms, "
          f"perf {n_peer} waits {t_peer / 1e6:.2f} ms; only ours: {only_ours} waits "
          f"(nested), only perf's: {only_perf}; perf's handlers (bpf_stats) {cost}: ours "
          f"expected {n_mine * shift / 1e6:.2f} ms shorter; perf's bad sequences "
          f"{bad.group(1) if bad else '?'} of {bad.group(2) if bad else '?'}")
    rows = sorted(set(mine) | set(peer), key=lambda k: -max(mine.get(k, (0, 0))[1],
                                                             peer.get(k, (0, 0))[1]))
    for k in rows[:15]:
        (a, ta), (b, tb) = mine.get(k, (0, 0.0)), peer.get(k, (0, 0.0))
        print(f"  {a:>7} {b:>7} waits  {ta / 1e3:>10.1f} {tb / 1e3:>10.1f} us  "
              f"{' < '.join(f.split('+')[0] for f in k[:4])}")
    assert len(cost) == 2, cost
    assert abs(n_mine - n_peer) <= 0.01 * n_peer, (n_mine, n_peer)
    assert only_perf <= 0.01 * n_peer and only_ours <= 0.05 * n_mine, (only_perf, only_ours)
    assert abs(t_mine + n_mine * shift - t_peer) <= 0.05 * t_peer, (t_mine, t_peer, shift)
    for k in both:
        (a, ta), (b, tb) = mine[k], peer[k]
        if max(a, b) >= 100:
            assert abs(a - b) <= 0.01 * max(a, b) + 2, (k, a, b)
    # the stacks that weigh (1% of the wait time on either side) in the same order,
    # wherever perf's totals tell them apart by more than the 5% the totals may differ
    # by (two within it may swap: a storm's rq-lock and mmu-lock stacks often are)
    heavy = [k for k in both if max(mine[k][1] / t_mine, peer[k][1] / t_peer) >= 0.01]
    ours_t = {k: mine[k][1] + mine[k][0] * shift for k in heavy}
    swapped = [(k1, k2) for k1 in heavy for k2 in heavy
               if peer[k1][1] > 1.1 * peer[k2][1] and ours_t[k1] <= ours_t[k2]]
    assert not swapped, [(k1[:3], k2[:3], peer[k1][1], peer[k2][1], ours_t[k1], ours_t[k2])
                         for k1, k2 in swapped]


PERF_V = """\
 contended   total wait     max wait     avg wait         type   caller

        60     21.71 ms     10.94 ms    361.87 us        mutex   kvm_vm_ioctl+0xcce
			0xffffffff8226f63e  __mutex_lock.constprop.0+0x5e
			0xffffffff8127db89  kvm_vm_ioctl+0xcce
      6597     24.58 us     37.68 ns      3.72 ns     spinlock   __task_rq_lock+0x35
			0xffffffff8226f63e  __pv_queued_spin_lock_slowpath+0x10e
			0xffffffff813ae8f5  __task_rq_lock+0x35

=== output for debug===
"""


def test_perfs_entries_are_read_with_their_stacks_and_units():
    got = parse_perf(PERF_V)
    assert got == {("__mutex_lock.constprop.0+0x5e", "kvm_vm_ioctl+0xcce"): (60, 21.71e6),
                   ("__pv_queued_spin_lock_slowpath+0x10e", "__task_rq_lock+0x35"):
                   (6597, 24.58e3)}


def built_perfs():
    """{(major, minor): path} of the perfs bench/peer.py built, loadable here or not."""
    out = {}
    for path in glob.glob(os.path.join(CACHE, "perf-*", "perf")):
        m = re.match(r"perf-(\d+)\.(\d+)", os.path.basename(os.path.dirname(path)))
        if m and os.access(path, os.X_OK):
            out[(int(m.group(1)), int(m.group(2)))] = path
    return out


def parse_perf_by_address(text, sep=","):
    """perf lock contention -l -x SEP's rows (6.2+): {address: (count, total ns)}.
    Each row is contended, total, max, avg wait (ns: -x prints raw numbers), then
    the address in hex, perf's name for it and the lock type."""
    out = {}
    for line in text.splitlines():
        f = [x.strip() for x in line.split(sep)]
        if len(f) < 7 or line.startswith("#") or not f[0].isdigit():
            continue
        n, total, addr = int(f[0]), float(f[1]), int(f[4], 16)
        a, t = out.get(addr, (0, 0.0))
        out[addr] = (a + n, t + total)
    return out


PERF_L = """\
# output: contended, total wait, max wait, avg wait, address, symbol, type
1542, 81234567, 912345, 52681, ffff8881023c4d10, , mutex
17, 20431, 3012, 1201, ffffffff83a1b2c0, jiffies_lock, spinlock
"""


def test_perfs_address_rows_are_read_in_ns():
    assert parse_perf_by_address(PERF_L) == {0xffff8881023c4d10: (1542, 81234567.0),
                                             0xffffffff83a1b2c0: (17, 20431.0)}


def lab_perf(tmp_path, version):
    """The newest built perf of at least `version`, copied where the lab's guest sees it
    (it mounts its own /var/cache); skips without a lab or such a perf."""
    from test_lab import lab_problem
    problem = lab_problem()
    if problem:
        pytest.skip(f"no lab: {problem}")
    newer = {v: p for v, p in built_perfs().items() if v >= version}
    if not newer:
        pytest.skip(f"no perf {'.'.join(map(str, version))}+ built in {CACHE} (`make peer` "
                    "builds 6.12 where linux-source-6.12 is installed)")
    shutil.copy(newer[max(newer)], tmp_path / "perf")
    print(f"\nperf {newer[max(newer)]}")
    return tmp_path / "perf"


@pytest.mark.lab
def test_per_lock_address_agrees_with_perf_in_the_lab(tmp_path):
    """By lock address, with the perf that has -l (6.2+): on the lab's 6.12 kernel, whose
    CONFIG_KALLSYMS_ALL lets perf 6.12's skeleton load (this host's kernel does not).
    Compared on the locks of the workload's VM (named kvm(PID)->... by kvmlockprof):
    they exist only while the workload runs, inside both windows."""
    from test_lab import lab_run
    lab_perf(tmp_path, (6, 2))            # ./perf in the lab
    work = "kvmlockprof workload --vcpus 2 --duration 6 --churn --kvmclock"
    peer = (f"./perf lock contention -ab -l -x , -E 100000 -- sh -c "
            f"{shlex.quote(work + ' && bpftool -j prog show > progs.json')} > perf.txt 2>&1")
    # ours attached first (the module's doc): perf's clock at each end runs after ours
    lab_run(tmp_path, "echo 1 > /proc/sys/kernel/bpf_stats_enabled; kvmlockprof record -q "
            f"-o addr.parquet --probes contention,vms -- sh -c {shlex.quote(peer)}")
    text = (tmp_path / "perf.txt").read_text()
    theirs = parse_perf_by_address(text)
    rec = kvmlockprof.load(tmp_path / "addr.parquet")
    cost = handler_ns(tmp_path / "progs.json")
    # Per wait, ours is perf's less our end handler (skew_ns), which under the emulator
    # varies with what the handler does (the first wait of a key fills it): so a bound,
    # from none to twice its mean, not a shift.
    e = skew_ns(rec)
    pid = rec.manifest["work"]["pid"]
    vm = {int(a, 16): n for a, n in locks.lock_names(rec).items()
          if n.startswith(f"kvm({pid})->")}
    s = rec.samples
    g = s[s["lock_addr"].isin(list(vm))].groupby("lock_addr")["wait_ns"].agg(["size", "sum"])
    mine = {int(a): (int(r["size"]), float(r["sum"])) for a, r in g.iterrows()}
    peer = {a: theirs[a] for a in vm if a in theirs}
    print(f"perf's handlers (bpf_stats) {cost}, our end handler {e:.0f} ns; the VM's locks:")
    for a in sorted(set(mine) | set(peer), key=lambda a: -peer.get(a, (0, 0))[1]):
        (n, t), (pn, pt) = mine.get(a, (0, 0.0)), peer.get(a, (0, 0.0))
        print(f"  {vm[a]:<36} {n:>7} {pn:>7} waits  {t / 1e6:>9.2f} {pt / 1e6:>9.2f} ms "
              f"({(t - pt) / max(pt, 1):+.1%}; our end handler allows "
              f"-{2 * n * e / max(pt, 1):.1%})")
    assert len(cost) == 2, cost
    assert len(mine) >= 2 and set(mine) == set(peer), (mine, peer)
    # (perf loses a task's later waits after a skipped run of its end handler: said)
    missed = end_misses(tmp_path / "progs.json")
    for a in mine:
        (n, t), (pn, pt) = mine[a], peer[a]
        assert abs(n - pn) <= 0.01 * pn + 2, (vm[a], n, pn, f"perf's end misses: {missed}")
        if pn >= 100:
            assert pt - 2 * n * e - 0.05 * pt <= t <= pt + 0.05 * pt, (vm[a], t, pt, e)
    top = lambda d: {a for a, _ in sorted(d.items(), key=lambda kv: -kv[1][1])[:10]}  # noqa
    assert top(mine) == top(peer)


def parse_perf_names(text, sep=","):
    """perf lock contention -l -x SEP's rows: {address: perf's name for it ("" none)}."""
    out = {}
    for line in text.splitlines():
        f = [x.strip() for x in line.split(sep)]
        if len(f) >= 7 and not line.startswith("#") and f[0].isdigit():
            out[int(f[4], 16)] = f[5]
    return out


def test_perfs_end_misses_are_read(tmp_path):
    """perf's tp_btf contention_end's skipped runs (bpftool -j prog show), not ours (a
    raw tracepoint of the same name), nor perf's begin's."""
    progs = tmp_path / "progs.json"
    progs.write_text(json.dumps([
        {"type": "tracing", "name": "contention_end", "run_cnt": 9, "recursion_misses": 3},
        {"type": "tracing", "name": "contention_begin", "recursion_misses": 4},
        {"type": "raw_tracepoint", "name": "contention_end", "recursion_misses": 5},
        {"type": "kprobe", "name": "other"}]))
    assert end_misses(progs) == 3
    progs.write_text(json.dumps([{"type": "tracing", "name": "contention_end"}]))
    assert end_misses(progs) == 0


def test_a_run_where_perf_lost_waits_is_made_again(tmp_path, monkeypatch):
    """stacked() runs again while perf's end handler was skipped, at most `tries` runs,
    and fails rather than hand on a run perf is short in."""
    import peer
    runs, misses = [], [2, 0]
    monkeypatch.setattr(peer, "_stacked", lambda perf, d, *a: runs.append(d) or
                        ("said", d / "rec.parquet", d / "progs.json"))
    monkeypatch.setattr(peer, "end_misses", lambda progs: misses.pop(0))
    monkeypatch.setattr(peer, "handler_ns", lambda progs: {"contention_end": 1.0})
    said, out, cost = peer.stacked("perf", tmp_path, [])
    assert [d.name for d in runs] == ["run1", "run2"] and out == tmp_path / "run2" / "rec.parquet"
    runs.clear()
    misses[:] = [1, 1, 1]
    with pytest.raises(RuntimeError, match="perf lost waits"):
        peer.stacked("perf", tmp_path, [], tries=3)
    assert len(runs) == 3


def test_perfs_names_are_read():
    assert parse_perf_names(PERF_L) == {0xffff8881023c4d10: "", 0xffffffff83a1b2c0: "jiffies_lock"}


@pytest.mark.lab
def test_lock_names_agree_with_perf_in_the_lab(tmp_path):
    """The kernel locks' names against perf 6.12's (-l), where it has them, on the lab's
    6.12 kernel: its rq_lock is each CPU's `runqueues` (bpf_per_cpu_ptr, kallsyms),
    ours the run queue found from a task on each CPU; its mmap_lock the waiter's mm,
    as ours; its kallsyms names our data symbols. Every address perf names one of
    these ways, kvmlockprof names the same way, and the other way round; an mmap_lock
    at least is among them."""
    from test_lab import lab_run
    lab_perf(tmp_path, (6, 4))            # ./perf in the lab
    work = (f"kvmlockprof workload --vcpus 2 --duration 6 --churn & "
            f"python3 {ROOT}/tests/mmap_storm.py 6 4; wait")
    record = ("kvmlockprof record -q -a --stack-budget 0 -o names.parquet -- sh -c "
              + shlex.quote(work))
    lab_run(tmp_path, f"./perf lock contention -ab -l -x , -E 100000 -- sh -c "
            f"{shlex.quote(record)} > perf.txt 2>&1")
    theirs = parse_perf_names((tmp_path / "perf.txt").read_text())
    rec = kvmlockprof.load(tmp_path / "names.parquet")
    ours = {int(a, 16): n for a, n in locks.lock_names(rec).items()}
    symbols = {int(a, 16) for a in rec.manifest.get("lock_symbols") or {}}
    print("by address (perf | kvmlockprof):")
    for a in sorted(set(theirs) | set(ours)):
        if theirs.get(a) or ours.get(a, "").startswith(("rq(", "mm(")):
            print(f"  {a:#x}  {theirs.get(a, '-'):<24} {ours.get(a, '-')}")
    rule = {"rq_lock": r"rq\(cpu \d+\)->(__)?lock$", "mmap_lock": r"mm\(\d+\)->mmap_lock$"}
    # perf runs around record: a lock waited on only before our probes attached (our
    # loader's own start-up) or after they detached is perf's alone: not a name to judge
    seen = set(rec.aggregates["lock_addr"].astype("uint64").tolist())
    for a in theirs:
        if a not in seen:
            continue
        p, n = theirs[a], ours.get(a, "")
        if p in rule:
            assert re.match(rule[p], n), (hex(a), p, n)
        elif p:
            assert a in symbols and n == p, (hex(a), p, n)
    for a in theirs:
        for p, r in rule.items():
            if re.match(r, ours.get(a, "")):
                # perf names an address by its first waiter alone (check_lock_type when
                # the entry is made): an mmap_lock first waited on from another mm (a
                # /proc/PID/cmdline read takes it) stays unnamed there
                assert theirs[a] in ((p, "") if p == "mmap_lock" else (p,)), \
                    (hex(a), theirs[a], ours[a])
    assert any(theirs[a] == "mmap_lock" for a in theirs if a in seen), theirs
    # perf names a run queue's lock only when its own CPU's waits on it; under the
    # emulator no spinlock is contended in most runs (no spinlock wait in the two runs
    # of 2026-12-05): the run queues' names are checked against BTF on the host
    # (test_live_names), here only when the run has them
    spins = int(rec.aggregates.loc[rec.aggregates["flags"] == LCB_F_SPIN, "count"].sum())
    print(f"spinlock waits recorded: {spins}; perf's rq_lock rows: "
          f"{sum(p == 'rq_lock' for p in theirs.values())}")
