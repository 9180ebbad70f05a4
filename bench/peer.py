"""The real peer: `perf lock contention -b`, built with BPF skeletons from Debian's
kernel source packages (Debian's linux-perf has none), cached outside the repo.

Tries the newest /usr/src/linux-source-*.tar.xz first; keeps the first perf whose
`perf lock contention -ab` loads on the running kernel. A version that builds but
cannot load here (perf 6.12's skeleton needs the data symbol `runqueues`, which a
kernel without CONFIG_KALLSYMS_ALL does not list) is remembered with its reason, so
a second run builds nothing. Prints the version, `perf lock contention -ab -- sleep
1`, and the path (also `--print-path` alone, for the benchmarks and tests).
"""
import argparse
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

CACHE = os.environ.get("KVMLOCKPROF_PEER_CACHE", "/var/cache/kvmlockprof/peer")
# perf's optional features we do not need (each is a -dev package otherwise)
MAKE_FLAGS = ["BUILD_BPF_SKEL=1", "NO_LIBPYTHON=1", "NO_LIBPERL=1", "NO_SLANG=1", "NO_GTK2=1",
              "NO_LIBBABELTRACE=1", "NO_LIBUNWIND=1", "NO_SDT=1", "NO_JVMTI=1", "NO_LIBNUMA=1",
              "NO_LIBCRYPTO=1", "NO_LIBPFM4=1", "NO_LIBLLVM=1", "NO_DEMANGLE=1"]
# What tools/perf's build reads from the kernel tree (not the 1 GB of drivers)
TREE = ("tools/", "include/", "arch/x86/", "arch/arm64/", "lib/", "scripts/", "kernel/",
        "Makefile")


def sources():
    """(version, tarball) newest first."""
    out = []
    for t in glob.glob("/usr/src/linux-source-*.tar.xz"):
        v = re.match(r"linux-source-(.+)\.tar\.xz", os.path.basename(t)).group(1)
        out.append((tuple(int(x) for x in v.split(".")), v, t))
    return [(v, t) for _, v, t in sorted(out, reverse=True)]


def extract(tarball, dest):
    top = os.path.basename(tarball)[:-len(".tar.xz")]
    tree = os.path.join(dest, top)
    if os.path.exists(os.path.join(tree, ".extracted")):
        return tree
    with tarfile.open(tarball) as tar:
        members = [m for m in tar if m.name.split("/", 1)[-1].startswith(TREE)]
        tar.extractall(dest, members=members, filter="fully_trusted") \
            if sys.version_info >= (3, 12) else tar.extractall(dest, members=members)
    open(os.path.join(tree, ".extracted"), "w").close()
    return tree


def build(version, tarball, log):
    out = os.path.join(CACHE, f"perf-{version}")
    perf = os.path.join(out, "perf")
    if os.path.exists(perf):
        return perf
    os.makedirs(out, exist_ok=True)
    tree = extract(tarball, CACHE)
    with open(log, "w") as f:
        p = subprocess.run(["make", "-C", os.path.join(tree, "tools/perf"), f"O={out}",
                            f"-j{os.cpu_count()}", *MAKE_FLAGS],
                           stdout=f, stderr=subprocess.STDOUT)
    if p.returncode or not os.path.exists(perf):
        raise RuntimeError(f"perf {version} did not build (exit {p.returncode}): see {log}")
    return perf


def loads(perf):
    """(ok, output of `perf lock contention -ab -- sleep 1`)."""
    p = subprocess.run([perf, "lock", "contention", "-ab", "--", "sleep", "1"],
                       capture_output=True, text=True, timeout=120)
    text = (p.stdout + p.stderr).strip()
    ok = p.returncode == 0 and "failed to load" not in text.lower() and \
        "no BUILD_BPF_SKEL" not in text
    return ok, text


def find(verbose=True):
    """The path of a perf whose `lock contention -b` loads here, building one if need be."""
    os.makedirs(CACHE, exist_ok=True)
    state_path = os.path.join(CACHE, "state.json")
    state = json.load(open(state_path)) if os.path.exists(state_path) else {}
    release = os.uname().release
    say = print if verbose else (lambda *a: None)
    for version, tarball in sources():
        key = f"{version}@{release}"
        if state.get(key, {}).get("ok") is False:
            say(f"perf {version}: skipped, it did not work here: {state[key]['why']}")
            continue
        try:
            perf = build(version, tarball, os.path.join(CACHE, f"build-{version}.log"))
        except (RuntimeError, OSError, tarfile.TarError) as e:
            state[key] = {"ok": False, "why": str(e)}
            say(f"perf {version}: {e}")
            continue
        ok, text = loads(perf)
        if not ok:
            why = next((line for line in text.splitlines() if "fail" in line.lower()),
                       text.splitlines()[-1] if text else "no output")
            state[key] = {"ok": False, "why": f"its skeleton does not load: {why.strip()}"}
            say(f"perf {version}: built, but {state[key]['why']}")
            continue
        state[key] = {"ok": True, "perf": perf}
        json.dump(state, open(state_path, "w"), indent=1)
        return perf, text
    json.dump(state, open(state_path, "w"), indent=1)
    return None, None


