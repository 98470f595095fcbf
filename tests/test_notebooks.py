"""The notebooks: valid, committed without outputs, and executed at tiny sizes (each must draw)."""

import ast
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

#: Per notebook: the values its parameters cell gets under test, and the figures it must show.
TINY = {
    "quickstart.ipynb": (dict(NUM_PROMPTS=4, WARM_START=None, GRPO_STEPS=2, PROMPTS_PER_STEP=2, GROUP_SIZE=2,
                              NUM_VAL=4), 4),
    "tensorboard_logs.ipynb": (dict(STEPS=4, VAL_EVERY=2, WARM_START=None, PROMPTS_PER_STEP=2, GROUP_SIZE=2,
                                    NUM_VAL=4), 2),
    "new_model.ipynb": (dict(WARMUP_STEPS=3, GRPO_STEPS=2, PROMPTS_PER_STEP=2, GROUP_SIZE=2), 3),
}


def _code_cells(nb: dict) -> list[dict]:
    """The notebook's code cells, in order."""
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _assigned_names(source: str) -> set[str]:
    """The names that a cell's top-level assignments bind."""
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_its_code_parses(path):
    nb = json.loads(path.read_text())
    assert nb["nbformat"] == 4
    code = _code_cells(nb)
    assert code, f"{path.name} has no code"
    for cell in code:
        ast.parse("".join(cell["source"]))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_have_no_outputs(path):
    """Outputs are not versioned: every code cell is committed unexecuted."""
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: code cells {dirty} hold outputs; clear them before committing"


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "new_model.ipynb", "tensorboard_logs.ipynb"}
    assert {p.name for p in NOTEBOOKS} == set(TINY), "give each notebook its tiny settings in TINY"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_holds_every_size_setting(path):
    """The test replaces the parameters cell: it must be the first code cell, tagged, and assign
    exactly the names the tiny settings give (plus LOG_DIR where the notebook writes logs)."""
    nb = json.loads(path.read_text())
    first = _code_cells(nb)[0]
    assert "parameters" in first["metadata"].get("tags", [])
    names = _assigned_names("".join(first["source"]))
    assert names - {"LOG_DIR"} == set(TINY[path.name][0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_at_tiny_size_and_shows_figures(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    values, figures = TINY[path.name]
    nb = nbformat.read(path, as_version=4)
    params = next(c for c in nb.cells if c.cell_type == "code")
    tiny = {**values, "LOG_DIR": str(tmp_path / "runs")} if "LOG_DIR" in params.source else values
    params.source = "\n".join(f"{k} = {v!r}" for k, v in tiny.items())
    # the kernel imports this checkout's package, draws inline, downloads nothing, caches in tmp
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("UNIRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny matrices: one thread is fastest and fights no job
    before = sorted(p.name for p in path.parent.iterdir())
    run_in = {"metadata": {"path": str(path.parent)}}  # the notebooks' paths are relative to notebooks/
    NotebookClient(nb, timeout=240, kernel_name="python3", resources=run_in).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= figures, f"{path.name} showed {len(images)} figures, expected {figures}"
    assert sorted(p.name for p in path.parent.iterdir()) == before, "the notebook wrote into notebooks/"
