"""Evaluation, the library: a jit-compiled forward pass, streaming meters, pictures, and a saved
run evaluated into metrics.json (`evaluate_run`).

Training calls `evaluate`, `predict`, the untrained-baseline key and the verdict; the command
line, `python -m freesine_jax.evaluate_main`, calls `evaluate_run`. `evaluate_run` writes to
`out` (default <run>/eval/step_<N>):

  metrics.json          per-task metrics, delta_m against config.eval.reference, what was evaluated
  examples/<i>.png      image, ground truth and prediction per task for the first
                        config.eval.qualitative_examples examples of the split (visualize.py)

The config must describe the run's model (tasks, classes, config.model); evaluation keys (eval
split, batch size, eval.max_batches, ...) may differ. Checkpoint lookup and restore are
checkpointing.find_checkpoint / restore_checkpoint.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from etils import epath
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from freesine_jax import checkpointing
from freesine_jax import metrics as metrics_lib
from freesine_jax import modeling
from freesine_jax import models
from freesine_jax import sharding as sharding_lib
from freesine_jax import tasks as tasks_lib
from freesine_jax import visualize
from freesine_jax import writers
from freesine_jax.data import registry
from freesine_jax.models import adapters

PyTree = Any


# ----------------------------------------------------------------------------- the library


def make_eval_forward(model: nn.Module) -> Callable:
  """Jitted `forward(variables, images) -> outputs` (inference mode). Build it once per model
  and reuse it so evaluation compiles once (linen modules with dict fields are unhashable, so
  the model cannot be a static jit argument)."""
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def make_inference_merge(model: nn.Module) -> Callable | None:
  """Jitted `merge(variables, image_shape) -> variables` (models.merge_for_inference: the task
  kernels and the merged shared LoRA evaluated once for a whole evaluation), or None for a model
  without it (a config.model.factory model). Build it once, like the forward."""
  if not isinstance(model, models.MultiTaskModel):
    return None
  return jax.jit(functools.partial(models.merge_for_inference, model),
                 static_argnames="image_shape")


def model_variables(variables: Mapping[str, PyTree], mesh: jax.sharding.Mesh) -> dict:
  """The collections the forward pass reads (with the merged weights when present),
  replicated on the mesh."""
  names = modeling.COLLECTIONS + (adapters.MERGED,)
  return sharding_lib.replicate({k: variables[k] for k in names if k in variables}, mesh)


def predict(forward: Callable, variables: Mapping[str, PyTree], batch: Mapping[str, Any],
            tasks: Sequence[str], mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """{task: post-processed prediction} for this host's rows of `batch` (numpy)."""
  images = sharding_lib.shard_batch(batch, mesh, ("image",))["image"]
  outputs = sharding_lib.local_rows(forward(variables, images), mesh)
  return {t: metrics_lib.postprocess(t, outputs[t]) for t in tasks}


def make_meters(config: ml_collections.ConfigDict) -> dict[str, metrics_lib.Meter]:
  """One streaming meter per task of config.tasks."""
  return {t: metrics_lib.make_meter(t, config.num_classes[t] if t in config.num_classes
                                    else None) for t in config.tasks}


def delta_m(results: Mapping[str, Mapping[str, Any]],
            config: ml_collections.ConfigDict) -> float | None:
  """Δm (%) against config.eval.reference, or None without a reference for these tasks."""
  reference = config.eval.reference
  if not reference or not any(t in reference for t in results):
    return None
  return metrics_lib.delta_m(results, {t: dict(m) for t, m in dict(reference).items()})


def evaluate(forward: Callable, variables: Mapping[str, PyTree], loader: Iterable,
             config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh,
             merge: Callable | None = None,
             log: Callable[[str], None] | None = None) -> tuple[dict[str, dict], float | None]:
  """Jitted forward over `loader` (at most config.eval.max_batches batches) + streaming
  meters; returns (results per task, Δm or None).

  `log` gets one line with the time of the first batch (where the forward compiles): pass it
  for a process's first evaluation.

  With `merge` (make_inference_merge), the variables are merged for inference once, at the
  first batch: the same outputs without rebuilding the task kernels for every batch.

  Padding rows (batch['valid'] False) are skipped. Meter states are summed over hosts, so
  every host returns the metrics of the whole split.
  """
  tasks = tuple(config.tasks)
  meters = make_meters(config)
  variables = model_variables(variables, mesh)
  t_first = time.perf_counter()
  for i, batch in enumerate(loader):
    if config.eval.max_batches is not None and i >= config.eval.max_batches:
      break
    if merge is not None:
      variables = merge(variables, image_shape=(1, *np.shape(batch["image"])[1:]))
      merge = None
    predictions = predict(forward, variables, batch, tasks, mesh)
    if i == 0 and log is not None:
      log(f"eval step compiled and run on its first batch in "
          f"{time.perf_counter() - t_first:.0f} s")
    for t in tasks:
      meters[t].update(predictions[t], batch[t], valid=batch["valid"])
  if jax.process_count() > 1:
    for t in tasks:
      gathered = multihost_utils.process_allgather(meters[t].state())
      meters[t].reset()
      meters[t].merge({k: np.sum(v, axis=0) for k, v in gathered.items()})
  results = {t: meters[t].result() for t in tasks}
  return results, delta_m(results, config)


