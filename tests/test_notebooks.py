"""The notebooks in notebooks/ run from the first cell to the last (nbclient, kernel python3).

They run in their fast mode (STMOE_NOTEBOOK_FAST=1: a few steps per run), in a temporary working
directory, one JAX CPU device as on a laptop or Colab. The three share one runs folder and run in
the order a reader meets them: quickstart trains the checkpoint that routing_analysis traces and
finetune starts from, so it is trained once. Run alone (`-k finetune`), a notebook trains the
checkpoint itself, as it does for a reader who opens it first. Each notebook ends with assertions
of its own (losses finite and below a uniform guess, entropies in [0, ln E], one answer per
question); a cell that raises fails the test with that cell's error.
"""
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELL_TIMEOUT_S = 1800  # a generous bound for one cell on a loaded machine; fast-mode cells take seconds to a minute
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The working directory and the kernel environment the three notebooks share."""
    cwd = tmp_path_factory.mktemp("notebooks")
    env = dict(os.environ, STMOE_NOTEBOOK_FAST="1", STMOE_RUNS_DIR=str(cwd / "runs"),
               XLA_FLAGS=xla_flags.with_devices(1), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return cwd, env


def execute(name: str, cwd, env) -> nbformat.NotebookNode:
    """Executes notebooks/<name>.ipynb in `cwd`; fails the test with the failing cell's source and error.
    The executed copy (outputs included) is kept next to the runs for a look after a failure."""
    nb = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(cwd)}})
    error = None
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        error = _ANSI.sub("", str(e))  # the cell's source and its traceback
    finally:
        nbformat.write(nb, str(cwd / f"{name}.executed.ipynb"))
    if error is not None:
        pytest.fail(f"notebooks/{name}.ipynb failed (executed copy: {cwd / (name + '.executed.ipynb')}):\n{error}",
                    pytrace=False)
    return nb


def printed(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", ()))


@pytest.mark.parametrize("name", ["quickstart", "routing_analysis", "finetune"])
def test_notebook_runs_in_fast_mode(name, shared):
    cwd, env = shared
    nb = execute(name, cwd, env)
    # The final cell's checks ran (not skipped by an early exit) and printed their verdict.
    assert printed(nb).rstrip().splitlines()[-1].startswith("ok:"), printed(nb)[-2000:]
