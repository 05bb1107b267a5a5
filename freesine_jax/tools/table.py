"""Paper-style results table from training runs, as Markdown.

  python -m freesine_jax.tools.table --runs "Free Sinewich=runs/fs_s0,runs/fs_s1,runs/fs_s2" \
      "w/o sine=runs/lin_s0,runs/lin_s1,runs/lin_s2" --reference="w/o sine"

Each --runs entry is `label=dir[,dir...]` (several seeds of one setting: mean ± std) or a single
directory (labelled by its name). A run directory is a training --workdir: its results.json gives
the final per-task metrics and the trainable-parameter count; an analysis/analysis.json
(tools.analyze) adds the Sine-AWB regime columns. Δm (docs/design.md §5) is computed per run
against the mean of the --reference row's runs, then averaged over the row's runs; without
--reference the first row is the reference.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

from absl import flags
import numpy as np

from freesine_jax import cli
from freesine_jax import errors

from freesine_jax import metrics as metrics_lib
from freesine_jax import tasks as tasks_lib



@dataclasses.dataclass
class Row:
  label: str
  runs: list[dict]            # results.json of each run
  analyses: list[dict]        # analysis.json of each run that has one


def parse_runs(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
  groups = []
  for spec in specs:
    label, sep, dirs = spec.partition("=")
    if not sep:
      label, dirs = os.path.basename(os.path.normpath(spec)), spec
    paths = [d.strip() for d in dirs.split(",") if d.strip()]
    if not paths:
      raise errors.UserError(f"--runs {spec!r}: no run directory given")
    groups.append((label.strip(), paths))
  return groups


def load_row(label: str, paths: Sequence[str]) -> Row:
  runs, analyses = [], []
  for path in paths:
    results_path = os.path.join(path, "results.json")
    if not os.path.exists(results_path):
      raise errors.UserError(f"{results_path}: not found (has the run in {path} finished?)")
    with open(results_path, encoding="utf-8") as f:
      runs.append(json.load(f))
    analysis_path = os.path.join(path, "analysis", "analysis.json")
    if os.path.exists(analysis_path):
      with open(analysis_path, encoding="utf-8") as f:
        analyses.append(json.load(f))
  return Row(label, runs, analyses)


def headline(results: dict, task: str) -> float:
  key = tasks_lib.get_task(task).headline_metric
  value = results["final"][task].get(key)
  return math.nan if value is None else float(value)


def _fixed(value: float, digits: int) -> str:
  """`value` with `digits` decimals; never '-0.00' (a reference row's Δm of -1e-17)."""
  text = f"{value:.{digits}f}"
  return text[1:] if text.startswith("-") and float(text) == 0 else text


def _mean_std(values: Sequence[float], digits: int) -> str:
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return "–"
  if len(values) == 1:
    return _fixed(values[0], digits)
  return f"{_fixed(np.mean(values), digits)} ± {_fixed(np.std(values, ddof=1), digits)}"


def table(rows: Sequence[Row], reference: str | None = None) -> str:
  """The Markdown table; columns: per-task headline metric, Δm, trainable params, regime."""
  if not rows:
    raise errors.UserError("no runs given")
  labels = [r.label for r in rows]
  ref_label = reference or labels[0]
  if ref_label not in labels:
    raise errors.UserError(f"--reference={ref_label!r} is not one of the row labels {labels}")
  ref_row = rows[labels.index(ref_label)]
  tasks = list(rows[0].runs[0]["final"])
  for row in rows:
    for run in row.runs:
      if list(run["final"]) != tasks:
        raise errors.UserError(f"row {row.label!r}: tasks {list(run['final'])} differ from {tasks}")
  ref_key = {t: tasks_lib.get_task(t).headline_metric for t in tasks}
  reference_metrics = {t: {ref_key[t]: float(np.mean([headline(r, t) for r in ref_row.runs]))}
                       for t in tasks}
  has_analysis = any(row.analyses for row in rows)

  header = ["method", "runs"]
  for t in tasks:
    spec = tasks_lib.get_task(t)
    header.append(f"{t} {spec.headline_metric} {'↑' if spec.higher_is_better else '↓'}")
  header += [f"Δm % (vs {ref_label})", "trainable"]
  if has_analysis:
    header += ["enc. nonlinearity", "enc. rank base → task", "enc. task corr. (linear)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [row.label, str(len(row.runs))]
    for t in tasks:
      digits = 4 if tasks_lib.get_task(t).headline_metric == "loss" else 2
      cells.append(_mean_std([headline(r, t) for r in row.runs], digits))
    deltas = [metrics_lib.delta_m(run["final"], reference_metrics) for run in row.runs]
    cells.append(_mean_std(deltas, 2))
    params = sorted({int(r["trainable_parameters"]) for r in row.runs if
                     r.get("trainable_parameters") is not None})
    cells.append(", ".join(f"{p:,}" for p in params) or "–")
    if has_analysis:
      encoder = [a["summary"]["encoder"] for a in row.analyses if "encoder" in a["summary"]]
      if encoder:
        cells.append(_mean_std([e["nonlinearity"] for e in encoder], 3))
        task_rank = [float(np.median(list(e["rank_task"].values()))) for e in encoder]
        cells.append(f"{np.mean([e['rank_base'] for e in encoder]):g} → "
                     f"{np.mean(task_rank):g}")
        cells.append(f"{_mean_std([e['task_correlation'] for e in encoder], 3)} "
                     f"({_mean_std([e['task_correlation_linear'] for e in encoder], 3)})")
      else:
        cells += ["–", "–", "–"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_multi_string(
      "runs", None, "label=dir[,dir...] or dir; repeat the flag or list several after it.")
  flags.DEFINE_string("reference", None, "Label of the Δm reference row (default: the first "
                      "row).")


def main(argv):
  specs = list(flags.FLAGS.runs or []) + list(argv[1:])
  if not specs:
    raise errors.UserError("give at least one run with --runs=label=dir[,dir...]")
  rows = [load_row(label, paths) for label, paths in parse_runs(specs)]
  try:
    print(table(rows, flags.FLAGS.reference))
  except KeyError as e:
    raise errors.UserError(f"a results.json lacks {e}; was it written by freesine_jax.main?"
                           ) from None


def run():
  cli.run("freesine_jax.tools.table", define_flags, main, positional_args=True,
          log_file=False)


if __name__ == "__main__":
  run()
