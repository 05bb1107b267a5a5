"""tools.table: paper-style Markdown from run directories (mean ± std over seeds, Δm)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from freesine_jax.tools import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(path, semseg, normals, params=1000, analysis=None):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"final": {"semseg": {"mIoU": semseg, "pixel_acc": 0.5},
                         "normals": {"mean": normals, "median": 1.0}},
               "trainable_parameters": params}, f)
  if analysis is not None:
    os.makedirs(os.path.join(path, "analysis"))
    with open(os.path.join(path, "analysis", "analysis.json"), "w", encoding="utf-8") as f:
      json.dump({"summary": {"encoder": analysis}}, f)


def test_rows_means_stds_and_delta_m(tmp_path):
  ref = [str(tmp_path / f"ref{i}") for i in range(2)]
  new = [str(tmp_path / f"new{i}") for i in range(3)]
  write_run(ref[0], 40.0, 20.0)
  write_run(ref[1], 44.0, 22.0)
  regime = {"nonlinearity": 0.5, "rank_base": 8, "rank_task": {"semseg": 20, "normals": 30},
            "task_correlation": 0.8, "task_correlation_linear": 1.0}
  for path, (s, n) in zip(new, [(46.0, 19.0), (48.0, 20.0), (50.0, 21.0)]):
    write_run(path, s, n, params=2000, analysis=regime)
  rows = [table.load_row(label, paths) for label, paths in
          table.parse_runs([f"base={','.join(ref)}", f"ours={','.join(new)}"])]
  text = table.table(rows, reference="base")
  lines = text.splitlines()
  assert lines[0].startswith("| method | runs | semseg mIoU ↑ | normals mean ↓ | Δm % (vs base)")
  ours = lines[3]
  assert "| ours | 3 |" in ours and "48.00 ± 2.00" in ours and "20.00 ± 1.00" in ours
  # Δm per run against the reference means (semseg 42, normals 21), then mean ± std.
  deltas = [100 * np.mean([(s - 42) / 42, -(n - 21) / 21])
            for s, n in [(46, 19), (48, 20), (50, 21)]]
  assert f"{np.mean(deltas):.2f} ± {np.std(deltas, ddof=1):.2f}" in ours
  assert "2,000" in ours and "0.500 ± 0.000" in ours and "8 → 25" in ours
  base = lines[2]
  assert "42.00 ± 2.83" in base and "| – | – | – |" in base  # no analysis for the base runs


def test_single_directory_row_and_errors(tmp_path):
  write_run(str(tmp_path / "only"), 40.0, 20.0)
  rows = [table.load_row(*table.parse_runs([str(tmp_path / "only")])[0])]
  assert "| only | 1 | 40.00 | 20.00 | 0.00 |" in table.table(rows)
  with pytest.raises(ValueError, match="reference"):
    table.table(rows, reference="nope")
  with pytest.raises(ValueError, match="results.json"):
    table.load_row("x", [str(tmp_path / "missing")])


def test_cli_prints_markdown_and_fails_cleanly(tmp_path):
  write_run(str(tmp_path / "a"), 40.0, 20.0)
  write_run(str(tmp_path / "b"), 44.0, 18.0)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cmd = [sys.executable, "-m", "freesine_jax.tools.table", "--runs", str(tmp_path / "a"),
         str(tmp_path / "b")]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 4 and lines[1].startswith("|---")
  # b vs a: semseg +10%, normals 20 -> 18 is 10% better: Δm = +10.
  assert lines[2].startswith("| a | 1 | 40.00 | 20.00 | 0.00 |")
  assert lines[3].startswith("| b | 1 | 44.00 | 18.00 | 10.00 |")
  bad = subprocess.run(cmd[:3] + [str(tmp_path / "missing")], capture_output=True, text=True,
                       env=env, timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.strip().count("\n") == 0 and "results.json" in bad.stderr
