"""kvmlockprof: an eBPF live lock-contention profiler for Linux KVM hosts.

    import kvmlockprof
    from kvmlockprof.analysis import locks
    rec = kvmlockprof.load("kvmlockprof.parquet")   # no root needed
    locks.top(rec, by="lock")
"""
__version__ = "0.1.0"

__all__ = ["Recording", "RecordingError", "load", "__version__"]


def __getattr__(name):
    # (at first use: the command line's live commands attach before pandas/pyarrow load)
    if name in ("Recording", "RecordingError", "load"):
        from kvmlockprof.recording import store
        return getattr(store, name)
    raise AttributeError(f"module 'kvmlockprof' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
