"""Command line entry point for training.

  python -m freesine_jax.main --config=configs/<file>.py[:<arg>] --workdir=<dir> \
      [--config.train.max_steps=100 ...]

Trains and evaluates (freesine_jax.train.train_and_evaluate); rerunning with the same
--workdir resumes from its latest checkpoint. On SIGTERM it finishes the current step, saves a
checkpoint and exits 0 (preemption; rerun to resume). Several processes form one job with
--coordinator_address/--num_processes/--process_id, --multihost, or by themselves under a
SLURM step of several tasks (freesine_jax/distributed.py, docs/launch.md). A mistake on the
command line (a config key the config does not declare, a misspelled config arg or task, a
dataset that is not prepared, ...) ends with one line on stderr and exit code 2
(freesine_jax/cli.py).
"""
from __future__ import annotations

import os

from absl import flags
import jax

from freesine_jax import cli
from freesine_jax import distributed
from freesine_jax import train

PROG = "freesine_jax.main"


def define_flags() -> None:
  cli.define_config_flag()
  flags.DEFINE_string("workdir", None,
                      "Directory for checkpoints, metrics.jsonl, tb/ and results.json (a "
                      "gs:// URL works for multi-host runs: docs/launch.md).")
  flags.DEFINE_string(
      "compilation_cache_dir", "~/.cache/freesine_jax/xla",
      "Persistent XLA compilation cache ('' disables; $JAX_COMPILATION_CACHE_DIR wins). Reruns "
      "and resumed runs then skip recompiling the train step.")
  flags.DEFINE_bool("multihost", False,
                    "Join a multi-host job that JAX finds in the environment (Cloud TPU VM, "
                    "SLURM, Open MPI): jax.distributed.initialize().")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, to join a job of --num_processes processes as "
                      "--process_id (launch/local_multiprocess.sh).")
  flags.DEFINE_integer("num_processes", None, "Number of processes of the job.")
  flags.DEFINE_integer("process_id", None, "This process's index in the job, 0-based.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  f = flags.FLAGS
  distributed.initialize(distributed.initialize_args(
      coordinator_address=f.coordinator_address, num_processes=f.num_processes,
      process_id=f.process_id, multihost=f.multihost, environ=os.environ))
  if f.compilation_cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(f.compilation_cache_dir))
  with distributed.preemption_watch() as stop_requested:
    train.train_and_evaluate(f.config, f.workdir, stop_requested=stop_requested)


def run():
  """Console-script entry point (`freesine-train`)."""
  cli.run(PROG, define_flags, main, workdir_flag="workdir")


if __name__ == "__main__":
  run()
