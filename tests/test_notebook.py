"""notebooks/demo.ipynb runs top to bottom on CPU (nbclient, a fresh ipykernel), with small
settings injected after its 'parameters' cell (papermill's convention): 2 epochs (6 steps) of
the same tiny config conftest.free_sinewich_run trains, so the kernel's programs come from the
session's compilation cache."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "demo.ipynb")


def test_demo_notebook_runs_every_cell(tmp_path, synthetic_data_dir, free_sinewich_run):
  del free_sinewich_run  # compiled the notebook's programs into the session cache
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
      "commit the notebook without outputs")
  index = next(i for i, cell in enumerate(notebook.cells)
               if "parameters" in cell.metadata.get("tags", []))
  workdir = str(tmp_path / "demo")
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
      f"EPOCHS = 2\nWORKDIR = {workdir!r}"))
  os.environ["FREESINE_DATA_DIR"] = synthetic_data_dir  # the kernel inherits it
  try:
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
  finally:
    del os.environ["FREESINE_DATA_DIR"]
  outputs = [cell.outputs for cell in notebook.cells if cell.cell_type == "code"]
  text = "".join(o.get("text", "") for cell in outputs for o in cell)
  images = [o for cell in outputs for o in cell if "image/png" in o.get("data", {})]
  assert "all tasks beat the untrained model:" in text  # the training cell finished
  assert "median encoder layer" in text  # tools.analyze's report
  assert len(images) == 4  # two example grids, the frequencies, the spectra
  assert os.path.exists(os.path.join(workdir, "eval", "step_6", "metrics.json"))
