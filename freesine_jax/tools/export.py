"""Merged inference weights: `python -m freesine_jax.tools.export --config=<config> --workdir=<run>
--out=<dir> [--step=N] [--tasks=semseg,normals]`, and `load(<dir>)`, which serves them.

Evaluates once what training computes at every step, and writes plain inference weights:
  * every shared LoRA folded into its frozen linear: W' = W + s A B (the shared stream);
  * per task-block layer and task, the Sine-AWB kernel scale * K_t with its sine, low-pass and
    Clock Net frequency evaluated (models/merged.py); the frozen linear folded into the centre
    tap where it reads the same stream as the task path (fc1, fc2), kept apart where it reads
    another (proj, with prompts);
  * the shared decoder's per-task kernels K_t as each task's plain 270 -> 1080 conv (bias b + b_t);
  * no Clock Net, frequencies or LoRA factors.
<dir>/export.json holds the config, tasks and step, <dir>/weights.msgpack the variables. `load`
rebuilds the model and returns one jitted function serving every exported task. `--tasks`
exports a subset (one task: a single-task model), possible only without prompts: every task's
prompt joins every window's attention, so dropping a task's prompt would change the others'
outputs. Exports Free Sinewich and the baselines without a task path (lora, decoder_only,
full_ft); MTLoRA's and TADFormer's task paths are not merged (docs/export.md).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, Sequence

from absl import flags
from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from freesine_jax import checkpointing
from freesine_jax import cli
from freesine_jax import config_checks
from freesine_jax import errors
from freesine_jax import evaluate
from freesine_jax import modeling
from freesine_jax import models
from freesine_jax import sharding
from freesine_jax.models import adapters
from freesine_jax.models import merged as merged_lib
from freesine_jax.models.multitask import MultiTaskModel

PyTree = Any
CONFIG_FILE, WEIGHTS_FILE = "export.json", "weights.msgpack"


def exported_kernel_size(spec: adapters.SineAwbSpec) -> int:
  """Taps per side of the exported task kernels ('taps_full' grows them by the low-pass)."""
  grow = spec.sine.lowpass_size - 1 if spec.sine.lowpass == "taps_full" else 0
  return spec.kernel_size + grow


def merged_model(model: MultiTaskModel, tasks: Sequence[str]) -> MultiTaskModel:
  """The inference model of `model` for `tasks`: no LoRA, merged task paths, plain heads."""
  if not isinstance(model, MultiTaskModel):
    raise errors.UserError("export handles the multi-task model only (not separate_models or a "
                           "config.model.factory model)")
  spec = model.adapter.task_path
  if spec != adapters.NO_TASK_PATH and not isinstance(spec, adapters.SineAwbSpec):
    raise errors.UserError(f"export merges Sine-AWB task paths only, not {type(spec).__name__} "
                           "(model.task_path must be sine_awb or none)")
  if model.decoder.kind == "tspd":
    raise errors.UserError("export does not fold FAAR's TS-PD heads (model.decoder.kind=tspd)")
  path = (adapters.NO_TASK_PATH if spec == adapters.NO_TASK_PATH
          else merged_lib.MergedTaskPathSpec(exported_kernel_size(spec)))
  adapter = dataclasses.replace(model.adapter, lora=None, task_path=path, num_tasks=len(tasks))
  return model.clone(tasks=tuple(tasks), num_outputs={t: model.num_outputs[t] for t in tasks},
                     adapter=adapter, decoder=dataclasses.replace(model.decoder,
                                                                  kind="independent"),
                     has_frequencies=False, use_task_tokens=model.adapter.prompts)


def _lookup(flat_collections: Mapping[str, dict], path: tuple) -> jax.Array:
  """A pretrained weight at `path`, in 'params' (trainable policy) or 'backbone' (frozen)."""
  for name in ("params", "backbone"):
    if path in flat_collections[name]:
      return flat_collections[name][path]
  raise KeyError(path)


def merge_variables(model: MultiTaskModel, variables: Mapping[str, PyTree],
                    tasks: Sequence[str], image_size: Sequence[int]) -> tuple[MultiTaskModel, dict]:
  """(inference model, its variables) equal in outputs to `model` with `variables` on `tasks`.

  The merged weights are models.merge_for_inference's (the in-process cache evaluation uses):
  folding happens there once; here they are only renamed into the plain inference model.
  """
  tasks = tuple(tasks)
  unknown = [t for t in tasks if t not in model.tasks]
  if unknown or not tasks:
    raise errors.UserError(f"--tasks: {', '.join(unknown) or '(none)'} not among the model's "
                           f"tasks {', '.join(model.tasks)}")
  if tasks != tuple(model.tasks) and model.adapter.prompts:
    raise errors.UserError("--tasks: this model has task prompts, which join every window's "
                           "attention, so a subset of tasks would change the others' outputs; "
                           "export all tasks")
  index = np.asarray([model.tasks.index(t) for t in tasks])
  inference = merged_model(model, tasks)
  images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  target = jax.eval_shape(lambda x: inference.init({"params": jax.random.key(0)}, x), images)
  merge = jax.jit(functools.partial(models.merge_for_inference, model),
                  static_argnames="image_shape")
  cache = merge({k: v for k, v in variables.items() if k != adapters.MERGED},
                image_shape=(1, *image_size, 3)).get(adapters.MERGED, {})
  flat = {name: traverse_util.flatten_dict(flax.core.unfreeze(variables.get(name, {})))
          for name in ("params", "backbone", "batch_stats")}
  flat[adapters.MERGED] = traverse_util.flatten_dict(flax.core.unfreeze(cache))
  target_paths = {name: set(traverse_util.flatten_dict(flax.core.unfreeze(target.get(name, {}))))
                  for name in ("params", "backbone", "batch_stats")}
  out = {}
  for name, paths in target_paths.items():
    new = {path: _merged_leaf(model, flat, index, name, path) for path in paths}
    out[name] = traverse_util.unflatten_dict(new) if new else {}
  for name, tree in out.items():
    want = jax.tree_util.tree_map(lambda s: (tuple(s.shape), str(s.dtype)), target.get(name, {}))
    have = jax.tree_util.tree_map(lambda a: (tuple(np.shape(a)), str(jnp.asarray(a).dtype)), tree)
    if want != have:
      raise ValueError(f"merged '{name}' do not fit the inference model")
  return inference, out


def _merged_leaf(model, flat, index, collection, path):
  """The value of one leaf of the inference model's variables: a merged weight of
  merge_for_inference (flat[adapters.MERGED]) or a trained/frozen one as it is."""
  cache = flat[adapters.MERGED]
  if collection == "params" and "merged" in path:  # a task-block layer's task path
    layer = path[:path.index("merged")]
    if path[-1] == "bias":
      return _lookup(flat, layer + ("bias",))
    if path[-1] == "frozen_kernel":  # the frozen linear reads another input than the path
      return _lookup(flat, layer + ("kernel",))
    # scale * K~_t, with the frozen linear in the centre tap where it reads the path's input
    return cache[layer + ("sine_awb", "task_kernels")][index]
  if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat["params"]:
    return cache[path]  # W + s A B (the shared stream)
  if collection == "params" and ("head", "task_kernels") in cache and path[0] == "head" \
      and path[2] == "conv_in":  # the shared decoder: each task's K~_t, bias b + b_t
    task = path[1][:-len("_head")]
    if path[-1] == "bias":
      return flat["params"][("head", "base_bias")] + flat["params"][("head", f"{task}_bias")]
    return cache[("head", "task_kernels")][model.tasks.index(task)]
  if path not in flat[collection]:
    raise ValueError(f"no value for the inference model's {collection}/{'/'.join(path)}")
  if collection == "params" and path == ("task_tokens",):
    return flat[collection][path][index]
  return flat[collection][path]


def export_run(config: ml_collections.ConfigDict, workdir: str, out: str, *,
               step: int | None = None, tasks: Sequence[str] | None = None) -> str:
  """Merges a training run's checkpoint and writes it to `out`; returns `out`."""
  step, metadata = checkpointing.find_checkpoint(config, workdir, step)
  model = modeling.build_model(config)
  variables = checkpointing.restore_checkpoint(workdir, step, metadata,
                                               modeling.init_variables(model, config))
  # Placed on the mesh as evaluation places them: the merge is then the program evaluation
  # compiled (the same program on unplaced arrays would be lowered and compiled anew).
  variables = evaluate.model_variables(variables, sharding.make_mesh(config))
  tasks = tuple(tasks or config.tasks)
  _, merged = merge_variables(model, variables, tasks, tuple(config.dataset.image_size))
  directory = epath.Path(out)  # a local path or a gs:// URL
  directory.mkdir(parents=True, exist_ok=True)
  (directory / WEIGHTS_FILE).write_bytes(
      flax.serialization.msgpack_serialize(jax.device_get(merged)))
  (directory / CONFIG_FILE).write_text(json.dumps(
      {"config": json.loads(config.to_json_best_effort()), "tasks": list(tasks),
       "step": step, "workdir": checkpointing.absolute(workdir)}, indent=2))
  return out


