"""A private Prometheus server (Debian's `prometheus`) on 127.0.0.1 for the tests that
check the exporter against Prometheus itself, and its HTTP API."""
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what, every=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()
    except OSError:
        return None


class Prometheus:
    """A private Prometheus server scraping its targets ({job: "host:port"}, or one
    target as job kvmlockprof) every `interval`."""

    def __init__(self, targets, tmp_path, interval="1s"):
        exe = shutil.which("prometheus")
        if not exe:
            if os.environ.get("CI"):
                pytest.fail("prometheus missing in CI (make test installs it)")
            pytest.skip("prometheus is not installed (apt-get install prometheus)")
        if isinstance(targets, str):
            targets = {"kvmlockprof": targets}
        self.port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(f"global:\n  scrape_interval: {interval}\n  evaluation_interval: "
                       f"{interval}\n  scrape_timeout: {interval}\nscrape_configs:\n" +
                       "".join(f"  - job_name: {job}\n    static_configs:\n"
                               f"      - targets: ['{t}']\n" for job, t in targets.items()))
        self.log = open(tmp_path / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def ready(self, timeout=60):
        wait_for(lambda: self.proc.poll() is None and get(f"{self.url}/-/ready"), timeout,
                 "Prometheus to be ready")

    def query(self, expr, at=None):
        """An instant query's result (HTTP API): a vector, or a matrix of raw samples
        for a range selector."""
        q = {"query": expr, **({"time": f"{at:.3f}"} if at else {})}
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?"
                                        f"{urllib.parse.urlencode(q)}", timeout=10) as r:
                body = r.read().decode()
        except urllib.error.HTTPError as e:     # (a bad query: its error says why)
            body = e.read().decode()
        except OSError as e:
            raise AssertionError(f"Prometheus did not answer {expr!r}: {e}")
        out = json.loads(body)
        assert out["status"] == "success", out
        return out["data"]["result"]

    def value(self, expr, at=None):
        r = self.query(expr, at)
        return float(r[0]["value"][1]) if r else None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
