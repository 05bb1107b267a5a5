"""Adding a task to a trained model (config.train.new_tasks, config.train.init_from).

The new run's model is the trained run's with the new tasks appended (tasks.new_tasks): the
same variables plus each new task's own ones, which are either new leaves (its decoder
projections, head and BatchNorm statistics, its head bias) or new rows of a per-task stack (its
prompt token, its free frequency under "w/o LCN", its Sine-AWB factors with independent bases).
`start_from_trained` fills the new model's variables from the trained run's checkpoint and
returns which of them train: exactly the ones the old model does not have. The train step zeroes
the other gradients and keeps the other values and statistics (`keep_frozen`), so every old
weight stays bitwise as trained; the attention mask of the new prompts (swin.prompt_visibility)
and the Clock Net's per-generation offsets keep the old tasks' outputs as they were
(docs/method.md, "Adding a task").
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from freesine_jax import checkpointing
from freesine_jax import errors
from freesine_jax import modeling
from freesine_jax import models
from freesine_jax import tasks as tasks_lib

PyTree = Any
TRAINED = ("params", "batch_stats")  # the collections a new task adds to


def trained_run_config(config: ml_collections.ConfigDict,
                       added: tuple[str, ...]) -> ml_collections.ConfigDict:
  """The config of the run config.train.init_from names: config without the new tasks `added`
  (tasks.new_tasks(config))."""
  old = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
  old.tasks = tuple(t for t in config.tasks if t not in added)
  old.train.new_tasks = ""
  old.train.init_from = ""
  return old


def _check_trained_run(config, added: tuple[str, ...], metadata: Mapping[str, Any],
                       init_from: str) -> None:
  """One-line UserErrors: a new task the run already has, or a run that added tasks itself."""
  saved = json.loads(metadata.get("config") or "{}")
  saved_tasks = tuple(saved.get("tasks") or ())
  again = [t for t in added if t in saved_tasks]
  if again:
    raise errors.UserError(
        f"config.train.new_tasks: {', '.join(again)} is already a task of the run in "
        f"config.train.init_from={init_from} (its tasks: {', '.join(saved_tasks)})")
  if (saved.get("train") or {}).get("new_tasks"):
    raise errors.UserError(
        f"config.train.init_from={init_from} added tasks itself (train.new_tasks="
        f"{saved['train']['new_tasks']!r}); adding tasks in several generations is not supported: "
        "start from the run it was added to, with all the new tasks at once")
  want = saved_tasks + added
  if saved_tasks and tuple(config.tasks) != want:
    raise errors.UserError(
        f"config.tasks={tuple(config.tasks)!r} must be the tasks of the run in "
        f"config.train.init_from={init_from} followed by config.train.new_tasks: "
        f"--config.tasks=\"{want!r}\"")


def start_from_trained(config: ml_collections.ConfigDict, model, variables: Mapping[str, PyTree]
                       ) -> tuple[dict[str, PyTree], dict[str, PyTree]]:
  """(variables, trainable) for training config.train.new_tasks.

  variables: `variables` (the new model's fresh init) with every leaf the trained run has
  replaced by its value at that run's latest checkpoint (stacked per-task leaves: its rows, the
  new tasks' rows kept from the init). trainable: for 'params' and 'batch_stats', a tree of
  boolean numpy arrays broadcastable to each leaf, True where the new tasks' own values are.
  """
  added = tasks_lib.new_tasks(config)
  init_from = str(config.train.init_from)
  if not init_from:
    raise errors.UserError(f"config.train.new_tasks={config.train.new_tasks!r} needs "
                           "config.train.init_from=<workdir of the trained run to add them to>")
  if config.model.factory or not isinstance(model, models.MultiTaskModel):
    raise errors.UserError("config.train.new_tasks adds tasks to the multi-task model only (not "
                           "a config.model.factory model or model.separate_models)")
  old_config = trained_run_config(config, added)
  step, metadata = checkpointing.find_checkpoint(None, init_from, None,
                                                 flag="config.train.init_from")
  _check_trained_run(config, added, metadata, init_from)
  checkpointing.check_compatible(metadata, old_config, init_from, step, "add tasks to it")
  old_model = modeling.build_model(old_config)
  old = checkpointing.restore_checkpoint(init_from, step, metadata,
                                         modeling.init_variables(old_model, old_config))
  if checkpointing.tree_hash(old["backbone"]) != checkpointing.tree_hash(variables["backbone"]):
    raise errors.UserError("the new model's frozen backbone differs from the trained run's "
                           "(config.model.backbone_weights, config.seed); use the run's")
  n_old, n_all = len(old_config.tasks), len(config.tasks)
  out, trainable = dict(variables), {}
  for name in TRAINED:
    new_flat = traverse_util.flatten_dict(flax.core.unfreeze(variables.get(name) or {}))
    old_flat = traverse_util.flatten_dict(flax.core.unfreeze(old.get(name) or {}))
    missing = sorted(set(old_flat) - set(new_flat))
    if missing:
      raise ValueError(f"the model with {', '.join(added)} has no {name}/{'/'.join(missing[0])}")
    values, masks = {}, {}
    for path, fresh in new_flat.items():
      label = f"{name}/{'/'.join(path)}"
      if path not in old_flat:  # a new task's own leaf
        if not any(task in part for part in path for task in added):
          raise ValueError(f"{label} is new but belongs to no new task")
        values[path], masks[path] = fresh, np.ones((), bool)
        continue
      saved = jnp.asarray(old_flat[path])
      if saved.shape == fresh.shape:
        values[path], masks[path] = saved.astype(fresh.dtype), np.zeros((), bool)
      elif (saved.ndim and fresh.shape[1:] == saved.shape[1:] and saved.shape[0] == n_old
            and fresh.shape[0] == n_all):  # stacked per task: the new tasks' rows are new
        values[path] = jnp.concatenate([saved.astype(fresh.dtype), fresh[n_old:]])
        masks[path] = (np.arange(n_all) >= n_old).reshape((n_all,) + (1,) * (saved.ndim - 1))
      else:
        raise ValueError(f"{label} is {saved.shape} in the trained run and {fresh.shape} with "
                         "the new tasks: it is not per task, so the tasks cannot be added")
    out[name] = traverse_util.unflatten_dict(values) if values else {}
    trainable[name] = traverse_util.unflatten_dict(masks) if masks else {}
  return out, trainable


def keep_frozen(trainable: PyTree, new: PyTree, old: PyTree) -> PyTree:
  """`new` where `trainable`, else `old` (bitwise: no arithmetic on the frozen values)."""
  return jax.tree_util.tree_map(lambda m, a, b: jnp.where(m, a, b), trainable, new, old)


def frozen_gradients(trainable: PyTree, grads: PyTree) -> PyTree:
  """Gradients with the frozen entries zeroed, so that gradient clipping and the optimizer's
  moments see the new tasks' parameters only."""
  return jax.tree_util.tree_map(lambda m, g: jnp.where(m, g, jnp.zeros_like(g)), trainable,
                                grads)
