"""kvmlockprof: an eBPF live lock-contention profiler for Linux KVM hosts.

    import kvmlockprof
    from kvmlockprof.analysis import locks
    rec = kvmlockprof.load("kvmlockprof.parquet")   # no root needed
    locks.top(rec, by="lock")
"""
__version__ = "0.1.0"

from kvmlockprof.recording.store import Recording, RecordingError, load  # noqa: E402,F401

__all__ = ["Recording", "RecordingError", "load", "__version__"]
