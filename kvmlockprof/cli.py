"""The `kvmlockprof` command line."""
import json
import os
import signal
import subprocess
import sys

import click

from kvmlockprof import __version__, catalog
from kvmlockprof.options import OptionError, click_options
from kvmlockprof.probes.contention import ContentionOptions
from kvmlockprof.probes.sources import SessionOptions

EPILOG_RECORD = """\b
Examples:
  kvmlockprof record --duration 10                  # whole host, 10 s
  kvmlockprof record -p 1234 -o vm.parquet          # one VM (qemu pid 1234)
  kvmlockprof record -- kvmlockprof workload --churn --duration 10
  kvmlockprof record -a -- ./my-test.sh             # whole host while it runs
  kvmlockprof record --stack-budget 0 -d 10         # a kernel stack for every wait
  kvmlockprof record --probes vms,lockorder --srcu-at kvm_vcpu_update_apicv -- ./test.sh
  kvmlockprof record -x -p 1234 -d 30               # + each vCPU's waits by lock, exit reason
"""
EPILOG_REPORT = """\b
Examples:
  kvmlockprof report kvmlockprof.parquet
  kvmlockprof report vm.parquet --by caller --sort max --limit 10 --stacks
  kvmlockprof report vm.parquet --format csv -o top.csv
  kvmlockprof report vm.parquet --html vm.html
  kvmlockprof report vm.parquet --format folded > vm.folded   # flamegraph.pl, speedscope
  kvmlockprof report vm.parquet --format trace-json -o vm.json # Perfetto, chrome://tracing
  kvmlockprof report vm.parquet --tid 4321,4322  # those threads' waits, from the samples
  kvmlockprof report debug.parquet --order    # recorded with --probes lockorder
  kvmlockprof report owners.parquet --by owner   # recorded with --lock-owner
"""
EPILOG_WORKLOAD = """\b
Examples:
  kvmlockprof workload --vcpus 4 --duration 10
  kvmlockprof workload --churn --churn-threads 2      # memslot churn
  kvmlockprof workload --kvmclock                     # gfn_to_pfn_cache traffic
  kvmlockprof workload --xen --xen-slow-every 100     # Xen event channels (lab kernel)
  kvmlockprof workload --vms 20 --vcpus 1 --churn --churn-rate 20  # 20 VMs, a process each
  kvmlockprof workload --lpis 64 --lpi-reset-every 0.5 # arm64: vGIC ITS LPIs, released
"""