# Reading perf lock contention -v's output, and running it under kvmlockprof record: the
# peer comparisons of tests/test_live_peer.py and bench/peer_accuracy.py.
UNIT_NS = {"ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9}


def parse_perf(text):
    """perf lock contention -v's entries: {stack frames (tuple): (count, total ns)}."""
    out, key, head = {}, None, None
    row = re.compile(r"^\s*(\d+)\s+([\d.]+) (ns|us|ms|s)\s+([\d.]+) (ns|us|ms|s)\s+"
                     r"([\d.]+) (ns|us|ms|s)\s+(\S+)\s+(\S+)\s*$")
    frame = re.compile(r"^\s+0x[0-9a-f]+\s+(\S+)")

    def close():
        if head is not None:
            k = tuple(key)
            n, total = out.get(k, (0, 0.0))
            out[k] = (n + head[0], total + head[1])
    for line in text.splitlines():
        m = row.match(line)
        if m:
            close()
            head = (int(m.group(1)), float(m.group(2)) * UNIT_NS[m.group(3)])
            key = []
            continue
        f = frame.match(line)
        if f and head is not None:
            key.append(f.group(1))
        elif head is not None and not line.strip():
            continue
    close()
    return out


def parse_perf_callers(text):
    """perf lock contention -v's rows by perf's own caller column, over the rows whose
    stack passes KVM, of the callers perf saw nowhere else: {caller: total ns}. (perf
    sees the whole host, kvmlockprof one process: a caller both see outside KVM too, a
    run-queue lock's, weighs the host's waits on one side and the process's on the
    other; one only KVM's stacks reach counts the same waits on both.)"""
    out, cur = {}, None
    row = re.compile(r"^\s*(\d+)\s+([\d.]+) (ns|us|ms|s)\s+[\d.]+ (?:ns|us|ms|s)\s+"
                     r"[\d.]+ (?:ns|us|ms|s)\s+\S+\s+(\S+)\s*$")
    frame = re.compile(r"^\s+0x[0-9a-f]+\s+(\S+)")
    rows = []
    for line in text.splitlines():
        m = row.match(line)
        if m:
            cur = [m.group(4), float(m.group(2)) * UNIT_NS[m.group(3)], False]
            rows.append(cur)
        elif cur is not None and (f := frame.match(line)):
            cur[2] = cur[2] or f.group(1).startswith("kvm_")
    mixed = {caller for caller, _, kvm in rows if not kvm}
    for caller, ns, kvm in rows:
        if kvm and caller not in mixed:
            out[caller] = out.get(caller, 0.0) + ns
    return out


def handler_ns(progs):
    """ns a run of perf's two tp_btf handlers, from `bpftool -j prog show` (bpf_stats on),
    by their names as the kernel cuts them: contention_beg(in), contention_end."""
    cost = {}
    for prog in json.load(open(progs)):
        name = prog.get("name", "")
        if prog.get("type") == "tracing" and name.startswith("contention_") and \
                prog.get("run_cnt"):
            cost[name[:14]] = prog["run_time_ns"] / prog["run_cnt"]
    return cost


def end_misses(progs):
    """Runs the kernel skipped of perf's contention_end (bpftool's recursion_misses): an
    end that fires inside that program's own run on the CPU (an interrupt's wait taken
    just as it returns). perf 6.1 then keeps the interrupted task's entry set to the
    interrupt's lock and ignores every later wait of that task (a CI run's signature:
    perf had half of the workload's memslot mutex waits, and of every stack the churn
    threads make, the vCPU threads' stacks equal; its misses were not read then)."""
    return sum(p.get("recursion_misses") or 0 for p in json.load(open(progs))
               if p.get("type") == "tracing" and p.get("name") == "contention_end")


def stacked(perf, d, record_args, workload=("--vcpus", "2", "--churn"), seconds=6, tries=3):
    """kvmlockprof record (its programs attached first: see tests/test_live_peer.py)
    running perf lock contention -ab -v (every wait's stack) running the built-in
    workload; bpftool after the workload, while perf's programs are loaded: their run
    times. Run again (at most `tries` runs) while perf lost a task's waits (end_misses).
    (perf's text, the recording's path, perf's handler costs.)"""
    for n in range(1, tries + 1):
        said, out, progs = _stacked(perf, d / f"run{n}", record_args, workload, seconds)
        missed = end_misses(progs)
        if not missed:
            break
        print(f"perf's contention_end skipped {missed} run(s) (recursion_misses): its "
              f"count of that task's later waits is short; run {n} of {tries}", file=sys.stderr)
    if missed:
        raise RuntimeError(f"perf lost waits (end_misses) in each of {tries} runs")
    return said, out, handler_ns(progs)


def _stacked(perf, d, record_args, workload, seconds):
    d.mkdir(parents=True)
    out, progs, text = d / "rec.parquet", d / "progs.json", d / "perf.txt"
    work = shlex.join([sys.executable, "-m", "kvmlockprof", "workload", "--duration",
                       str(seconds), *workload])
    inner = f"{work} && bpftool -j prog show > {progs}"
    argv = [perf, "lock", "contention", "-ab", "-v", "-E", "1000000", "--", "sh", "-c", inner]
    peer = f"{shlex.join(argv)} > {text} 2>&1"
    stats = "/proc/sys/kernel/bpf_stats_enabled"
    was = open(stats).read().strip()
    open(stats, "w").write("1")
    try:
        p = subprocess.run([sys.executable, "-m", "kvmlockprof", "record", "-q", *record_args,
                            "-o", str(out), "--", "sh", "-c", peer],
                           capture_output=True, text=True, timeout=300 + seconds,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    finally:
        open(stats, "w").write(was)
    said = text.read_text() if text.exists() else ""
    if p.returncode:
        raise RuntimeError(f"record around perf failed ({p.returncode}): "
                           f"{p.stderr[-2000:]}{said[-2000:]}")
    return said, out, progs


def skew_ns(rec):
    """How much shorter kvmlockprof times a wait than perf, its programs attached
    first: our end handler, which runs before perf's clock (record's bpf_stats)."""
    h = (rec.manifest.get("handler_ns") or {}).get("contention_end") or {}
    if not h.get("ns_per_run"):
        raise RuntimeError(f"no cost of the end handler measured: {rec.manifest.get('handler_ns')}")
    return h["ns_per_run"]


def caller_shares(rec, theirs, n=10):
    """The n callers perf makes heaviest on KVM's stacks (and on no other:
    parse_perf_callers), each one's share of the n's wait time in kvmlockprof's
    by-caller answer and in perf's: (callers, ours, perf's). The two count the same
    waits there: the workload's, the only process in KVM. Each of our waits as perf
    times it (skew_ns); perf's caller has no [module] (kvm.ko's functions have one in
    ours)."""
    from kvmlockprof.analysis import locks
    df = locks.top(rec, by="caller")
    skew = skew_ns(rec)
    ours = df.assign(caller=df["caller"].astype(str).str.replace(r" \[\w+\]$", "", regex=True),
                     t=df["total_ns"] + df["contended"] * skew) \
        .groupby("caller")["t"].sum().to_dict()
    top = sorted(theirs, key=theirs.get, reverse=True)[:n]

    def share(d):
        whole = sum(d.get(c, 0) for c in top)
        return {k: d.get(k, 0) / whole if whole else 0.0 for k in top}
    return top, share(ours), share(theirs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print-path", action="store_true",
                    help="Print only the perf path (empty if none), building if need be.")
    a = ap.parse_args()
    if not sources():
        sys.exit("no /usr/src/linux-source-*.tar.xz: apt-get install linux-source-6.1")
    if not shutil.which("clang"):
        sys.exit("no clang: run `make peer` (it installs the build dependencies)")
    perf, text = find(verbose=not a.print_path)
    if a.print_path:
        print(perf or "")
        return
    if not perf:
        sys.exit("no perf with a loadable lock-contention skeleton on this kernel; "
                 f"the reasons are above and in {CACHE}/state.json")
    version = subprocess.run([perf, "version"], capture_output=True, text=True).stdout.strip()
    print(f"{version} ({perf}) on {os.uname().release}\n$ perf lock contention -ab -- sleep 1")
    print(text)


if __name__ == "__main__":
    main()
