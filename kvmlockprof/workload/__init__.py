"""The built-in workload: a minimal VMM that makes real KVM lock traffic."""
import json
import os
import signal
import subprocess
import sys

from kvmlockprof.workload.kvmapi import KvmError
from kvmlockprof.workload.vmm import Workload, WorkloadConfig, WorkDone

__all__ = ["KvmError", "Workload", "WorkloadConfig", "WorkDone", "run", "run_vms", "WORK_ENV"]
WORK_ENV = "KVMLOCKPROF_WORK_OUT"     # where `workload` writes its WorkDone (record sets it)
# What the VMs of run_vms() add up to; the rest of a VM's work is its own.
SUMMED = ("vcpus", "msr_writes", "churn_ops", "xen_sends", "xen_forced_slow", "xen_timers",
          "apic_toggles", "exits_total", "lpis", "msis", "msis_refused", "lpi_restores")
LISTED = ("exits", "io_exits", "mmio_exits", "exits_per_s_per_vcpu")


def run(every=0.0, report=None, **options):
    """Run the workload with WorkloadConfig options and return its WorkDone
    (report(progress) is called every `every` seconds while it runs)."""
    with Workload(WorkloadConfig(**options)) as w:
        return w.run(every, report)


def run_vms(n, argv, names, env=None):
    """Run n VMs, each a `workload` process of its own (as n QEMUs would be), named
    names[i] (the --name a report shows), with the other workload options in argv;
    returns the work done: the sums over the VMs (the vCPU lists end to end) and
    each VM's own, under "vms". SIGINT/SIGTERM stop them all early."""
    env = {k: v for k, v in (env or os.environ).items() if k != WORK_ENV}
    procs = [subprocess.Popen([sys.executable, "-m", "kvmlockprof", "workload", *argv,
                               "--json", "--name", names[i]], stdout=subprocess.PIPE,
                              text=True, env=env) for i in range(n)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate()[0])
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        outs = [p.communicate()[0] for p in procs]
    vms = []
    for p, out in zip(procs, outs):
        lines = out.strip().splitlines()
        if p.returncode != 0 or not lines:
            raise KvmError(f"VM process {p.pid} exited {p.returncode} (its error is above)")
        vms.append(json.loads(lines[-1]))
    done = {k: sum(v[k] for v in vms) for k in SUMMED}
    done.update({k: [x for v in vms for x in v[k]] for k in LISTED})
    done.update(pid=os.getpid(), duration_s=max(v["duration_s"] for v in vms),
                config=dict(vms[0]["config"], vms=n),
                interrupted=any(v["interrupted"] for v in vms),
                kicked=[f"{name}/{i}" for v, name in zip(vms, names) for i in v["kicked"]],
                vms=[dict(v, name=name) for v, name in zip(vms, names)])
    done["churn_ops_per_s"] = done["churn_ops"] / done["duration_s"] if done["duration_s"] \
        else 0.0
    return done
