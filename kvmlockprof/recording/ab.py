"""`kvmlockprof ab`: record the built-in workload N times under each of two
settings (two workload option sets here, or two kernels in the lab), then
compare. Local runs alternate BASE and NEW (ABBA...) so that drift on the host
lands on both sides alike."""
import os
import shlex
import subprocess
import sys

from kvmlockprof import lab

SIDES = ("base", "new")


def klp(*args):
    return [sys.executable, "-m", "kvmlockprof", *args]


def record_argv(out, duration, workload_args, record_args=()):
    return klp("record", "-q", "-f", "-o", out, *record_args, "--",
               *klp("workload", "--duration", str(duration), *workload_args))


def order(runs):
    """(run, side) in ABBA order: BASE first on odd runs, NEW first on even ones."""
    for i in range(1, runs + 1):
        for side in (SIDES if i % 2 else SIDES[::-1]):
            yield i, side


def run_local(outdir, runs, duration, workload_args, side_args, record_args=(), echo=print):
    """Record every run on this host; returns {side: [paths]}."""
    paths = {s: [] for s in SIDES}
    for i, side in order(runs):
        out = os.path.join(outdir, side, f"{side}-{i}.parquet")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        echo(f"run {i}/{runs} {side.upper()}: workload {' '.join(workload_args + side_args[side])}")
        subprocess.run(record_argv(out, duration, workload_args + side_args[side], record_args),
                       check=True, stdout=subprocess.DEVNULL)
        paths[side].append(out)
    return paths


def run_lab(outdir, runs, duration, workload_args, kernels, record_args=(), echo=print,
            cpus=2, memory="2G"):
    """Boot each side's kernel once and record the runs inside it."""
    paths = {}
    for side in SIDES:
        d = os.path.join(outdir, side)
        os.makedirs(d, exist_ok=True)
        loop = " && ".join(shlex.join(record_argv(f"{side}-{i}.parquet", duration,
                                                  workload_args, record_args))
                           for i in range(1, runs + 1))
        echo(f"{side.upper()}: {runs} runs in the lab on {kernels[side]}")
        p = lab.run(["sh", "-c", loop], kernel=kernels[side], cpus=cpus, memory=memory, cwd=d)
        if p.returncode:
            raise lab.LabError(f"the {side.upper()} lab runs failed (exit {p.returncode})")
        paths[side] = [os.path.join(d, f"{side}-{i}.parquet") for i in range(1, runs + 1)]
    return paths
