"""The HTML report in a real headless Chromium: it renders with no JavaScript
errors and the screenshot holds the plots (CI installs Debian's chromium)."""
import os
import shutil
import subprocess

import pytest

import kvmlockprof
from kvmlockprof import html
from tests_support import small_recording

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("chromium missing in CI (make setup installs Debian's chromium)")
        pytest.skip("chromium is not installed")
    return path


def test_page_renders_without_js_errors(chromium, tmp_path):
    rec = kvmlockprof.load(small_recording(tmp_path / "r.parquet"))
    page = tmp_path / "r.html"
    page.write_text(html.render(rec))
    shot = tmp_path / "shot.png"
    p = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                        "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    console = [line for line in p.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert shot.exists() and shot.stat().st_size > 30_000      # plots drawn, not a blank page
