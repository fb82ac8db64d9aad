"""Executes every notebook in notebooks/ on CPU; any cell error fails the test."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name} is stored with outputs; clear them"
    # Notebooks write their files (trained models, samples) under the working directory.
    monkeypatch.setenv("DDPM_NOTEBOOK_WORKDIR", str(tmp_path))
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 1

