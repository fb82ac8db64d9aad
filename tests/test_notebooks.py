"""Executes every notebook in notebooks/ on CPU; any cell error fails the test."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def shared_workdir(tmp_path_factory):
    """One workdir for all notebooks, so 03 reuses the model that 02 trains."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, shared_workdir, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{path.name} is stored with outputs; clear them"
    monkeypatch.setenv("DDPM_NOTEBOOK_WORKDIR", str(shared_workdir))
    # The kernel sees the machine's real CPU device, as a user's notebook would, not the 8
    # fake devices of the test process.
    flags = os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "").strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3",
        resources={"metadata": {"path": str(shared_workdir)}},
    )
    client.execute()


def test_notebooks_exist():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]
