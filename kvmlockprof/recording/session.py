"""A session's life around its probes: SIGTERM/SIGHUP unwind like Ctrl-C (Stop), so
that whatever ends it, everything detaches. `record` (recorder) stops on Stop; the
live views (`top`, `exporter`) run in live_session(), which also attaches them."""
import contextlib
import signal

from kvmlockprof.kernel import bpfload
from kvmlockprof.probes.sources import close_sources, load_btf, open_sources


class Stop(Exception):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so that `finally` detaches the probes."""


def raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


@contextlib.contextmanager
def live_session(make_view, requested, pids, stack_budget, prefer, kernel_mem_mb, warn,
                 **options):
    """The probes of a live session (`top`, `exporter`): attached sample-free (aggregates
    only), SIGTERM/SIGHUP raising Stop (to unwind like Ctrl-C), and everything
    detached whatever happens. Yields make_view(sources, status, kbtf); options:
    open_sources()'s (kfilter, map_entries, vcpu_exits)."""
    old = {s: signal.signal(s, raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    sources = {}
    try:
        kbtf, _ = load_btf(warn)
        sources, status, _ = open_sources(
            requested, tgids=pids, sample_every=0, ringbuf_mb=1, prefer=prefer, warn=warn,
            kbtf=kbtf, stack_budget=stack_budget, kernel_mem_mb=kernel_mem_mb, **options)
        view = make_view(sources, status, kbtf)
        kbtf = None                     # the BTF dump (hundreds of MB): freed here
        bpfload.release_memory()
        yield view
    finally:
        close_sources(sources)
        for s, h in old.items():
            signal.signal(s, h)
