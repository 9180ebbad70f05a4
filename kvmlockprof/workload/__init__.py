"""The built-in workload: a minimal VMM that makes real KVM lock traffic."""
from .kvmapi import KvmError
from .vmm import Workload, WorkloadConfig, WorkDone

__all__ = ["KvmError", "Workload", "WorkloadConfig", "WorkDone", "run"]


def run(every=0.0, report=None, **options):
    """Run the workload with WorkloadConfig options and return its WorkDone
    (report(progress) is called every `every` seconds while it runs)."""
    with Workload(WorkloadConfig(**options)) as w:
        return w.run(every, report)
