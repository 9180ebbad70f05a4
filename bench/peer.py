"""The real peer: `perf lock contention -b`, built with BPF skeletons from Debian's
kernel source packages (Debian's linux-perf has none), cached outside the repo.

Tries the newest /usr/src/linux-source-*.tar.xz first; keeps the first perf whose
`perf lock contention -ab` loads on the running kernel. A version that builds but
cannot load here (perf 6.12's skeleton needs the data symbol `runqueues`, which a
kernel without CONFIG_KALLSYMS_ALL does not list) is remembered with its reason, so
a second run builds nothing. Prints the version, `perf lock contention -ab -- sleep
1`, and the path (also `--print-path` alone, for the benchmarks and tests).
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

CACHE = os.environ.get("KVMLOCKPROF_PEER_CACHE", "/var/cache/kvmlockprof/peer")
# perf's optional features we do not need (each is a -dev package otherwise)
MAKE_FLAGS = ["BUILD_BPF_SKEL=1", "NO_LIBPYTHON=1", "NO_LIBPERL=1", "NO_SLANG=1", "NO_GTK2=1",
              "NO_LIBBABELTRACE=1", "NO_LIBUNWIND=1", "NO_SDT=1", "NO_JVMTI=1", "NO_LIBNUMA=1",
              "NO_LIBCRYPTO=1", "NO_LIBPFM4=1", "NO_LIBLLVM=1", "NO_DEMANGLE=1"]
# What tools/perf's build reads from the kernel tree (not the 1 GB of drivers)
TREE = ("tools/", "include/", "arch/x86/", "arch/arm64/", "lib/", "scripts/", "kernel/",
        "Makefile")


def sources():
    """(version, tarball) newest first."""
    out = []
    for t in glob.glob("/usr/src/linux-source-*.tar.xz"):
        v = re.match(r"linux-source-(.+)\.tar\.xz", os.path.basename(t)).group(1)
        out.append((tuple(int(x) for x in v.split(".")), v, t))
    return [(v, t) for _, v, t in sorted(out, reverse=True)]


def extract(tarball, dest):
    top = os.path.basename(tarball)[:-len(".tar.xz")]
    tree = os.path.join(dest, top)
    if os.path.exists(os.path.join(tree, ".extracted")):
        return tree
    with tarfile.open(tarball) as tar:
        members = [m for m in tar if m.name.split("/", 1)[-1].startswith(TREE)]
        tar.extractall(dest, members=members, filter="fully_trusted") \
            if sys.version_info >= (3, 12) else tar.extractall(dest, members=members)
    open(os.path.join(tree, ".extracted"), "w").close()
    return tree


def build(version, tarball, log):
    out = os.path.join(CACHE, f"perf-{version}")
    perf = os.path.join(out, "perf")
    if os.path.exists(perf):
        return perf
    os.makedirs(out, exist_ok=True)
    tree = extract(tarball, CACHE)
    with open(log, "w") as f:
        p = subprocess.run(["make", "-C", os.path.join(tree, "tools/perf"), f"O={out}",
                            f"-j{os.cpu_count()}", *MAKE_FLAGS],
                           stdout=f, stderr=subprocess.STDOUT)
    if p.returncode or not os.path.exists(perf):
        raise RuntimeError(f"perf {version} did not build (exit {p.returncode}): see {log}")
    return perf


def loads(perf):
    """(ok, output of `perf lock contention -ab -- sleep 1`)."""
    p = subprocess.run([perf, "lock", "contention", "-ab", "--", "sleep", "1"],
                       capture_output=True, text=True, timeout=120)
    text = (p.stdout + p.stderr).strip()
    ok = p.returncode == 0 and "failed to load" not in text.lower() and \
        "no BUILD_BPF_SKEL" not in text
    return ok, text


def find(verbose=True):
    """The path of a perf whose `lock contention -b` loads here, building one if need be."""
    os.makedirs(CACHE, exist_ok=True)
    state_path = os.path.join(CACHE, "state.json")
    state = json.load(open(state_path)) if os.path.exists(state_path) else {}
    release = os.uname().release
    say = print if verbose else (lambda *a: None)
    for version, tarball in sources():
        key = f"{version}@{release}"
        if state.get(key, {}).get("ok") is False:
            say(f"perf {version}: skipped, it did not work here: {state[key]['why']}")
            continue
        try:
            perf = build(version, tarball, os.path.join(CACHE, f"build-{version}.log"))
        except (RuntimeError, OSError, tarfile.TarError) as e:
            state[key] = {"ok": False, "why": str(e)}
            say(f"perf {version}: {e}")
            continue
        ok, text = loads(perf)
        if not ok:
            why = next((line for line in text.splitlines() if "fail" in line.lower()),
                       text.splitlines()[-1] if text else "no output")
            state[key] = {"ok": False, "why": f"its skeleton does not load: {why.strip()}"}
            say(f"perf {version}: built, but {state[key]['why']}")
            continue
        state[key] = {"ok": True, "perf": perf}
        json.dump(state, open(state_path, "w"), indent=1)
        return perf, text
    json.dump(state, open(state_path, "w"), indent=1)
    return None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print-path", action="store_true",
                    help="Print only the perf path (empty if none), building if need be.")
    a = ap.parse_args()
    if not sources():
        sys.exit("no /usr/src/linux-source-*.tar.xz: apt-get install linux-source-6.1")
    if not shutil.which("clang"):
        sys.exit("no clang: run `make peer` (it installs the build dependencies)")
    perf, text = find(verbose=not a.print_path)
    if a.print_path:
        print(perf or "")
        return
    if not perf:
        sys.exit("no perf with a loadable lock-contention skeleton on this kernel; "
                 f"the reasons are above and in {CACHE}/state.json")
    version = subprocess.run([perf, "version"], capture_output=True, text=True).stdout.strip()
    print(f"{version} ({perf}) on {os.uname().release}\n$ perf lock contention -ab -- sleep 1")
    print(text)


if __name__ == "__main__":
    main()
