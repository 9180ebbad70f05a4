"""pandas and pyarrow's compute and parquet modules, imported where they are first
used: `record`, `top` and the exporter attach their probes first (the imports took
0.15 s of the 0.86 s before the attach, where perf attaches in 0.07 s).

Not importlib's LazyLoader (nor lazy_loader, built on it): that puts a half-made
module in sys.modules for everyone, without a lock before Python 3.12."""
import importlib


class LazyModule:
    """A module's stand-in that imports it at the first attribute read."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self):
        return f"<lazy module {self._name!r}>"


pd = LazyModule("pandas")
pc = LazyModule("pyarrow.compute")
pq = LazyModule("pyarrow.parquet")
