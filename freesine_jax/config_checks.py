"""The allowed range of every numeric config key, checked once before anything is built; and
the config's versions: saved configs of older layouts upgraded, renamed keys refused.

A value out of range (`--config.input.batch_size=-8`) is a one-line `errors.UserError` naming the
key, raised by `check_values`, which every command line runs on its parsed --config
(freesine_jax/cli.py) and train.train_and_evaluate runs for library callers. Keys are those of
configs/base.py; a key a config does not have (configs/pretrain_proxy.py's own schema) is
skipped. Choices
among names (model.task_path, ...) are checked where they are read, with the list of names.

A config is versioned data: configs/base.py's `version` is the layout of its keys. A config a run
saved (checkpoint metadata, export.json) under an older version is brought to this layout by
`upgrade` when it is read; a key renamed since (`RENAMED`) given on the command line is refused
by cli.check_key in one line naming the new key.
"""
from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

from freesine_jax import errors

INF = math.inf

CONFIG_VERSION = 2  # configs/base.py's config.version
# Old key -> (new key, the version that renamed it).
RENAMED: dict[str, tuple[str, int]] = {
    "model.sine_awb.modules": ("model.task_path_modules", 2),
}


def renamed(key: str) -> str | None:
  """What a key renamed since is now called, in one line, or None for any other key."""
  if key not in RENAMED:
    return None
  new, version = RENAMED[key]
  return (f"config.{key} is now config.{new} (config version {version}, docs/configuration.md "
          f"\"Config versions\")")


def upgrade(saved: dict) -> dict:
  """A config dict saved by a run (any version) in this version's layout: each key renamed
  since moved to its new name; version set. Saved configs without a version are version 1."""
  out = json.loads(json.dumps(saved))  # a deep copy of plain JSON values
  version = int(out.get("version", 1))
  if version > CONFIG_VERSION:
    raise errors.UserError(f"a saved config of version {version} is newer than this code's "
                           f"({CONFIG_VERSION}); update freesine_jax")
  for old, (new, since) in RENAMED.items():
    if version >= since:
      continue
    *old_parents, old_name = old.split(".")
    node = out
    for part in old_parents:
      node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or old_name not in node:
      continue
    value = node.pop(old_name)
    *new_parents, new_name = new.split(".")
    target = out
    for part in new_parents:
      target = target.setdefault(part, {})
    target[new_name] = value
  out["version"] = CONFIG_VERSION
  return out