def qualitative_batches(loader: Iterable, count: int) -> list[dict]:
  """The first eval batches, enough to hold `count` valid examples (drawn by `draw_examples`)."""
  batches, valid = [], 0
  for batch in loader:
    if valid >= count:
      break
    batches.append(batch)
    valid += int(np.sum(batch["valid"]))
  return batches


def draw_examples(forward: Callable, variables: Mapping[str, PyTree], batches: Sequence[dict],
                  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  title: str = "", merge: Callable | None = None) -> list[np.ndarray]:
  """RGB grids (visualize.example_grid) of the first config.eval.qualitative_examples valid
  rows of `batches` (this host's rows), predicted with `forward`.

  With `merge` (make_inference_merge), predicted from the merged weights as `evaluate` does, so
  pictures and metrics run one compiled forward program, not a second one on unmerged weights.
  """
  tasks = tuple(config.tasks)
  names = registry.class_names(config.dataset.name)
  variables = model_variables(variables, mesh)
  if merge is not None and batches:
    variables = merge(variables, image_shape=(1, *np.shape(batches[0]["image"])[1:]))
  grids, index = [], 0
  for batch in batches:
    predictions = predict(forward, variables, batch, tasks, mesh)
    rows = [r for r in range(len(batch["valid"])) if batch["valid"][r]]
    rows = rows[:config.eval.qualitative_examples - len(grids)]
    titles = [f"{title}example {index + i}".strip() for i in range(len(rows))]
    grids += visualize.batch_grids(batch, predictions, tasks, rows, names, titles)
    index += len(rows)
  return grids


def untrained_baseline_key(config: ml_collections.ConfigDict, backbone_hash: str) -> str:
  """sha256 of everything the step-0 model's metrics depend on: the frozen backbone, the seed,
  the tasks and classes, the model and the dataset (a cached baseline with another key is
  stale)."""
  config_json = json.loads(config.to_json_best_effort())
  identity = [backbone_hash] + [config_json[k] for k in
                                ("seed", "tasks", "num_classes", "model", "dataset")]
  return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def beats_untrained(final: Mapping[str, Mapping[str, Any]],
                    untrained: Mapping[str, Mapping[str, Any]]) -> dict[str, bool]:
  """Per task: is the headline metric strictly better than the untrained model's?"""
  verdict = {}
  for task, metrics in final.items():
    spec = tasks_lib.get_task(task)
    m = float(metrics[spec.headline_metric])
    u = float(untrained.get(task, {}).get(spec.headline_metric, math.nan))
    if math.isnan(m):
      verdict[task] = False
    elif math.isnan(u):
      verdict[task] = True
    else:
      verdict[task] = m > u if spec.higher_is_better else m < u
  return verdict


# An added task's run (config.train.new_tasks) leaves the old tasks' outputs unchanged up to a
# few float32 ulps (the new prompt's exact-zero attention terms can change summation order): a
# headline metric within this relative tolerance (and 1e-6 absolute) counts as unchanged.
UNCHANGED_RTOL = 1e-4


def unchanged_tasks(final: Mapping[str, Mapping[str, Any]],
                    start: Mapping[str, Mapping[str, Any]]) -> dict[str, bool]:
  """Per task of `final`: is its headline metric the starting run's, within UNCHANGED_RTOL?"""
  out = {}
  for task, metrics in final.items():
    key = tasks_lib.get_task(task).headline_metric
    m = float(metrics[key])
    s = float(start.get(task, {}).get(key, math.nan))
    out[task] = (math.isnan(m) and math.isnan(s)) or abs(m - s) <= 1e-6 + UNCHANGED_RTOL * abs(s)
  return out