@dataclasses.dataclass
class Exported:
  """Loaded merged weights: `serve(images)` -> {task: (B, H, W, C)} for every exported task."""
  config: ml_collections.ConfigDict  # the training config (its tasks: the trained ones)
  tasks: tuple[str, ...]
  step: int
  model: MultiTaskModel
  variables: dict
  forward: Callable  # jitted (variables, images) -> outputs

  def serve(self, images: jax.Array) -> dict[str, jax.Array]:
    return self.forward(self.variables, images)


def load(directory: str) -> Exported:
  """Reads what `export_run` wrote; one jitted function serves all exported tasks."""
  config_path = epath.Path(directory) / CONFIG_FILE  # a local path or a gs:// URL
  if not config_path.exists():
    raise errors.UserError(f"{config_path}: not found; pass a directory written by "
                           "python -m freesine_jax.tools.export --out=...")
  saved = json.loads(config_path.read_text(encoding="utf-8"))
  # An export written before train.new_tasks existed added no tasks.
  saved["config"].setdefault("train", {}).setdefault("new_tasks", "")
  config = ml_collections.ConfigDict(config_checks.upgrade(saved["config"]))
  tasks = tuple(saved["tasks"])
  inference = merged_model(models.builtin_model(config), tasks)
  restored = flax.serialization.msgpack_restore(
      (epath.Path(directory) / WEIGHTS_FILE).read_bytes())
  variables = {name: restored.get(name, {}) for name in ("params", "backbone", "batch_stats")}
  forward = jax.jit(lambda v, images: inference.apply(v, images, train=False))
  return Exported(config, tasks, int(saved["step"]), inference, variables, forward)


# ----------------------------------------------------------------------------- command line


def define_flags() -> None:
  cli.define_config_flag()
  cli.define_run_flags("export")
  flags.DEFINE_string("out", None, "Directory to write export.json and weights.msgpack to.")
  flags.DEFINE_list("tasks", None, "Tasks to export (default: all; a subset needs a model "
                    "without prompts).")
  flags.mark_flags_as_required(["config", "workdir", "out"])


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  out = export_run(f.config, f.workdir, f.out, step=f.step, tasks=f.tasks)
  print(f"wrote {os.path.join(out, WEIGHTS_FILE)} and {os.path.join(out, CONFIG_FILE)}")


def run() -> None:
  cli.run("freesine_jax.tools.export", define_flags, main)


if __name__ == "__main__":
  run()