# key: (low, high, what); low <= value <= high; None allowed where the key's default is None.
RANGES: dict[str, tuple[float, float, str]] = {
    "input.batch_size": (1, INF, "a positive global batch size"),
    "input.eval_batch_size": (1, INF, "a positive global batch size"),
    "input.num_workers": (0, INF, "0 (load in the main process) or more worker processes"),
    "input.seed": (-INF, INF, "an integer or None"),
    "mesh.num_devices": (1, INF, "a positive device count or None"),
    "mesh.min_shard_size": (0, INF, "a non-negative element count"),
    "model.embed_dim": (1, INF, "a positive channel count"),
    "model.window_size": (1, INF, "a positive window size"),
    "model.patch_size": (1, INF, "a positive patch size"),
    "model.drop_path_rate": (0, 1, "a rate in [0, 1]"),
    "model.lora.rank": (0, INF, "0 (no LoRA) or a positive rank"),
    "model.lora.dropout": (0, 1, "a dropout rate in [0, 1)"),
    "model.task_lora.rank": (1, INF, "a positive rank"),
    "model.dynamic_filter.kernel_size": (1, INF, "a positive kernel size"),
    "model.sine_awb.kernel_size": (1, INF, "a positive kernel size"),
    "model.sine_awb.omega_0": (0, INF, "a positive base frequency"),
    "model.sine_awb.lowpass_size": (1, INF, "a positive filter size"),
    "model.sine_awb.lowpass_sigma": (0, INF, "a positive sigma"),
    "model.decoder.head_channels": (1, INF, "a positive channel count"),
    "model.decoder.omega_0": (0, INF, "a positive base frequency"),
    "model.decoder.lowpass_size": (1, INF, "a positive filter size"),
    "model.decoder.lowpass_sigma": (0, INF, "a positive sigma"),
    "optim.lr_base": (0, INF, "a non-negative learning rate"),
    "optim.warmup_lr_base": (0, INF, "a non-negative learning rate"),
    "optim.min_lr_base": (0, INF, "a non-negative learning rate"),
    "optim.lr_reference_batch": (1, INF, "a positive batch size"),
    "optim.b1": (0, 1, "a decay rate in [0, 1)"),
    "optim.b2": (0, 1, "a decay rate in [0, 1)"),
    "optim.eps": (0, INF, "a positive epsilon"),
    "optim.weight_decay": (0, INF, "a non-negative weight decay"),
    "train.num_epochs": (1, INF, "a positive number of epochs"),
    "train.warmup_epochs": (0, INF, "a non-negative number of epochs"),
    "train.max_steps": (0, INF, "a non-negative step count or None"),
    "train.num_train_examples": (1, INF, "a positive example count or None"),
    "train.log_every_steps": (1, INF, "a positive step count"),
    "train.image_every_steps": (0, INF, "0 (never) or a positive step count"),
    "train.grad_accum_steps": (1, INF, "a positive micro-batch count"),
    "train.checkpoint_every_steps": (1, INF, "a positive step count"),
    "train.max_checkpoints_to_keep": (1, INF, "a positive checkpoint count"),
    "train.eval_every_steps": (0, INF, "0 (only at the end) or a positive step count"),
    "eval.max_batches": (0, INF, "a non-negative batch count or None"),
    "eval.qualitative_examples": (0, INF, "a non-negative example count"),
}
# Keys whose value must be strictly above `low` (a zero learning rate is allowed, a zero
# epsilon is not).
EXCLUSIVE_LOW = {"model.sine_awb.omega_0", "model.sine_awb.lowpass_sigma", "model.decoder.omega_0",
                 "model.decoder.lowpass_sigma", "optim.eps"}
EXCLUSIVE_HIGH = {"model.lora.dropout", "optim.b1", "optim.b2"}
# Sequences of positive integers.
POSITIVE_TUPLES = ("dataset.image_size", "model.depths", "model.num_heads",
                   "model.decoder.proj_channels")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{'a.b.c': value} of a nested dict (ConfigDict.to_dict())."""
  out = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{name}."))
    else:
      out[f"{prefix}{name}"] = value
  return out


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_version(config: ml_collections.ConfigDict) -> None:
  """UserError for a training config of another version than this code's (a saved one is
  upgraded when read; a config file written for older code is refused, not half-read)."""
  if config.version != CONFIG_VERSION:
    raise errors.UserError(f"config.version={config.version!r}: this code reads config "
                           f"version {CONFIG_VERSION} (docs/configuration.md, \"Config versions\"); "
                           "rename the keys listed there")


def check_values(config: ml_collections.ConfigDict) -> None:
  """UserError naming the first key whose value is out of its range (RANGES)."""
  values = _flat(config.to_dict())
  for key, (low, high, what) in RANGES.items():
    if key not in values or values[key] is None:  # another schema (configs/pretrain_proxy.py)
      continue
    value = values[key]
    if not _is_number(value) or not math.isfinite(value):
      raise errors.UserError(f"config.{key}={value!r}: expected {what}")
    below = value <= low if key in EXCLUSIVE_LOW else value < low
    above = value >= high if key in EXCLUSIVE_HIGH else value > high
    if below or above:
      raise errors.UserError(f"config.{key}={value!r}: expected {what}")
  for key in POSITIVE_TUPLES:
    if key not in values:
      continue
    value = values[key]
    if not isinstance(value, (tuple, list)) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
      raise errors.UserError(f"config.{key}={value!r}: expected a tuple of positive integers")
