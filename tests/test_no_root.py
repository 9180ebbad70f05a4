"""Loading, analysis, reports and the notebooks need no root, and nothing in
them unpickles or evaluates what a file says."""
import os
import re
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT
from tests_support import small_recording

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


# The one exception: the loader child's handover unpickles what its own fork sends
# over a socketpair made before the fork (no file, no other process's bytes).
HANDOVER = os.path.join("kvmlockprof", "kernel", "handover.py")


def test_no_pickle_or_eval():
    code = re.compile(r"\bpickle\b|\beval\(|\bexec\(|allow_pickle|read_pickle|marshal\.load")
    for d in ("kvmlockprof", "notebooks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, d)):
            for f in files:
                path = os.path.join(dirpath, f)
                if f.endswith((".py", ".ipynb")) and os.path.relpath(path, ROOT) != HANDOVER:
                    assert not code.search(open(path).read()), path
    text = open(os.path.join(ROOT, HANDOVER)).read()
    assert "socket.socketpair(" in text and "os.fork()" in text and "open(" not in \
        text.replace("with open(log", ""), "handover unpickles only its child's socket"


@pytest.fixture
def shared_dir():
    """A directory the unprivileged user can read and write."""
    if os.geteuid() != 0:
        pytest.skip("already unprivileged: nothing to drop")
    d = tempfile.mkdtemp(prefix="kvmlp-noroot-")
    os.chmod(d, 0o777)
    yield d
    subprocess.run(["rm", "-rf", d])


def as_nobody(argv, cwd, **kw):
    env = dict(os.environ, HOME=cwd)
    return subprocess.run(NOBODY + argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def test_report_compare_html_as_nobody(shared_dir):
    rec = small_recording(os.path.join(shared_dir, "r.parquet"))
    os.chmod(rec, 0o644)
    klp = [sys.executable, "-m", "kvmlockprof"]
    for args in (["report", rec], ["report", rec, "--html", "r.html", "-F", "json"],
                 ["compare", rec, rec, "-o", "c.txt", "--html", "c.html"]):
        p = as_nobody(klp + args, shared_dir)
        assert p.returncode == 0, (args, p.stderr)
    assert os.path.getsize(os.path.join(shared_dir, "r.html")) > 100_000


def test_analysis_notebook_as_nobody(shared_dir):
    rec = small_recording(os.path.join(shared_dir, "r.parquet"))
    os.chmod(rec, 0o644)
    script = (
        "import nbformat, sys\n"
        "from nbclient import NotebookClient\n"
        f"nb = nbformat.read({os.path.join(ROOT, 'notebooks', 'analysis.ipynb')!r}, 4)\n"
        "cell = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])][0]\n"
        f"cell.source = {'RECORDING = ' + repr(rec)!r}\n"
        "NotebookClient(nb, timeout=300, kernel_name='python3').execute()\n"
        "print('ran', len(nb.cells), 'cells')\n")
    p = as_nobody([sys.executable, "-c", script], shared_dir)
    assert p.returncode == 0 and "ran" in p.stdout, p.stderr[-2000:]
