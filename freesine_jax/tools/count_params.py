"""Trainable-parameter report: `python -m freesine_jax.tools.count_params --config=<config>`.

Prints a breakdown of the trainable 'params' collection (TA adapters, TS adapters, Clock Net +
tokens, decoders, trainable backbone), the frozen 'backbone' size, and as its last line
`trainable_params=<integer>`. Shapes come from jax.eval_shape: nothing is allocated.

With FAAR's rank selection (config.train.pdrs, the 'faar' arg) that count is the model as built,
every LoRA at its full rank; `--workdir=<run>` (instead of --config) reads the run's checkpoint
(--step, default the latest) and also prints the count with only the ranks kept,
`trainable_params_kept=<integer>`, before the last line.
"""
from __future__ import annotations

import collections

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from freesine_jax import checkpointing
from freesine_jax import cli
from freesine_jax import errors
from freesine_jax import modeling
from freesine_jax import pdrs
from freesine_jax.models import dora

GROUPS = ("TA adapters (shared LoRA)", "TS adapters (task path, prompt path, gates)",
          "Clock Net + task tokens", "decoders", "trainable backbone")

_TS_NAMES = ("sine_awb", "task_lora", "task_filter", "prompt_norm", "prompt_proj",
             "prompt_gate")
_MEMBER_SUFFIX = "_model"  # models.baselines.SeparateModels: one '<task>_model' per task


def group_of(path: tuple[str, ...]) -> str:
  """Which report group a 'params' leaf (flattened path) belongs to."""
  if path[0].endswith(_MEMBER_SUFFIX):
    path = path[1:]
  if path[0] == "head":
    return GROUPS[3]
  if path[0] in ("task_tokens", "omegas", "clock"):
    return GROUPS[2]
  leaf = path[-1]
  if leaf in ("lora_a", "lora_b", dora.SHARED_MAGNITUDE):
    return GROUPS[0]
  if any(p.startswith(_TS_NAMES) for p in path):
    return GROUPS[1]
  return GROUPS[4]


def variable_shapes(config, image_size=None):
  """Abstract variables of the configured model (no memory allocated)."""
  model = modeling.build_model(config)
  size = image_size or tuple(config.dataset.image_size)
  images = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x), images)


def breakdown(variables) -> dict[str, int]:
  counts = collections.OrderedDict((g, 0) for g in GROUPS)
  for path, leaf in traverse_util.flatten_dict(variables["params"]).items():
    counts[group_of(path)] += int(np.prod(leaf.shape))
  return counts


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def report(config, saved: dict | None = None, step: int | None = None) -> str:
  """The breakdown of `config`'s model; with `saved` (a run's saved TrainState, as
  checkpointing.load_saved_run gives it) also the count with the LoRA ranks the run's rank
  selection kept."""
  variables = variable_shapes(config)
  counts = breakdown(variables)
  lines = [f"model: {config.model.name}  backbone: {config.model.variant}  "
           f"rank: {config.model.lora.rank}  tasks: {', '.join(config.tasks)}"]
  for group, n in counts.items():
    lines.append(f"  {group:<48s} {n:>12,d}")
  lines.append(f"  {'frozen backbone (not trained)':<48s} {count(variables.get('backbone', {})):>12,d}")
  lines.append(f"  {'batch statistics (not trained)':<48s} "
               f"{count(variables.get('batch_stats', {})):>12,d}")
  total = sum(counts.values())
  ranks = None if saved is None else pdrs.saved_ranks(saved.get("opt_state"))
  if ranks is not None:
    built, kept = pdrs.trained_count(variables["params"], ranks)
    lines.append(f"  {'LoRA ranks kept by rank selection (step ' + str(step) + ')':<48s} "
                 f"{kept:>12,d} of {built:,}")
    lines.append(f"trainable_params_kept={total - built + kept}")
  lines.append(f"trainable_params={total}")
  return "\n".join(lines)


def define_flags() -> None:
  cli.define_config_flag()
  cli.define_run_flags("count")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.workdir:
    config, saved, step = checkpointing.load_saved_run(f.workdir, f.step)
    print(report(config, saved, step))
  elif f.config is None:
    raise errors.UserError("give --config=<config file> (or --workdir=<training run>)")
  else:
    print(report(f.config))


def run():
  cli.run("freesine_jax.tools.count_params", define_flags, main)


if __name__ == "__main__":
  run()
