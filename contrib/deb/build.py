"""`make deb`: a Debian package of kvmlockprof for hosts (Debian 12, amd64).

kvmlockprof and its Python dependencies (pandas, pyarrow, ...: not Debian's, their
versions are the ones tested) go to a private directory, /usr/lib/kvmlockprof, never
to the system's site-packages; bcc comes from Debian's python3-bpfcc. /usr/bin/kvmlockprof
runs Debian's python3 with that directory first on its path. The exporter's systemd
unit is installed, not enabled. Usage: python contrib/deb/build.py [OUTDIR]"""
import gzip
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRIVATE = "/usr/lib/kvmlockprof"
UNIT = "kvmlockprof-exporter.service"
SHIM = f"""#!/usr/bin/python3 -I
# kvmlockprof, from its private directory (the Debian package's)
import os
import sys
sys.dont_write_bytecode = True     # (the bytecode is postinst's; nothing else written)
sys.path[:0] = ["{PRIVATE}"]
# its own children (`python3 -m kvmlockprof ...`: ab's runs, the workload's VMs) too
os.environ["PYTHONPATH"] = os.pathsep.join(
    ["{PRIVATE}"] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
from kvmlockprof.__main__ import main
sys.exit(main())
"""


# As dh_installsystemd --no-enable writes them: the unit known, never enabled or started
# by the package; stopped at removal, restarted at upgrade if it runs, forgotten at purge.
# The bytecode is made at install, removed before removal (as Debian's py3compile).
POSTINST = f"""#!/bin/sh
set -e
case "$1" in configure|abort-upgrade|abort-deconfigure|abort-remove)
    python3 -m compileall -q -j 0 {PRIVATE} >/dev/null || true
    deb-systemd-helper update-state {UNIT} >/dev/null || true
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        deb-systemd-invoke try-restart {UNIT} >/dev/null || true
    fi;;
esac
"""
PRERM = f"""#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    deb-systemd-invoke stop {UNIT} >/dev/null || true
fi
find {PRIVATE} -depth -name __pycache__ -type d -exec rm -rf {{}} + 2>/dev/null || true
"""
POSTRM = f"""#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = purge ] && command -v deb-systemd-helper >/dev/null; then
    deb-systemd-helper purge {UNIT} >/dev/null || true
fi
# what runs kept for this boot: attach trials' verdicts, struct offsets (kernel/host.py
# RUN_DIR); the compiled BPF kept between runs (kernel/bpfcache.py)
if [ "$1" = purge ]; then
    rm -rf /run/kvmlockprof /var/cache/kvmlockprof/bpf
fi
"""


def version():
    return re.search(r"^version = (\S+)", (ROOT / "setup.cfg").read_text(), re.M).group(1)