def fail(msg, code=1):
    click.echo(f"kvmlockprof: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
def main():
    """eBPF live lock-contention profiler for Linux KVM hosts."""


# perf lock contention's sort keys (-k), as ours name them
PERF_SORT_KEYS = {"wait_total": "total", "wait_max": "max", "wait_min": "min",
                  "avg_wait": "avg"}
SORTS = ["contended", "total", "max", "avg", "min", "p50", "p90", "p99"]
GROUPS = ["lock", "address", "caller", "process", "thread", "owner"]


def options(opts):
    """A decorator adding these click options, in their order in --help."""
    def add(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return add


def probe_options(f):
    """Every function probe's own options (Probe.options), for `record`."""
    for p in reversed(catalog.CATALOG):
        if p.options:
            f = click_options(p.options)(f)
    return f


def session_options(kwargs, **contention):
    """A command's SessionOptions from its parameters (taken out of kwargs);
    contention: the contention options the command fixes. A bad value fails."""
    try:
        return SessionOptions.from_kwargs(kwargs, **contention)
    except OptionError as e:
        fail(str(e))


def filter_options(kernel=False):
    """perf lock contention's -L/-Y/-S (and, where the kernel applies them: record, top,
    --tid and -G), the same letters as perf's."""
    where = " Filtered in the kernel." if kernel else ""
    opts = [
        click.option("-L", "--lock-filter", "lock_filter", metavar="LOCK,...",
                     callback=_csv, help="Only these locks: an address, a symbol, "
                     "or a glob on the KVM-aware name (kvm->mmu_lock, vcpu->mutex, "
                     "'kvm->arch.*'); perf's -L." + (" Addresses and symbols are filtered "
                     "in the kernel, names as the recording is read." if kernel else "")),
        click.option("-Y", "--type-filter", "type_filter", metavar="TYPE,...",
                     callback=_csv, help="Only these lock types (spinlock, rwlock, "
                     "rwlock:W, mutex, rwsem:R...); perf's -Y." + where),
        click.option("-S", "--callstack-filter", "callstack_filter",
                     metavar="NAME,...", callback=_csv, help="Only waits whose stack "
                     "has a frame containing one of these; perf's -S." +
                     (" Applied as the recording is read (stacks are walked for some "
                      "waits only)." if kernel else ""))]
    if kernel:
        opts += [
            click.option("--tid", "tids", metavar="TID,...", callback=_ints,
                         help="Only these threads; perf's --tid. Filtered in the kernel."),
            click.option("-G", "--cgroup", "cgroups", metavar="CGROUP,...", callback=_csv,
                         help="Only tasks in these cgroup v2 groups or below them (relative "
                         "to /sys/fs/cgroup, e.g. machine.slice); perf's -G. Filtered in "
                         "the kernel.")]
    return opts


def _ints(ctx, param, value):
    try:
        return tuple(int(v) for v in _csv(ctx, param, value))
    except ValueError:
        raise click.BadParameter("give numbers, comma-separated")


def _kernel_filters(filters, tids, cgroups):
    """recording.filters.split of the options, or a one-line failure."""
    from kvmlockprof.kernel.ksyms import Kallsyms
    from kvmlockprof.recording.filters import FilterError, split
    try:
        return split(**filters, tids=tids, cgroups=cgroups, kallsyms=Kallsyms)
    except FilterError as e:
        fail(str(e))


def _by(flag_value):
    """-l/-t: perf's views, as --by values."""
    def set_by(ctx, param, value):
        if value:
            ctx.params["by"] = flag_value
        return value
    return set_by


def target_options(note=". Filtered in the kernel", live=True):
    """-p and --vm: the processes (VMs) a command keeps."""
    return [click.option("-p", "--pid", "pids", type=int, multiple=True,
                         help="Only these processes (tgid); repeatable" + note + "."),
            click.option("--vm", "vm_names", multiple=True, metavar="NAME",
                         help=f"Only this {'running ' if live else ''}VM, by the name its "
                         "operator gave it (QEMU's -name, libvirt's domain), with its "
                         "helper threads (vhost-PID ...); repeatable" + note + ".")]


def view_options(what, pid_note="", kernel=False):
    """--by, -s/-k, -n/-E, -p, -l, -t, the filters: report's and top's, the same
    letters as perf lock's."""
    def add(f):
        for opt in reversed((
                click.option("--by", type=click.Choice(GROUPS), default="lock",
                             show_default=True, help="Group rows by lock (its name), "
                             "address, caller, process (VM), thread or, of a recording "
                             "made with --lock-owner, the owner the waits were behind.",
                             is_eager=True),
                click.option("-l", "--lock-addr", "lock_addr_view", is_flag=True,
                             callback=_by("address"), expose_value=False,
                             help="A row per lock address (perf's -l): --by address."),
                click.option("-t", "--threads", "threads_view", is_flag=True,
                             callback=_by("thread"), expose_value=False,
                             help="A row per thread (perf's -t): --by thread; from the "
                             "sampled waits."),
                click.option("-s", "-k", "--sort", type=click.Choice(
                    SORTS + list(PERF_SORT_KEYS)), default="total", show_default=True,
                    callback=lambda ctx, p, v: PERF_SORT_KEYS.get(v, v),
                    help=f"Sort key{what} (perf's wait_total, wait_max, wait_min, "
                         "avg_wait too)."),
                click.option("-n", "-E", "--limit", type=click.IntRange(min=1), default=20,
                             show_default=True, help="Rows shown (perf's -E/--entries)."),
                *target_options(pid_note, live=kernel),
                *filter_options(kernel))):
            f = opt(f)
        return f
    return add


def _csv(ctx, param, value):
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def _live_vm_pids(names):
    """tgids of the running VMs named so (and their helpers); fails if one is not found."""
    from kvmlockprof.recording.processes import find_vm
    out = []
    for n in names:
        found = find_vm(n)
        if not found:
            fail(f"no running VM is named {n!r} (QEMU's -name guest=..., or libvirt's "
                 f"domain): check `ps -eo pid,args | grep qemu`, or use -p PID")
        out += found
    return out


def _recorded_vm_pids(rec, names):
    """tgids of a recording's processes that are (or work for) the VMs named so."""
    from kvmlockprof.analysis.locks import processes
    p = processes(rec)
    pids = p[p["vm"].isin(names)]["tgid"].tolist()
    if not pids:
        fail(f"no VM named {', '.join(names)} in this recording (its VMs: "
             f"{', '.join(sorted(set(p['vm'].astype(str)))) or 'none'})")
    return pids


def _filters(lock_filter, type_filter, callstack_filter):
    return {"locks": lock_filter, "types": type_filter, "callstacks": callstack_filter}



@main.command(epilog=EPILOG_RECORD, context_settings={"ignore_unknown_options": False})
@click.option("-d", "--duration", type=float, help="Seconds to record (default: until Ctrl-C "
              "or until COMMAND exits).")
@options(target_options())
@click.option("-a", "--all", "system_wide", is_flag=True,
              help="With COMMAND: record the whole host, not just COMMAND and its children.")
@click.option("-o", "--output", default="kvmlockprof.parquet", show_default=True,
              help="Recording file.")
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing recording.")
@click_options(ContentionOptions)
@click_options(SessionOptions)
@options(filter_options(kernel=True))
@probe_options
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
@click.option("--host", "host_label", metavar="NAME", help="The host's name in the recording "
              "(default: its hostname): `query`'s host column.")
@click.option("--run", "run_label", metavar="LABEL", help="A label for this run (default: its "
              "start time): `query`'s run column.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def record(duration, pids, vm_names, system_wide, output, force, quiet, host_label, run_label,
           command, lock_filter, type_filter, callstack_filter, tids, cgroups, **opts):
    """Record lock contention to a Parquet recording.

    With `-- COMMAND ...` it runs COMMAND and records it (and its children) while
    it lives."""
    from kvmlockprof.kernel.bpfload import BpfUnavailable
    from kvmlockprof.catalog import UnknownProbe
    from kvmlockprof.recording.filters import FilterError
    from kvmlockprof.probes.lockorder import WatchError
    from kvmlockprof.recording.recorder import Recorder
    from kvmlockprof.recording.store import RecordingError
    from kvmlockprof.kernel import host
    session = session_options(opts)
    if vm_names:
        pids = tuple(pids) + tuple(_live_vm_pids(vm_names))
    for flag, probe in session.not_requested_options():
        fail(f"{flag} is the {probe} probe's: add --probes ...,{probe}")
    try:
        # checks the probe names and the output file: both need no privileges
        rec = Recorder(output, session, duration=duration, pids=pids, command=command,
                       system_wide=system_wide, force=force,
                       filters=dict(_filters(lock_filter, type_filter, callstack_filter),
                                    tids=tids, cgroups=cgroups),
                       labels={"host": host_label, "run": run_label},
                       warn=lambda m: click.echo(f"kvmlockprof: warning: {m}", err=True),
                       progress=None if quiet or not sys.stderr.isatty() else _progress)
    except (UnknownProbe, RecordingError, FilterError, WatchError) as e:
        fail(str(e))
    if not host.can_bpf():
        fail("record needs root (or CAP_BPF+CAP_PERFMON): run it with sudo")
    if not duration and not command:
        click.echo("recording until Ctrl-C (use --duration to stop by itself)", err=True)
    try:
        m = rec.run()
    except (RecordingError, BpfUnavailable, RuntimeError) as e:
        fail(str(e))
    except OSError as e:
        from kvmlockprof.recording.store import partial_dir
        fail(f"cannot write the recording ({e.strerror or e}): every probe is detached; what "
             f"was flushed before is in {partial_dir(output)} (`kvmlockprof report "
             f"{output}` reads it)")
    except KeyboardInterrupt:
        fail("interrupted before anything was recorded", 130)
    if not quiet:
        if sys.stderr.isatty():
            click.echo("", err=True)
        lost = sum(m.get("losses", {}).values())
        waits = m["counters"]["end"] - m["counters"]["end_without_begin"]
        click.echo(f"recorded {m['duration_s']:.1f} s: {waits} contended waits, "
                   f"{m['samples']} samples, {lost} lost -> {output}", err=True)
    stuck = m.get("command_stuck")
    if stuck:
        from kvmlockprof.recording.processes import describe_stuck
        fail(f"{describe_stuck(stuck)}; a kernel deadlock? The recording is complete: "
             f"`kvmlockprof report --order {output}` (with --probes lockorder)")
    code = m.get("command_exit_code")
    if code:
        sys.exit(code if code > 0 else 128 - code)


def _progress(m):
    """One line, rewritten in place each flush (only on a terminal)."""
    from kvmlockprof.views.report import fmt_ns
    c = m.get("counters", {})
    lost = sum(m.get("losses", {}).values())
    top = m.get("top_lock")
    head = f"top {top['lock']} ({fmt_ns(top['total_ns'])} waited)" if top else ""
    line = (f"{m['duration_s']:6.1f} s  {c.get('end', 0)} waits  "
            f"{m.get('samples', 0)} samples  {lost} lost  {head}")
    try:                                    # the terminal's own width, not $COLUMNS
        width = os.get_terminal_size(sys.stderr.fileno()).columns - 1
    except OSError:
        width = 99
    click.echo(f"\r\x1b[K{line[:width]}", nl=False, err=True)


EPILOG_TOP = """\b
Examples:
  kvmlockprof top                                  # whole host, refresh every second
  kvmlockprof top -p 1234 --by caller --sort max   # one VM, worst single waits
  kvmlockprof top -x --vm guest1                   # + each vCPU's share spent waiting
  kvmlockprof top --batch --iterations 5 > top.txt # plain text frames, then exit
Keys: q quit, s next sort key, b next grouping (lock, caller, process).
"""


@main.command(epilog=EPILOG_TOP)
@click.option("-i", "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@view_options(", taken over the last interval", pid_note="; filtered in the kernel",
              kernel=True)
@click_options(SessionOptions)
@click_options(ContentionOptions, only=("stack_budget", "vcpu_exits", "lock_owner"))
@click.option("--batch", is_flag=True, help="Print plain text frames (default when stdout "
              "is not a terminal).")
@click.option("--iterations", type=click.IntRange(min=1), help="Exit after this many "
              "refreshes.")
def top(interval, by, sort, limit, pids, vm_names, lock_filter, type_filter, callstack_filter,
        tids, cgroups, batch, iterations, **opts):
    """Live view of lock contention and the function probes, like kvm_stat."""
    from kvmlockprof.kernel.bpfload import BpfUnavailable
    from kvmlockprof.catalog import UnknownProbe
    from kvmlockprof.kernel import host
    from kvmlockprof.views import top
    session = session_options(opts)
    try:
        session.requested()
    except UnknownProbe as e:
        fail(str(e))
    if not host.can_bpf():
        fail("top needs root (or CAP_BPF+CAP_PERFMON): run it with sudo")
    if vm_names:
        pids = tuple(pids) + tuple(_live_vm_pids(vm_names))
    if by == "thread":
        fail("top reads the in-kernel aggregates, which are per process: for a row per "
             "thread, `kvmlockprof record` then `report -t`")
    if by == "owner":
        fail("top --by owner: use top --lock-owner (its heaviest owners under the table), "
             "or record --lock-owner then report --by owner")
    filters = _filters(lock_filter, type_filter, callstack_filter)
    kfilter, _ = _kernel_filters(filters, tids, cgroups)
    click.echo("kvmlockprof top: compiling and attaching the probes ...", err=True)
    try:
        top.run(session, list(pids) or None, by=by, sort=sort, limit=limit,
                interval=interval, iterations=iterations, filters=filters, kfilter=kfilter,
                batch=batch or not sys.stdout.isatty(),
                warn=lambda m: click.echo(f"kvmlockprof: warning: {m}", err=True),
                echo=click.echo)
    except BpfUnavailable as e:
        fail(str(e))


EPILOG_EXPORTER = """\b
Examples:
  kvmlockprof exporter                                 # whole host, http://127.0.0.1:9475/metrics
  kvmlockprof exporter --listen 0.0.0.0:9475 --top 20  # 20 lock classes, the rest as other
  kvmlockprof exporter --vm web1 -Y mutex,rwsem        # one VM's sleeping locks
  kvmlockprof exporter --probes contention             # no function probes
  kvmlockprof exporter --lock-owner                    # + who held the sleeping locks
  curl -s 127.0.0.1:9475/metrics | grep slots_lock
"""


@main.command(epilog=EPILOG_EXPORTER)
@click.option("--listen", default="127.0.0.1:9475", show_default=True, metavar="HOST:PORT",
              help="Where to serve /metrics (Prometheus text and OpenMetrics).")
@click.option("-i", "--interval", type=click.FloatRange(min=0.1), default=5.0,
              show_default=True, help="Seconds between reads of the in-kernel aggregates "
              "(a scrape serves the latest read).")
@click.option("--top", "top_locks", type=click.IntRange(min=1), default=50, show_default=True,
              help="Lock classes with a label of their own (the heaviest by wait since the "
              "start, kept once given; at most twice this many ever); the others count "
              "as lock=\"other\".")
@click.option("--top-vms", type=click.IntRange(min=1), default=20, show_default=True,
              help="VMs (or processes) with a label of their own, as --top; the others "
              "as vm=\"other\".")
@click.option("--top-owners", type=click.IntRange(min=1), default=20, show_default=True,
              help="With --lock-owner: owner classes (vcpu, a thread's name without its "
              "number) with a label of their own, as --top.")
@options(target_options())
@options(filter_options(kernel=True))
@click_options(SessionOptions)
@click_options(ContentionOptions, only=("map_entries", "stack_budget", "lock_owner"), helps={
    "map_entries": "Entries of the in-kernel aggregate map (the entries of exited "
                   "processes are deleted once counted)."})
def exporter(listen, interval, top_locks, top_vms, top_owners, pids, vm_names, lock_filter,
             type_filter, callstack_filter, tids, cgroups, **opts):
    """Serve the in-kernel aggregates as Prometheus metrics, until SIGTERM or Ctrl-C.

    Per lock class (kvm->slots_lock: KVM-aware, without the pid), VM and lock type:
    waits, wait seconds and a wait-time histogram; per probe its counters, ratios,
    latencies and losses."""
    from kvmlockprof.kernel.bpfload import BpfUnavailable
    from kvmlockprof.catalog import UnknownProbe
    from kvmlockprof.kernel import host
    from kvmlockprof.views import exporter
    session = session_options(opts)
    try:
        session.requested()
        exporter.parse_listen(listen)
    except (UnknownProbe, ValueError) as e:
        fail(str(e))
    if not host.can_bpf():
        fail("exporter needs root (or CAP_BPF+CAP_PERFMON): run it with sudo")
    if vm_names:
        pids = tuple(pids) + tuple(_live_vm_pids(vm_names))
    filters = _filters(lock_filter, type_filter, callstack_filter)
    kfilter, _ = _kernel_filters(filters, tids, cgroups)
    try:
        exporter.run(session, list(pids) or None, listen, interval, top_locks, top_vms,
                     filters=filters, kfilter=kfilter, top_owners=top_owners,
                     warn=lambda m: click.echo(f"kvmlockprof: warning: {m}", err=True),
                     echo=lambda m: click.echo(m, err=True))
    except BpfUnavailable as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot listen on {listen}: {e.strerror or e} (another exporter running? "
             f"give another --listen)")


@main.command(epilog=EPILOG_REPORT)
@click.argument("recording", default="kvmlockprof.parquet")
@view_options("")
@click.option("--stacks", is_flag=True, help="Print the heaviest stack of each row.")
@click.option("-F", "--format", "fmt", type=click.Choice(["text", "csv", "json", "folded",
                                                         "trace-json"]),
              default="text", show_default=True, help="folded: folded stacks (process;"
              "stack;lock value) for flamegraph.pl, inferno or speedscope; trace-json: the "
              "sampled waits and probe events as a timeline (Chrome Trace Event format: "
              "Perfetto, chrome://tracing, speedscope).")
@click.option("--value", type=click.Choice(["wait", "count"]), default="wait",
              show_default=True, help="With --format folded: wait time (ns) or waits.")
@click.option("-o", "--output", help="Write the report to this file instead of stdout.")
@click.option("--html", "html_out", metavar="FILE",
              help="Also write a self-contained HTML report (plots; opens offline).")
@click.option("-f", "--force", is_flag=True, help="Overwrite --output/--html if they exist.")
@click.option("--order", is_flag=True, help="Only the lock order, IRQ contexts and recursion "
              "of KVM's locks (a recording made with --probes lockorder).")
@click.option("--tid", "tids", metavar="TID,...", callback=_ints,
              help="Only these threads' waits (perf's --tid), from the sampled waits: "
              "scaled and marked ~ unless every wait was sampled and none lost.")
@click.option("-v", "--verbose", is_flag=True, help="A line per probe, with why it did not "
              "attach.")
def report(recording, by, sort, limit, pids, vm_names, lock_filter, type_filter,
           callstack_filter, stacks, fmt, value, output, html_out, force, order, tids,
           verbose):
    """Contention report of a recording, like `perf lock contention`."""
    from kvmlockprof.views import report
    from kvmlockprof.recording.store import RecordingError, load
    for path in (output, html_out):
        if path and os.path.exists(path) and not force:
            fail(f"{path} exists: use --force to overwrite it")
    try:
        rec = load(recording)
        filters = _filters(lock_filter, type_filter, callstack_filter)
        if vm_names:
            pids = tuple(pids) + tuple(_recorded_vm_pids(rec, vm_names))
        if order and fmt != "text":
            fail("--order prints text: drop --format")
        if fmt in ("folded", "trace-json") and (stacks or by != "lock"):
            fail(f"--format {fmt} writes every stack or event: drop --stacks/--by")
        if by == "owner" and (stacks or tids or order or any(filters.values())):
            fail("--by owner sums each owner over every lock it held: drop "
                 "--stacks/--tid/--order/-L/-Y/-S (-p keeps the owners of those processes)")
        if tids and (fmt in ("folded", "trace-json") or order or html_out):
            fail("--tid selects the rows of text, csv and json: drop --format "
                 f"{fmt}/--order/--html (or record --tid: filtered in the kernel)")
        if fmt == "folded":
            from kvmlockprof.views import folded
            text = folded.text(rec, value, pids=list(pids) or None, filters=filters)
        elif fmt == "trace-json":
            from kvmlockprof.views import trace
            text = trace.trace_json(rec, pids=list(pids) or None)
        elif order:
            text = report.probe_text(rec, "lockorder", limit=limit, verbose=verbose)
        else:
            text = report.render(rec, by=by, sort=sort, limit=limit, stacks=stacks, fmt=fmt,
                                 pids=list(pids) or None, filters=filters,
                                 tids=list(tids) or None, verbose=verbose)
        if html_out:                # reads more of the recording than the text does
            from kvmlockprof.views import html
            page = html.render(rec, limit=limit)
    except (RecordingError, report.NoOwners) as e:
        fail(str(e))
    if rec.interrupted:
        click.echo(f"kvmlockprof: warning: {recording} was not finished; reading the "
                   f"interrupted recording at {rec.path}", err=True)
    for w in rec.warnings:
        click.echo(f"kvmlockprof: warning: {rec.path}: {w}", err=True)
    if html_out:
        _write_atomic(html_out, page)
    if output:
        _write_atomic(output, text)
    else:
        click.echo(text, nl=False)


def _write_atomic(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


EPILOG_COMPARE = """\b
Examples:
  kvmlockprof compare before.parquet after.parquet
  kvmlockprof compare --base b1.parquet --base b2.parquet --new n1.parquet --new n2.parquet
  kvmlockprof compare runs/base runs/new --threshold 0.1 --html cmp.html
  kvmlockprof compare before.parquet after.parquet --format csv -o cmp.csv
  kvmlockprof compare before.parquet after.parquet --format folded > diff.folded
  kvmlockprof compare ds/ ds/ --base-where "kernel LIKE '6.1.%'" --new-where "kernel LIKE '6.12.%'"
  kvmlockprof compare runs/base runs/new -L 'kvm->slots_lock*' --metric 'mean wait'
"""


@main.command(epilog=EPILOG_COMPARE)
@click.argument("sides", nargs=-1)
@click.option("--base", "bases", multiple=True, help="A BASE recording or directory of "
              "recordings (repeat for repeat runs).")
@click.option("--new", "news", multiple=True, help="A NEW recording or directory "
              "(repeat for repeat runs).")
@click.option("--base-where", metavar="SQL", help="Only BASE recordings this condition on "
              "`kvmlockprof query`'s recordings view keeps (host = 'hv1', kernel LIKE '6.1.%').")
@click.option("--new-where", metavar="SQL", help="Only NEW recordings this condition keeps.")
@click.option("--threshold", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="Smallest relative change reported as improved/regressed.")
@click.option("-n", "-E", "--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="Locks compared: the heaviest by total wait on either side.")
@click.option("-L", "--lock-filter", "locks", multiple=True, metavar="GLOB",
              help="Only locks whose identity matches (`kvm->slots_lock*`): the rows "
              "the false discovery rate is held over, so fewer rows, more power.")
@click.option("--metric", "metrics", multiple=True, metavar="METRIC",
              help="Only this lock metric ('mean wait', 'p99 wait', 'waits/s'...; repeat); "
              "with -L or --metric no probe rows.")
@click.option("-F", "--format", "fmt", type=click.Choice(["text", "csv", "json", "folded"]),
              default="text", show_default=True, help="folded: two-column folded stacks "
              "(stack BASE NEW, a mean run each) for a differential flame graph.")
@click.option("--value", type=click.Choice(["wait", "count"]), default="wait",
              show_default=True, help="With --format folded: wait time (ns) or waits.")
@click.option("-o", "--output", help="Write the comparison to this file instead of stdout.")
@click.option("--html", "html_out", metavar="FILE", help="Also write a self-contained HTML page.")
@click.option("-f", "--force", is_flag=True, help="Compare even when the sides are not "
              "comparable (different probes, losses); overwrite --output/--html.")
def compare(sides, bases, news, base_where, new_where, threshold, limit, locks, metrics, fmt,
            value, output, html_out, force):
    """Before/after: per lock and probe metric, the change, its CI and a verdict.

    BASE and NEW are each a recording, a directory of recordings (repeat runs) or
    a dataset (`export --dataset`), given as two arguments or with --base/--new."""
    if sides and (bases or news):
        fail("give BASE NEW as two arguments or with --base/--new, not both")
    if sides:
        if len(sides) != 2:
            fail("compare takes two recordings (or directories): BASE NEW")
        bases, news = (sides[0],), (sides[1],)
    if not bases or not news:
        fail("compare needs a BASE and a NEW side: kvmlockprof compare BASE NEW")
    _compare(bases, news, threshold, limit, fmt, output, html_out, force, value,
             wheres=(base_where, new_where), focus=dict(locks=locks, metrics=metrics))


def _compare(bases, news, threshold, limit=20, fmt="text", output=None,
             html_out=None, force=False, value="wait", wheres=(None, None), focus=None):
    """compare's work, for compare and ab: load, check, compare, print or write."""
    from kvmlockprof.analysis import compare
    from kvmlockprof.views import compare_report
    from kvmlockprof.recording.store import RecordingError
    for path in (output, html_out):
        if path and os.path.exists(path) and not force:
            fail(f"{path} exists: use --force to overwrite it")
    try:
        base = compare_report.load_side(bases, wheres[0])
        new = compare_report.load_side(news, wheres[1])
        refuse, warnings = compare.check(base, new)
        warnings += [f"{r.path}: {w}" for r in base + new for w in r.warnings]
        if refuse and not force:
            fail(f"not comparable: {refuse[0]} (--force compares anyway)")
        warnings = refuse + warnings
        for w in warnings:
            click.echo(f"kvmlockprof: WARNING: {w}", err=True)
        if fmt == "folded":
            from kvmlockprof.views import folded
            body = folded.diff_text(base, new, value)
        else:
            df = compare.compare(base, new, threshold=threshold, limit=limit, **(focus or {}))
    except (RecordingError, ValueError) as e:
        fail(str(e))
    if fmt != "folded":
        out = {"text": compare_report.text, "json": compare_report.as_json}.get(fmt)
        body = out(df, base, new, warnings, threshold) if out else df.to_csv(index=False)
    if html_out:
        if fmt == "folded":
            fail("--html draws the comparison table: drop --format folded")
        _write_atomic(html_out, compare_report.page(df, base, new, warnings, threshold))
    if output:
        _write_atomic(output, body)
    else:
        click.echo(body, nl=False)


# The views' columns: recording.dataset.SCHEMA (a test holds this list to it).
EPILOG_QUERY = """\b
Views (each row also has host, kernel, run and recording: which recording it is from):
  recordings   path, start, duration_s, machine, waits, samples, lost, sample_every,
               interrupted, format_version, manifest (JSON)
  locks        lock_addr, lock, lock_class, lock_name, how
  processes    tgid, comm, vm_name, vm_tgid, vm, cmdline
  aggregates   lock_addr, lock, lock_class, type, flags, tgid, vm, stack_id, caller, kvm,
               count, total_ns, max_ns, min_ns, hist, estimated   (every wait)
  samples      ts_ns, wait_ns, lock_addr, lock, lock_class, type, flags, tid, tgid, comm, vm,
               cpu, stack_id, caller, kvm, ret   (each streamed wait)
  stacks       source, stack_id, caller, kvm, frames, addrs, lock_frame
  in_progress  lock_addr, lock, lock_class, type, flags, tid, tgid, stack_id, caller,
               began_ns, age_ns
  and each function probe's tables by their names (vms, vcpus, gpc_ops, ...)
lock_class is the lock's name without the VM's pid (kvm->slots_lock, vcpu->mutex); times
are ns; units and meanings: docs/fleet.md.

\b
Examples:
  kvmlockprof query "SELECT host, lock_class, sum(count) AS waits, sum(total_ns) AS wait_ns
      FROM aggregates GROUP BY ALL ORDER BY wait_ns DESC LIMIT 10" hv1/ hv2/
  kvmlockprof query "SELECT kernel, quantile_cont(wait_ns, 0.99) AS p99_ns FROM samples
      WHERE lock_class = 'kvm->mmu_lock' GROUP BY ALL" ds/
  kvmlockprof query "SELECT host, run, duration_s, waits, lost FROM recordings" runs/ -F csv
  kvmlockprof query "SELECT vm, caller, sum(count) AS waits FROM aggregates GROUP BY ALL"
      a.parquet b.parquet -F json -o by-caller.json
  kvmlockprof export --dataset ds/ hv1/*.parquet hv2/*.parquet    # then any engine:
  duckdb -c "SELECT lock_class, sum(count) FROM 'ds/aggregates/*.parquet' GROUP BY ALL"
"""


@main.command(epilog=EPILOG_QUERY, context_settings={"max_content_width": 100})
@click.argument("sql")
@click.argument("inputs", nargs=-1, required=True, metavar="RECORDINGS...")
@click.option("-F", "--format", "fmt", type=click.Choice(["text", "csv", "json"]),
              default="text", show_default=True)
@click.option("-o", "--output", help="Write the result to this file instead of stdout.")
@click.option("-f", "--force", is_flag=True, help="Overwrite --output if it exists.")
def query(sql, inputs, fmt, output, force):
    """Run DuckDB SQL over recordings as one dataset.

    RECORDINGS are recordings, directories of them, or directories written by
    `export --dataset` (read as they are). Each view has a row per row of every
    recording, with its host, kernel, run and recording id."""
    from kvmlockprof.recording import dataset
    if output and os.path.exists(output) and not force:
        fail(f"{output} exists: use --force to overwrite it")
    try:
        df = dataset.query(sql, inputs, warn=lambda m: click.echo(f"kvmlockprof: warning: {m}",
                                                                  err=True))
    except dataset.RecordingError as e:
        fail(str(e))
    if fmt == "csv":
        text = df.to_csv(index=False)
    elif fmt == "json":
        text = df.to_json(orient="records", date_format="iso", double_precision=15) + "\n"
    else:
        text = (df.to_string(index=False) if len(df) else
                "  ".join(map(str, df.columns)) + "\n(no rows)") + "\n"
    if output:
        _write_atomic(output, text)
    else:
        click.echo(text, nl=False)


EPILOG_EXPORT = """\b
Examples:
  kvmlockprof export --dataset ds/ kvmlockprof.parquet
  kvmlockprof export --dataset /srv/fleet/ hv1/*.parquet hv2/*.parquet
  kvmlockprof export --dataset ds/ --tables recordings,locks,aggregates runs/
  aws s3 sync ds/ s3://bucket/kvmlockprof/     # then DuckDB/Spark read s3://.../aggregates/
"""


@main.command(epilog=EPILOG_EXPORT)
@click.argument("inputs", nargs=-1, required=True, metavar="RECORDINGS...")
@click.option("--dataset", "out", required=True, metavar="DIR",
              help="The dataset directory: DIR/<table>/<recording>.parquet.")
@click.option("--tables", metavar="A,B,...", help="Only these tables (default: all).")
@click.option("-f", "--force", is_flag=True, help="Rewrite a recording exported already.")
def export(inputs, out, tables, force):
    """Write recordings as standard Parquet tables (one directory per table, one file
    per recording) that DuckDB, Spark or pyarrow.dataset read as one dataset.
    `kvmlockprof query --help` lists the tables and their columns."""
    from kvmlockprof.recording import dataset
    names = {t.strip() for t in tables.split(",") if t.strip()} if tables else None
    try:
        recs, sets = dataset.expand(inputs)
        if sets:
            fail(f"{sets[0]} is a dataset already: give recordings")
        if names and not names <= set(dataset.TABLES):
            fail(f"unknown table {sorted(names - set(dataset.TABLES))[0]!r}: the tables are "
                 f"{', '.join(dataset.TABLES)}")
        done = dataset.export(recs, out, force=force, tables=names,
                              warn=lambda m: click.echo(f"kvmlockprof: warning: {m}", err=True))
    except dataset.RecordingError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {out} ({e.strerror or e})")
    for d in done:
        click.echo(f"{d['recording']}  host {d['host']}  run {d['run']}  kernel {d['kernel']}",
                   err=True)


EPILOG_AB = """\b
Examples:
  kvmlockprof ab --runs 5 --new-args "--churn" --dir ab-churn    # churn off vs on
  kvmlockprof ab --runs 5 --workload "--churn" --base-args "--vcpus 1" --new-args "--vcpus 4"
  kvmlockprof ab --runs 5 --workload "--kvmclock --churn" \\
      --base-kernel /boot/vmlinuz-6.12.95+deb12-amd64 --new-kernel ~/linux/arch/x86/boot/bzImage
"""


@main.command(epilog=EPILOG_AB)
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Runs per side (at least 3 for confidence intervals over runs).")
@click.option("-d", "--duration", type=float, default=3.0, show_default=True,
              help="Seconds per run.")
@click.option("--workload", "workload_args", default="", metavar="ARGS",
              help="`kvmlockprof workload` options for both sides.")
@click.option("--base-args", default="", metavar="ARGS", help="Extra workload options, BASE.")
@click.option("--new-args", default="", metavar="ARGS", help="Extra workload options, NEW.")
@click.option("--base-kernel", metavar="IMAGE", help="Run BASE in the lab on this kernel.")
@click.option("--new-kernel", metavar="IMAGE", help="Run NEW in the lab on this kernel.")
@click.option("--record-args", default="", metavar="ARGS",
              help="Extra `kvmlockprof record` options for every run.")
@click.option("--dir", "--output-dir", "output_dir", default="kvmlockprof-ab",
              show_default=True, help="Directory for the recordings (BASE in base/, NEW in "
                                      "new/).")
@click.option("--threshold", type=click.FloatRange(min=0), default=0.05, show_default=True)
@click.option("-o", "--output", help="Write the comparison to this file instead of stdout.")
@click.option("--html", "html_out", metavar="FILE", help="Also write the comparison as HTML.")
@click.option("-f", "--force", is_flag=True,
              help="Reuse a non-empty output directory; compare even if not comparable.")
def ab(runs, duration, workload_args, base_args, new_args, base_kernel, new_kernel, record_args,
       output_dir, threshold, output, html_out, force):
    """Record the built-in workload N times under two settings, then compare them."""
    import shlex
    from kvmlockprof.recording import ab
    from kvmlockprof.kernel import host
    if bool(base_kernel) != bool(new_kernel):
        fail("give both --base-kernel and --new-kernel, or neither")
    if not base_kernel and base_args == new_args:
        fail("the two sides are the same: give --new-args/--base-args or two kernels")
    for path in (output, html_out):
        if path and os.path.isdir(path):
            fail(f"{path} is a directory: -o/--html take a file (the recordings go to --dir)")
        if path and os.path.exists(path) and not force:
            fail(f"{path} exists: use --force to overwrite it")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not force:
        fail(f"{output_dir} is not empty: use --force to reuse it, or --dir another one")
    if not base_kernel and not host.can_bpf():
        fail("ab records on this host: it needs root (or CAP_BPF+CAP_PERFMON)")
    w, r = shlex.split(workload_args), shlex.split(record_args)
    echo = lambda m: click.echo(f"kvmlockprof ab: {m}", err=True)   # noqa: E731
    try:
        if base_kernel:
            paths = ab.run_lab(output_dir, runs, duration, w,
                               {"base": base_kernel, "new": new_kernel}, r, echo)
        else:
            paths = ab.run_local(output_dir, runs, duration, w,
                                 {"base": shlex.split(base_args),
                                  "new": shlex.split(new_args)}, r, echo)
    except subprocess.CalledProcessError as e:
        fail(f"a run failed (exit {e.returncode}): {shlex.join(map(str, e.cmd))}")
    except ab.lab.LabError as e:
        fail(str(e))
    _compare(paths["base"], paths["new"], threshold, output=output, html_out=html_out,
             force=force)


@main.command()
@click.option("--fix", is_flag=True, help="Link fallback headers under /lib/modules so that "
              "other bcc tools find them too.")
@click.option("-v", "--verbose", is_flag=True, help="Every kernel symbol the probes need, "
              "and each probe's whole reason and cost.")
def doctor(fix, verbose):
    """What this host can profile, and why not."""
    from kvmlockprof.kernel import capabilities, headers
    from kvmlockprof import catalog
    from kvmlockprof.views.report import short_reason
    caps = capabilities.probe_host()
    rows = [(c.name, c.status, c.detail) for c in caps.checks.values()]
    for probe, target, found in capabilities.symbol_rows(caps) if verbose else ():
        if not target.startswith("kvmlp_"):     # (an option slot's placeholder)
            rows.append((f"symbol {target}", "ok" if found else "no",
                         f"{found} ({probe})" if found else f"absent ({probe})"))
    for p in catalog.CATALOG:
        plan = capabilities.plan(p, caps)
        default = f"off by default ({p.opt_in})" if p.opt_in else "on by default"
        if verbose:
            rows.append((f"probe {p.name}", "ok" if plan.ok else "no",
                         plan.method if plan.ok else plan.reason))
            rows.append((f"probe {p.name} cost", "off" if p.opt_in else "on",
                         f"runs {p.fires}; {default}"))
            continue
        rows.append((f"probe {p.name}", "ok" if plan.ok else "no",
                     (plan.method if plan.ok else short_reason(plan.reason)) +
                     f"; {default.split(' (')[0]}"))
    h = headers.find_headers()
    if fix and h.status == "fallback":
        try:
            rows.append(("fix headers", "ok", headers.link_fallback_headers(h)))
        except OSError as e:
            rows.append(("fix headers", "no", str(e)))
    rows.append(_doctor_memory())
    from kvmlockprof.kernel import bpfcache
    rows.append(("compiled BPF", *bpfcache.describe()))     # (after the memory row's load)
    w = max(len(r[0]) for r in rows)
    for name, status, detail in rows:
        click.echo(f"{name:<{w}}  {status:<4}  {detail}")
    if not verbose:
        click.echo("(-v: every kernel symbol, each probe's whole reason and cost)")
    plan = capabilities.plan(catalog.BY_NAME["contention"], caps)
    if not plan.ok:
        fail(f"the contention probe cannot run: {plan.reason}")


def _doctor_memory():
    """doctor's row: the kernel memory record's maps take here, by the kernel's count."""
    from kvmlockprof.kernel.bpfload import BpfUnavailable
    from kvmlockprof.probes.sources import KERNEL_MEM_MB, MEMORY_FORMULA, default_memory
    try:
        mem = default_memory()
    except BpfUnavailable as e:
        return ("kernel memory", "no", f"could not load the probes to measure it: {e}")
    by = {}
    for m, b in mem["maps"].items():
        by[m.split("/")[0]] = by.get(m.split("/")[0], 0) + b
    ok = mem["total"] <= KERNEL_MEM_MB << 20
    return ("kernel memory", "ok" if ok else "no",
            f"{mem['total'] / 2**20:.1f} MB with record's defaults at {mem['possible_cpus']} "
            f"possible CPUs (" + ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in by.items())
            + f"; limit {KERNEL_MEM_MB} MB, --kernel-mem-mb): {MEMORY_FORMULA}")


@main.command()
def probes():
    """The probe catalog, and how each probe would attach on this host (or why not)."""
    from kvmlockprof.kernel import capabilities, host
    from kvmlockprof import catalog
    caps = capabilities.probe_host() if host.can_bpf() else None
    for p in catalog.CATALOG:
        if caps is None:
            how = "unknown: needs root to try"
        else:
            plan = capabilities.plan(p, caps)
            how = plan.method if plan.ok else f"cannot attach: {plan.reason}"
        click.echo(f"{p.name:<11} {p.summary}")
        click.echo(f"{'':<11} arch {'/'.join(p.arch)}; tables {', '.join(p.tables) or '-'}")
        click.echo(f"{'':<11} runs {p.fires}")
        click.echo(f"{'':<11} " + (f"off by default ({p.opt_in}): --probes ...,{p.name}"
                                   if p.opt_in else "on by default"))
        for t in p.targets:
            sym = ("" if caps is None else catalog.resolve_symbol(t, caps.symbols)) or ""
            names = " / ".join(t.symbols)
            click.echo(f"{'':<11} target {names}: methods {', '.join(t.methods)}"
                       f"{'; here: ' + sym if sym else ''}"
                       f"{' (optional)' if t.optional else ''}")
        click.echo(f"{'':<11} here: {how}")


EPILOG_LAB = """\b
Examples:
  kvmlockprof lab -- kvmlockprof doctor
  kvmlockprof lab --console console.log --timeout 600 -- kvmlockprof doctor
  kvmlockprof lab --kernel /boot/vmlinuz-6.1.0-56-amd64 --possible-cpus 256 -- kvmlockprof doctor
  kvmlockprof lab -- kvmlockprof record -o lab.parquet -- kvmlockprof workload --kvmclock
  kvmlockprof lab --kernel ~/linux/arch/x86/boot/bzImage -- kvmlockprof record -o patched.parquet \\
      -- kvmlockprof workload --churn
  kvmlockprof lab --arch arm64 -- kvmlockprof record -o lpi.parquet --probes vgic,contention \\
      -- kvmlockprof workload --lpis 64 --lpi-reset-every 0.5
"""


@main.command(epilog=EPILOG_LAB, context_settings={"allow_interspersed_args": False})
@click.option("--kernel", help="Kernel image to boot (default: the newest Debian lab kernel).")
@click.option("--cpus", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--memory", default="2G", show_default=True)
@click.option("--possible-cpus", type=click.IntRange(1, 8192), metavar="N",
              help="Boot with possible_cpus=N: per-CPU data sized as on a big host "
                   "(kernels before 6.9, such as the lab's 6.1).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Kill the lab (QEMU and all) after this long and print the guest's "
                   "last lines.")
@click.option("--console", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write the guest kernel's console (boot included) to FILE; errors "
                   "quote its last lines.")
@click.option("--tcg-thread", type=click.Choice(["multi", "single"]),
              help="QEMU's emulator: a host thread per guest CPU, or one for all (slower; "
                   "no two CPUs emulated at once). Default: single on 6.1, else multi.")
@click.option("--arch", type=click.Choice(["x86_64", "arm64"]), default="x86_64",
              show_default=True, help="arm64: Debian arm64 under QEMU's emulator, at EL2 "
              "with a GICv3 ITS (`make lab-arm64` builds its root once).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def lab(kernel, cpus, memory, possible_cpus, timeout, console, tcg_thread, arch, command):
    """Run COMMAND inside another kernel under QEMU (kprobes, fentry, nested KVM).

    The current directory is shared read-write: recordings land on this host.
    Ctrl-C or --timeout kills the whole lab, QEMU included."""
    from kvmlockprof import lab
    # SIGTERM as Ctrl-C: the lab's process group (QEMU) is killed, its script removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        p = lab.run(list(command), kernel=kernel, cpus=cpus, memory=memory,
                    timeout=timeout, possible_cpus=possible_cpus, console=console,
                    tcg_thread=tcg_thread, arch=arch)
    except lab.LabError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("lab run interrupted: its QEMU and everything it started were killed", 130)
    sys.exit(p.returncode)


@main.command(epilog=EPILOG_WORKLOAD)
@click.option("--vcpus", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("-d", "--duration", type=float, default=10.0, show_default=True)
@click.option("--churn", is_flag=True, help="Create/delete memslots in a loop.")
@click.option("--churn-threads", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option("--churn-rate", type=float, default=0.0,
              help="Memslot ops/s per churn thread (0: as fast as possible).")
@click.option("--kvmclock", is_flag=True,
              help="Guest writes MSR_KVM_SYSTEM_TIME_NEW each loop (gfn_to_pfn_cache).")
@click.option("--xen", is_flag=True, help="Send Xen event channels in a loop "
              "(kvm_xen_set_evtchn_fast; needs CONFIG_KVM_XEN).")
@click.option("--xen-slow-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --xen: drop the shared_info page every N sends, forcing the "
                   "slow path.")
@click.option("--xen-vcpu-info/--no-xen-vcpu-info", default=True, show_default=True,
              help="With --xen: give each vCPU an explicit vcpu_info (its own gfn_to_pfn "
                   "cache); without, only shared_info's.")
@click.option("--xen-timer-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --xen: every N exits each vCPU drops the shared_info page and sets "
                   "its Xen timer already expired, whose event takes the slow path (seed "
                   "000's path).")
@click.option("--apic-toggle-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="x86: every N exits each vCPU turns its local APIC (in-kernel) off and "
                   "on, by KVM_SET_SREGS and by KVM_SET_MSRS (seed 004's two callers).")
@click.option("--lpis", type=click.IntRange(min=0), default=0, show_default=True,
              help="arm64: a vGICv3 + ITS mapping this many LPIs, injected by MSI.")
@click.option("--msi-threads", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option("--msi-rate", type=float, default=0.0,
              help="With --lpis: MSIs/s per thread (0: as fast as possible).")
@click.option("--lpi-reset-every", type=click.FloatRange(min=0), default=0.0,
              help="With --lpis: reset the ITS this often (seconds): every LPI is released "
                   "and made anew.")
@click.option("--name", help="A VM name, given like QEMU's -name: reports name the VM by it.")
@click.option("--vms", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Run this many VMs, each a process of its own (named NAME-i, or vmI).")
@click.option("--json", "as_json", is_flag=True, help="Print the work done as JSON.")
@click.option("--progress-every", type=click.FloatRange(min=0), default=0.0,
              help="Also print the work done so far as a JSON line this often (seconds; "
                   "for benchmarks that measure while it runs).")
def workload(vcpus, duration, churn, churn_threads, churn_rate, kvmclock, xen, xen_slow_every,
             xen_vcpu_info, xen_timer_every, apic_toggle_every, lpis, msi_threads, msi_rate,
             lpi_reset_every, name, vms, as_json, progress_every):
    """Built-in KVM workload: a tiny VMM over /dev/kvm (no QEMU)."""
    from kvmlockprof.workload import WORK_ENV, KvmError, run, run_vms
    from kvmlockprof.workload.vmm import KICK_AFTER_S
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # stop early, still report
    if vms > 1 and progress_every:
        fail("--progress-every is for one VM: drop it or --vms")
    try:
        if vms > 1:
            argv = [f"--vcpus={vcpus}", f"--duration={duration}",
                    f"--churn-threads={churn_threads}", f"--churn-rate={churn_rate}",
                    f"--xen-slow-every={xen_slow_every}", f"--lpis={lpis}",
                    f"--xen-timer-every={xen_timer_every}",
                    f"--apic-toggle-every={apic_toggle_every}",
                    f"--msi-threads={msi_threads}", f"--msi-rate={msi_rate}",
                    f"--lpi-reset-every={lpi_reset_every}"] + \
                [flag for flag, on in (("--churn", churn), ("--kvmclock", kvmclock),
                                       ("--xen", xen)) if on] + \
                ([] if xen_vcpu_info else ["--no-xen-vcpu-info"])
            done = run_vms(vms, argv, [f"{name}-{i}" if name else f"vm{i}"
                                       for i in range(vms)])
        else:
            done = run(vcpus=vcpus, duration=duration, churn=churn, churn_threads=churn_threads,
                       churn_rate=churn_rate, kvmclock=kvmclock, xen=xen,
                       xen_slow_every=xen_slow_every, xen_vcpu_info=xen_vcpu_info,
                       xen_timer_every=xen_timer_every, apic_toggle_every=apic_toggle_every,
                       lpis=lpis, msi_threads=msi_threads,
                       msi_rate=msi_rate, lpi_reset_every=lpi_reset_every, every=progress_every,
                       report=lambda p: click.echo(json.dumps({"progress": p}))).as_dict()
    except KvmError as e:
        fail(str(e))
    out = os.environ.get(WORK_ENV)
    if out:
        try:
            with open(out, "w") as f:
                json.dump(done, f)
        except OSError as e:
            fail(f"cannot hand the work done to record ({WORK_ENV}={out}: {e.strerror or e})")
    if as_json:
        click.echo(json.dumps(done))
    else:
        click.echo(f"workload pid {done['pid']}{f' ({vms} VMs)' if vms > 1 else ''}: "
                   f"{done['exits_total']} exits in "
                   f"{done['duration_s']:.1f} s "
                   f"({', '.join(f'{x:.0f}' for x in done['exits_per_s_per_vcpu'])}"
                   f" /s per vCPU), {done['churn_ops']} memslot ops, "
                   f"{done['msr_writes']} kvmclock MSR writes, {done['xen_sends']} Xen sends" +
                   (f", {done['xen_timers']} expired Xen timers" if done.get("xen_timers")
                    else "") +
                   (f", APIC toggled {done['apic_toggles']}x" if done.get("apic_toggles")
                    else "") +
                   (f", {done['msis']} MSIs to {done['lpis']} LPIs ({done['msis_refused']} "
                    f"refused), ITS tables loaded {done['lpi_restores']}x"
                    if done.get("lpis") else ""))
    if done["kicked"]:
        click.echo(f"workload: vCPU {', '.join(map(str, done['kicked']))} still in KVM_RUN "
                   f"{KICK_AFTER_S:g} s after the stop (its guest stopped exiting): kicked out "
                   "with a signal", err=True)


if __name__ == "__main__":
    main()
