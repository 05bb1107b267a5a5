"""Evaluation's command line, beside evaluate.py as main.py sits beside train.py:

  python -m freesine_jax.evaluate_main --config=configs/<file>.py[:<arg>] --workdir=<run> \
      [--step=N] [--out=<dir>] [--weights=<export dir>]

evaluates a training run's checkpoint (the latest, or --step) on config.dataset.eval_split and
writes to --out (default <run>/eval/step_<N>):

  metrics.json          per-task metrics, delta_m against config.eval.reference, what was evaluated
  examples/<i>.png      image, ground truth and prediction per task for the first
                        config.eval.qualitative_examples examples of the split (visualize.py)

and prints the per-task table. The config must describe the run's model (tasks, classes,
config.model); evaluation keys (eval split, batch size, eval.max_batches, ...) may differ.
--weights=<dir> evaluates merged export weights (python -m freesine_jax.tools.export) instead of
the checkpoint (default --out <run>/eval/export_step_<N>).
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags
import jax
import ml_collections

from freesine_jax import cli
from freesine_jax import errors
from freesine_jax import evaluate
from freesine_jax.data import registry
from freesine_jax.tools import export

PROG = "freesine_jax.evaluate_main"


def load_weights(weights: str, config: ml_collections.ConfigDict):
  """Merged export weights (tools/export) for `config`'s tasks: (model, variables, step), as
  evaluate.evaluate_run takes them."""
  exported = export.load(weights)
  if tuple(exported.tasks) != tuple(config.tasks):
    raise errors.UserError(
        f"--weights={weights} serves the tasks {', '.join(exported.tasks)}, the config "
        f"{', '.join(config.tasks)}; pass --config.tasks=\"{tuple(exported.tasks)}\"")
  return exported.model, exported.variables, exported.step


def define_flags() -> None:
  cli.define_config_flag()
  cli.define_run_flags("evaluate")
  flags.DEFINE_string("out", None, "Output directory (default: <workdir>/eval/step_<N>).")
  flags.DEFINE_string("weights", None, "Merged export weights (tools.export --out) to evaluate "
                      "instead of the checkpoint.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  merged = load_weights(f.weights, f.config) if f.weights else None
  report = evaluate.evaluate_run(f.config, f.workdir, step=f.step, merged=merged, out=f.out)
  if jax.process_index() == 0:
    out = f.out or evaluate.default_out(f.workdir, report["step"], merged is not None)
    print(f"step {report['step']} of {f.workdir} on {report['dataset']}/{report['split']}:")
    print(evaluate.format_report(report["results"], report["delta_m"],
                                 registry.class_names(f.config.dataset.name)))
    print(f"wrote {os.path.join(out, 'metrics.json')} and {len(report['images'])} example "
          f"picture(s) in {os.path.join(out, 'examples')}")


def run() -> None:
  """Console-script entry point (`freesine-evaluate`)."""
  cli.run(PROG, define_flags, main)


if __name__ == "__main__":
  run()
