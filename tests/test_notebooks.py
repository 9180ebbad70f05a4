"""The notebooks run top to bottom (nbclient) on recordings made live in this run."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, klp, workload_argv

pytestmark = pytest.mark.live
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def execute(name, tmp_path, **params):
    """Run a notebook with its `parameters` cell replaced; fail on any cell error."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    cells[0].source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, str(tmp_path / name))       # kept for a look when a test fails
    return nb


def outputs(nb):
    text, mimes = [], set()
    for c in nb.cells:
        for o in c.get("outputs", []):
            mimes.update(o.get("data", {}))
            text.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
    return "\n".join(text), mimes


def test_analysis_notebook(churn_recording, tmp_path):
    rec, _, _ = churn_recording
    nb = execute("analysis.ipynb", tmp_path, RECORDING=str(rec.path))
    text, mimes = outputs(nb)
    assert "application/vnd.plotly.v1+json" in mimes           # the figures were drawn
    assert "churnvm" in text and "kvm_" in text                 # per-VM table, KVM callers
    assert "probes attached: contention (raw_tracepoint)" in text


@pytest.fixture(scope="module")
def two_recordings(live, tmp_path_factory):
    """Memslot churn off, then on at a fixed rate for 4 s: one run a side is tested over
    its 500 ms bins, and free-running churn for 2 s (bursty, ~5 bins, half-empty ones at
    the edges) left kvm->slots_lock's 0 -> 3,826 waits/s at p 0.069 in a CI run."""
    d = tmp_path_factory.mktemp("ab")
    out = []
    for name, extra in (("base", []), ("new", ["--churn", "--churn-rate", 2000])):
        path = d / f"{name}.parquet"
        klp("record", "-q", "-o", path, "--",
            *workload_argv("--duration", 4, "--vcpus", 2, *extra))
        out.append(str(path))
    return out


def test_compare_notebook(two_recordings, tmp_path):
    base, new = two_recordings
    nb = execute("compare.ipynb", tmp_path, BASE=[base], NEW=[new], THRESHOLD=0.05)
    text, mimes = outputs(nb)
    assert "BASE: 1 run" in text and "NEW : 1 run" in text
    assert "regressed" in text                      # memslot churn off -> on
    assert "application/vnd.plotly.v1+json" in mimes
