"""`make deb`: the package built, checked by Debian's tools (lintian, dpkg, apt,
systemd-analyze), installed on this host, run from its installed copy, purged, and
nothing of it left."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.live
APT = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
LEFT = ("/usr/lib/kvmlockprof", "/usr/bin/kvmlockprof",
        "/lib/systemd/system/kvmlockprof-exporter.service", "/usr/share/doc/kvmlockprof",
        "/etc/systemd/system/multi-user.target.wants/kvmlockprof-exporter.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/kvmlockprof-exporter.service.dsh-also",
        "/run/kvmlockprof", "/var/cache/kvmlockprof/bpf")


def run(*cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{cmd}: {p.stdout[-2000:]}{p.stderr[-2000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def deb(live, tmp_path_factory):
    for tool in ("dpkg-deb", "lintian", "systemd-analyze"):
        if not shutil.which(tool):
            why = f"{tool} missing (make test installs it)"
            pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    if subprocess.run(["dpkg", "-s", "kvmlockprof"], capture_output=True).returncode == 0:
        pytest.skip("a kvmlockprof package is installed here already: not touching it")
    out = tmp_path_factory.mktemp("deb")
    path = run(sys.executable, f"{ROOT}/contrib/deb/build.py", out, timeout=1200).split()[-1]
    return path


def test_lintian_finds_no_error(deb):
    run("lintian", "--fail-on", "error", deb, timeout=900)


def test_installed_runs_verifies_and_purges_clean(deb, tmp_path):
    from kvmlockprof import __version__
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", deb, env=APT,
        timeout=600)
    try:
        assert run("/usr/bin/kvmlockprof", "--version").split()[-1] == __version__
        doctor = run("/usr/bin/kvmlockprof", "doctor", cwd="/", timeout=120)
        assert "probe contention" in doctor
        rec = tmp_path / "r.parquet"
        run("/usr/bin/kvmlockprof", "record", "-q", "-a", "-d", 3, "-o", rec, cwd="/",
            timeout=180)
        assert "contended waits" in run("/usr/bin/kvmlockprof", "report", rec, cwd="/")
        run("systemd-analyze", "verify", "/lib/systemd/system/kvmlockprof-exporter.service")
        enabled = subprocess.run(["systemctl", "is-enabled", "kvmlockprof-exporter"],
                                 capture_output=True, text=True).stdout.strip()
        assert enabled in ("disabled", ""), enabled          # installed, not enabled
        # its children find it too (`python3 -m kvmlockprof`: the workload's VM processes)
        run("/usr/bin/kvmlockprof", "workload", "--vms", 2, "--vcpus", 1, "--duration", 1,
            cwd="/", timeout=120)
        # enabled by an operator: purge takes the enablement away too
        run("systemctl", "enable", "kvmlockprof-exporter")
        # nothing written under the package's files at run time (the bytecode is the
        # postinst's, removed by its prerm)
        owned = set(run("dpkg", "-L", "kvmlockprof").splitlines())
        extra = [os.path.join(d, f) for d, _, fs in os.walk("/usr/lib/kvmlockprof")
                 for f in fs if os.path.join(d, f) not in owned and "__pycache__" not in d]
        assert not extra, extra[:10]
    finally:
        run("apt-get", "purge", "-y", "-qq", "kvmlockprof", env=APT, timeout=600)
    assert subprocess.run(["dpkg", "-s", "kvmlockprof"], capture_output=True).returncode
    assert [p for p in LEFT if os.path.exists(p)] == []