def control(ver, size_kb):
    major, minor = sys.version_info[:2]       # (the wheels are this python's)
    DEPENDS = ", ".join([  # noqa: N806  (one line: a control field has no continuation)
        "libc6", f"python3 (>= {major}.{minor})", f"python3 (<< {major}.{minor + 1})",
        "python3-bpfcc", "libbpfcc", "init-system-helpers (>= 1.54)"])
    return f"""Package: kvmlockprof
Version: {ver}-1
Architecture: amd64
Maintainer: kvmlockprof developers <devel@kvmlockprof.org>
Installed-Size: {size_kb}
Depends: {DEPENDS}
Recommends: linux-headers-amd64
Section: admin
Priority: optional
Homepage: https://github.com/kvmlockprof/kvmlockprof
Description: eBPF live lock-contention profiler for Linux KVM hosts
 kvmlockprof times every contended kernel lock wait at the lock:contention
 tracepoints, names KVM's locks by their place (kvm(PID)->mmu_lock), records
 to Parquet, reports as perf lock contention does, compares kernels with
 statistics, serves Prometheus metrics (kvmlockprof-exporter.service, not
 enabled) and, opt-in, checks the lock order of KVM's locks as lockdep would.
"""


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "dist")
    deb_py = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    if deb_py != str(tuple(sys.version_info[:2])):
        sys.exit(f"build with Debian's python3 ({deb_py}; this is {sys.version_info[:2]}): "
                 "the venv make setup makes")
    if os.uname().machine != "x86_64":
        sys.exit("the package is amd64: build it on an x86-64 Debian host")
    shutil.rmtree(ROOT / "build", ignore_errors=True)     # (setuptools' leftovers would ship)
    ver = version()
    stage = out / f"kvmlockprof_{ver}-1_amd64"
    shutil.rmtree(stage, ignore_errors=True)
    lib = stage / PRIVATE.lstrip("/")
    # the project and its dependencies, for Debian 12's python3 (3.11, the venv's)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile",
                    "--disable-pip-version-check", "--target", str(lib), str(ROOT)],
                   check=True)
    shutil.rmtree(lib / "bin", ignore_errors=True)          # (console scripts: the shim)
    # the BPF C sources, as files (the tree's kvmlockprof/bpf is a link to ../bpf)
    bpf = lib / "kvmlockprof" / "bpf"
    if bpf.is_symlink():
        bpf.unlink()
    shutil.copytree(ROOT / "bpf", bpf, dirs_exist_ok=True)
    (stage / "usr/bin").mkdir(parents=True)
    (stage / "usr/bin/kvmlockprof").write_text(SHIM)
    os.chmod(stage / "usr/bin/kvmlockprof", 0o755)
    unit = (ROOT / "contrib" / UNIT).read_text().replace("/usr/local/bin/kvmlockprof",
                                                         "/usr/bin/kvmlockprof")
    (stage / "lib/systemd/system").mkdir(parents=True)
    (stage / "lib/systemd/system" / UNIT).write_text(unit)
    doc = stage / "usr/share/doc/kvmlockprof"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        "Upstream-Name: kvmlockprof\n\nFiles: *\nCopyright: kvmlockprof developers\n"
        "License: Apache-2.0\n On Debian systems, the full text of the Apache License "
        "2.0 is in\n /usr/share/common-licenses/Apache-2.0.\n")
    stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    with gzip.GzipFile(doc / "changelog.Debian.gz", "wb", mtime=0) as f:
        f.write(f"kvmlockprof ({ver}-1) unstable; urgency=medium\n\n  * Package of "
                f"kvmlockprof {ver}.\n\n -- kvmlockprof developers "
                f"<devel@kvmlockprof.org>  {stamp}\n".encode())
    for p in stage.rglob("*"):                # (dpkg: no group/world-writable files)
        if not p.is_symlink():
            x = p.is_dir() or (os.access(p, os.X_OK) and not re.search(r"\.so(\.|$)", p.name))
            os.chmod(p, 0o755 if x else 0o644)
    # lintian: what a private copy of upstream wheels is, said once: their libraries as
    # published (bundled copies, their own search paths; stripping breaks the ones
    # auditwheel patched), where Debian's would be other versions than tested
    ov = stage / "usr/share/lintian/overrides"
    ov.mkdir(parents=True)
    (ov / "kvmlockprof").write_text("".join(
        f"kvmlockprof: {tag} {ctx}[{PRIVATE.lstrip('/')}/*]\n" for tag, ctx in (
            ("embedded-library", "* "), ("custom-library-search-path", "* "),
            ("library-not-linked-against-libc", ""), ("unstripped-binary-or-object", ""))))
    size_kb = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file()) // 1024
    (stage / "DEBIAN").mkdir()
    (stage / "DEBIAN/control").write_text(control(ver, size_kb))
    # bytecode made at install and removed before removal (as Debian's py3compile does)
    for name, body in (("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)):
        (stage / "DEBIAN" / name).write_text(body)
        os.chmod(stage / "DEBIAN" / name, 0o755)
    deb = out / f"kvmlockprof_{ver}-1_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(stage),
                    str(deb)], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(stage)
    print(deb)


if __name__ == "__main__":
    main()
