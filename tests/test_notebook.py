"""notebooks/demo.ipynb runs top to bottom on CPU (nbclient, a fresh ipykernel), with small
settings injected after its 'parameters' cell (papermill's convention): 2 epochs (6 steps) of
the same tiny config conftest.free_sinewich_run trains, so the kernel's programs come from the
session's compilation cache."""
import os
import subprocess
import sys

import nbformat
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


def _setup_cell(cwd, **env):
  """Runs the notebook's first code cell (the install cell) in a bare interpreter (-S: no site
  packages, so no installed freesine_jax) from `cwd`, with only `env` set."""
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  source = next(cell.source for cell in notebook.cells if cell.cell_type == "code")
  return subprocess.run([sys.executable, "-S", "-c", source], cwd=cwd, capture_output=True,
                        text=True, timeout=60, env={"PATH": os.environ["PATH"], **env})


def test_setup_cell_uses_the_checkout_it_runs_in_or_says_what_to_set(tmp_path):
  # Run from a clone's notebooks/ folder (the package importable): no clone, no install; it
  # moves to the clone's root.
  clone = tmp_path / "clone"
  (clone / "freesine_jax").mkdir(parents=True)
  (clone / "notebooks").mkdir()
  (clone / "pyproject.toml").write_text("")
  (clone / "freesine_jax" / "__init__.py").write_text("")
  proc = _setup_cell(clone / "notebooks", PYTHONPATH=str(clone))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == f"repository: {clone}"
  # Anywhere else without FREESINE_REPO_URL: one line saying what to set, before any clone.
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  proc = _setup_cell(elsewhere)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("RuntimeError: not inside a freesine_jax checkout and "
                         "FREESINE_REPO_URL is unset: set it to the repository's git URL"), last
  assert os.listdir(elsewhere) == []
