"""numpy, pyarrow and pandas, imported where they are first used: `record`, `top` and
the exporter compile and attach their probes first (the three imports took 0.35 s of
the 0.86 s before the attach, where perf attaches in 0.07 s), and the package's
`import kvmlockprof` stays light for a notebook that only loads a recording.

Not importlib's LazyLoader (nor lazy_loader, built on it): that puts a half-made
module in sys.modules for everyone, without a lock before Python 3.12."""
import importlib
import os
import sys
import threading

_HANDING_OVER = threading.Lock()


class LazyModule:
    """A module's stand-in that imports it at the first attribute read, and then puts
    the module itself wherever kvmlockprof's modules hold the stand-in: later reads
    cost nothing (numpy's attributes are read in loops)."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        module = importlib.import_module(self._name)
        with _HANDING_OVER:         # (another thread may be importing a module meanwhile)
            for name, m in list(sys.modules.items()):
                if name.startswith("kvmlockprof."):
                    d = getattr(m, "__dict__", {})
                    for k, v in list(d.items()):
                        if v is self:
                            d[k] = module
        return getattr(module, attr)

    def __repr__(self):
        return f"<lazy module {self._name!r}>"


np = LazyModule("numpy")
pa = LazyModule("pyarrow")
pd = LazyModule("pandas")
pc = LazyModule("pyarrow.compute")
pq = LazyModule("pyarrow.parquet")


def import_all(pandas=True):
    """Import them now: a live command once it has attached (its set-up and its first
    flush use them; the first flush must not be late by their import, 10 s under the
    lab's emulator, while the threads it names exit). pandas=False: not pandas
    (`record` writes with pyarrow alone; pandas is ~45 MB resident)."""
    _steady_pool()
    for stand_in in (np, pa, pc, pq) + ((pd,) if pandas else ()):
        getattr(stand_in, "__name__")
    if not pandas and "pandas" not in sys.modules:
        _pyarrow_without_pandas()


def _steady_pool():
    """pyarrow's buffers from jemalloc (a user's ARROW_DEFAULT_MEMORY_POOL is kept): in
    a 60 s storm record's anonymous memory held 48-54 MiB with it, 57-68 with mimalloc,
    pyarrow's default, which kept ~8 MiB more after the first compaction
    (bench/README.md). Arrow reads the variable once, as pyarrow is imported; it is
    set only for that import, so the recorded command never inherits it (a build
    without jemalloc logs one warning and keeps its default)."""
    if "pyarrow" in sys.modules or "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"
    try:
        importlib.import_module("pyarrow")
    finally:
        del os.environ["ARROW_DEFAULT_MEMORY_POOL"]


class _NoPandas:
    def find_spec(self, name, path=None, target=None):
        if name == "pandas":
            raise ModuleNotFoundError("not imported by this command", name=name)


def _pyarrow_without_pandas():
    """pyarrow imports pandas at its first array (its shim asks whether pandas is
    there). Asked now, with pandas unimportable, it answers no and keeps to numpy;
    a later to_pandas() still works (the shim tries the import again when it must)."""
    finder = _NoPandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(finder)
