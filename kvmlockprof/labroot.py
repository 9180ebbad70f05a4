"""The arm64 lab's root filesystem: Debian bookworm for arm64 (bcc, bpftool, python3,
bookworm-backports' kernel and its headers) made by mmdebstrap, with the project's
Python dependencies as PyPI's aarch64 wheels; built once, cached outside the repo.
The guest runs this tree's kvmlockprof from the shared directory (PYTHONPATH).

Foreign packages' maintainer scripts run under qemu-user through binfmt_misc,
registered here if the host has not (containers start without it).
Usage: python -m kvmlockprof.labroot [--force]"""
import glob
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

from kvmlockprof.backports import debian_main_source

CACHE = "/var/cache/kvmlockprof/arm64"
ROOT = os.path.join(CACHE, "root")
SITE = "/opt/kvmlockprof/site"            # inside ROOT: the wheels
STAMP = os.path.join(ROOT, ".kvmlockprof-root")
PACKAGES = ("busybox-static", "kmod", "mount", "procps", "python3", "python3-bpfcc", "bpfcc-tools",
            "bpftool", "linux-image-arm64/bookworm-backports",
            "linux-headers-arm64/bookworm-backports")
BINFMT = "/proc/sys/fs/binfmt_misc"
BINFMT_CONF = "/usr/lib/binfmt.d/qemu-aarch64.conf"
PY_VERSION = "3.11"                       # bookworm's python3
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")


class RootError(RuntimeError):
    pass


def ready():
    return os.path.exists(STAMP)


def kernels():
    """The root's arm64 kernel images, newest first."""
    key = lambda p: [int(x) for x in re.findall(r"\d+", os.path.basename(p))]   # noqa: E731
    return sorted(glob.glob(os.path.join(ROOT, "boot", "vmlinuz-*")), key=key, reverse=True)


def _binfmt():
    if not os.path.exists(os.path.join(BINFMT, "register")):
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT], check=True)
    if not os.path.exists(os.path.join(BINFMT, "qemu-aarch64")):
        if not os.path.exists(BINFMT_CONF):
            raise RootError("qemu-user-static is missing: run `make lab-arm64`")
        with open(BINFMT_CONF) as src, open(os.path.join(BINFMT, "register"), "w") as reg:
            reg.write(src.read().strip())


def _requirements():
    """The project's own install_requires (no extras), as pip takes them."""
    reqs = importlib.metadata.requires("kvmlockprof") or []
    return [r for r in reqs if "extra ==" not in r]


def build(force=False, log=sys.stderr):
    if ready() and not force:
        return ROOT
    for tool in ("mmdebstrap", "qemu-system-aarch64"):
        if not shutil.which(tool):
            raise RootError(f"{tool} is missing: run `make lab-arm64`")
    _binfmt()
    uri, _ = debian_main_source()
    if not uri:
        raise RootError("no Debian bookworm source in /etc/apt to build the arm64 root from")
    tmp = ROOT + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(CACHE, exist_ok=True)
    print(f"building the arm64 root in {ROOT} (mmdebstrap, then PyPI's aarch64 wheels)",
          file=log)
    subprocess.run(["mmdebstrap", "--arch=arm64", "--variant=apt", "--include=" +
                    ",".join(PACKAGES), "bookworm", tmp, f"deb {uri} bookworm main",
                    f"deb {uri} bookworm-backports main"], check=True,
                   env=dict(os.environ, INITRD="No"))     # virtme-ng makes its own initramfs
    return finish(tmp)


def finish(tmp):
    """The Python part of the root at `tmp` (Debian's part is there), then put in place."""
    site = tmp + SITE
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--target", site, "--only-binary=:all:", "--implementation", "cp",
                    "--python-version", PY_VERSION,
                    *[a for p in WHEEL_PLATFORMS for a in ("--platform", p)],
                    *_requirements()], check=True)
    bindir = tmp + "/usr/local/bin"
    os.makedirs(bindir, exist_ok=True)
    with open(os.path.join(bindir, "kvmlockprof"), "w") as f:
        f.write('#!/bin/sh\nexec python3 -m kvmlockprof "$@"\n')
    os.chmod(os.path.join(bindir, "kvmlockprof"), 0o755)
    os.symlink("/usr/bin/python3", os.path.join(bindir, "python"))
    open(tmp + STAMP[len(ROOT):], "w").close()
    shutil.rmtree(ROOT, ignore_errors=True)
    os.replace(tmp, ROOT)
    return ROOT


def main(argv):
    try:
        print(build(force="--force" in argv))
    except (RootError, subprocess.CalledProcessError) as e:
        print(f"kvmlockprof: cannot build the arm64 lab root: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
