"""A session's life around its probes: SIGTERM/SIGHUP unwind like Ctrl-C (Stop), so
that whatever ends it, everything detaches. `record` (recorder) stops on Stop; the
live views (`top`, `exporter`) run in live_session(), which also attaches them."""
import contextlib
import dataclasses
import functools
import signal

from kvmlockprof import lazy
from kvmlockprof.kernel import bpfload
from kvmlockprof.probes.sources import close_sources, load_btf, open_sources
from kvmlockprof.recording.locknames import Namers


class Stop(Exception):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so that `finally` detaches the probes."""


def raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


@contextlib.contextmanager
def live_session(make_view, session, pids, warn, kfilter=None):
    """The probes of a live session (`top`, `exporter`; session: their SessionOptions):
    attached sample-free (aggregates only), SIGTERM/SIGHUP raising Stop (to unwind
    like Ctrl-C), and everything detached whatever happens. Yields
    make_view(sources, status, namers): namers (locknames.Namers) made from the BTF
    where the probes were loaded, the BTF never read in this process."""
    old = {s: signal.signal(s, raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    sources = {}
    try:
        kbtf = functools.cache(lambda: load_btf(warn)[0])      # (read when needed)
        session = dataclasses.replace(session, contention=dataclasses.replace(
            session.contention, sample_every=0, ringbuf_mb=1))
        sources, status, _, namers = open_sources(
            session, tgids=pids, kfilter=kfilter, warn=warn, kbtf=kbtf,
            also=lambda _: Namers.of(kbtf()))
        lazy.import_all()
        view = make_view(sources, status, namers)
        bpfload.release_memory()
        yield view
    finally:
        close_sources(sources)
        for s, h in old.items():
            signal.signal(s, h)
