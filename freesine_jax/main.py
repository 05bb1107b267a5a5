"""Command line entry point for training.

  python -m freesine_jax.main --config=configs/<file>.py[:<arg>] --workdir=<dir> \
      [--config.train.max_steps=100 ...]

Trains and evaluates (freesine_jax.train.train_and_evaluate); rerunning with the same
--workdir resumes from its latest checkpoint. A mistake on the command line (a config key the
config does not declare, a misspelled config arg or task, a dataset that is not prepared, ...)
ends with one line on stderr and exit code 2 (freesine_jax/cli.py).
"""
from __future__ import annotations

import os

from absl import flags
from absl import logging
import jax

from freesine_jax import cli
from freesine_jax import train

PROG = "freesine_jax.main"


def define_flags() -> None:
  cli.define_config_flag()
  flags.DEFINE_string("workdir", None,
                      "Directory for checkpoints, metrics.jsonl, tb/ and results.json.")
  flags.DEFINE_string(
      "compilation_cache_dir", "~/.cache/freesine_jax/xla",
      "Persistent XLA compilation cache ('' disables; $JAX_COMPILATION_CACHE_DIR wins). Reruns "
      "and resumed runs then skip recompiling the train step.")
  flags.DEFINE_bool("multihost", False,
                    "Call jax.distributed.initialize() first (multi-host runs).")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  f = flags.FLAGS
  if f.multihost:
    jax.distributed.initialize()
  logging.set_verbosity(logging.WARNING)
  if f.compilation_cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(f.compilation_cache_dir))
  train.train_and_evaluate(f.config, f.workdir)


def run():
  """Console-script entry point (`freesine-train`)."""
  cli.run(PROG, define_flags, main)


if __name__ == "__main__":
  run()