def format_verdict(final: Mapping[str, Mapping[str, Any]],
                   untrained: Mapping[str, Mapping[str, Any]],
                   verdict: Mapping[str, bool],
                   unchanged: Mapping[str, bool] | None = None) -> str:
  """One line per task (headline metric vs the untrained model's) and the overall YES/NO.

  unchanged: for a run that adds tasks, the old tasks (`unchanged_tasks`): their step-0
  baseline is the starting run, so they are checked to be unchanged, not to beat it."""
  lines = []
  for task, same in (unchanged or {}).items():
    key = tasks_lib.get_task(task).headline_metric
    lines.append(f"  {task:<12} {key} {final[task][key]:.4f} vs the starting run "
                 f"{untrained[task][key]:.4f}: "
                 f"{'unchanged, as intended' if same else 'CHANGED, though it should not'}")
  for task, beats in verdict.items():
    spec = tasks_lib.get_task(task)
    key = spec.headline_metric
    lines.append(f"  {task:<12} {key} {final[task][key]:.4f} vs untrained "
                 f"{untrained[task][key]:.4f} ({'higher' if spec.higher_is_better else 'lower'}"
                 f" is better): {'beats' if beats else 'does NOT beat'} the untrained model")
  if unchanged:
    lines.append(f"the added tasks beat the untrained model: "
                 f"{'YES' if all(verdict.values()) else 'NO'}; the old tasks are unchanged: "
                 f"{'YES' if all(unchanged.values()) else 'NO'}")
  else:
    lines.append(f"all tasks beat the untrained model: {'YES' if all(verdict.values()) else 'NO'}")
  return "\n".join(lines)


def format_report(results: Mapping[str, Mapping[str, Any]], delta: float | None,
                  class_names: Mapping[str, Sequence[str]] | None = None) -> str:
  """The per-task metrics table (per-class IoU named by `class_names`), then Δm (or why there
  is none)."""
  table = metrics_lib.format_table(results, class_names)
  if delta is None:
    return table + "\nΔm: no config.eval.reference for these tasks"
  return table + f"\nΔm vs config.eval.reference: {delta:+.2f}%"


# ----------------------------------------------------------------------------- a saved run


def default_out(workdir: str, step: int, merged: bool) -> str:
  """<workdir>/eval/step_<N>, or .../export_step_<N> for merged export weights."""
  return os.path.join(workdir, "eval", f"{'export_' if merged else ''}step_{step}")


def evaluate_run(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None,
                 merged: tuple[nn.Module, dict, int] | None = None, out: str | None = None,
                 create_eval_loader: Callable | None = None) -> dict[str, Any]:
  """Evaluates a training run's checkpoint (`step`, default the latest), or `merged` export
  weights as (model, variables, step) (evaluate_main.load_weights); writes metrics.json and the
  example PNGs to `out` (default <workdir>/eval/step_<N>); returns the metrics.json content."""
  for task in config.tasks:
    tasks_lib.get_task(task)
  mesh = sharding_lib.make_mesh(config)
  sharding_lib.check_batch_size(int(config.input.eval_batch_size), mesh,
                                "config.input.eval_batch_size")
  if merged is not None:
    model, variables, step = merged
  else:
    step, metadata = checkpointing.find_checkpoint(config, workdir, step)
    model = modeling.build_model(config)
    variables = checkpointing.restore_checkpoint(workdir, step, metadata,
                                                 modeling.init_variables(model, config))
  if create_eval_loader is None:
    from freesine_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    create_eval_loader = pipeline.create_eval_loader
  loader = create_eval_loader(config)
  forward, merge = make_eval_forward(model), make_inference_merge(model)
  results, delta = evaluate(forward, variables, loader, config, mesh, merge)
  out = out or default_out(workdir, step, merged is not None)
  images = []
  if jax.process_index() == 0:
    (epath.Path(out) / "examples").mkdir(parents=True, exist_ok=True)
    grids = draw_examples(forward, variables,
                          qualitative_batches(loader, config.eval.qualitative_examples),
                          config, mesh, f"step {step} · ", merge)
    for i, grid in enumerate(grids):
      images.append(os.path.join("examples", f"{i}.png"))
      visualize.to_png(grid, os.path.join(out, images[-1]))
  report = writers.jsonable({
      "workdir": checkpointing.absolute(workdir),
      "step": step,
      "dataset": config.dataset.name,
      "split": config.dataset.eval_split,
      "max_batches": config.eval.max_batches,
      "results": results,
      "delta_m": delta,
      "reference": None if config.eval.reference is None else dict(config.eval.reference),
      "images": images,
  })
  if jax.process_index() == 0:
    (epath.Path(out) / "metrics.json").write_text(json.dumps(report, indent=2))
  return report
