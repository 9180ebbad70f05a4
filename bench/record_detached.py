"""`kvmlockprof record` (same arguments) whose probes are detached when its loop starts
(they are attached during its start-up): the profiler process (start-up, memory, its
loop's polls and flushes) without the probes' work. overhead.py's control
configuration, kvmlockprof-agg-detached: a window of it that loses work rate shows an
effect of running a record process at all, which the probes' cost cannot explain.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kvmlockprof import cli  # noqa: E402
from kvmlockprof.recording import recorder as record  # noqa: E402


class DetachedRecorder(record.Recorder):
    def _loop(self, child):
        for src in self.sources.values():
            src.detach()
        super()._loop(child)


record.Recorder = DetachedRecorder      # cli imports it when the command runs
cli.main(prog_name="kvmlockprof")
