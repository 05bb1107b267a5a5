"""Command line entry point.

  python -m freesine_jax.main --config=configs/<file>.py[:<args>] --workdir=<dir> \
      [--config.train.max_steps=100 ...]

Trains and evaluates (freesine_jax.train.train_and_evaluate); rerunning with the same
--workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from freesine_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/*.py[:args]).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl, tb/ and results.json.")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", "~/.cache/freesine_jax/xla",
    "Persistent XLA compilation cache ('' disables; $JAX_COMPILATION_CACHE_DIR wins). Reruns "
    "and resumed runs then skip recompiling the train step.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (multi-host runs).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _MULTIHOST.value:
    jax.distributed.initialize()
  logging.set_verbosity(logging.WARNING)
  if _CACHE.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run():
  """Console-script entry point."""
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
