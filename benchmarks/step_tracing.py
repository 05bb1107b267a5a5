"""Building a train step: its modules traced once (train.traced_forward) against as before.

  python -m benchmarks.step_tracing --config=synthetic:tiny --rounds=3
  python -m benchmarks.step_tracing --config=pascal_context:r64 --size=224

Child processes in turn, `once` then `before`, --rounds times. Each builds the step as the
training loop does (train.build_train_step, after modeling.init_variables) and lowers it for a
random batch (tracing its gradient; nothing of the step is compiled), and prints the seconds of
each. `before` builds it the way the code before traced_forward did (commit 5f8279a): the task
leaves read off a trace of `{task: forward(...)[0][task] for task in tasks}`, which traced the
modules once per task, and the step tracing them once more for its gradient. Ratios
once / before of one round are the figures to quote (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import run as bench  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(name: str, size: int | None):
  """configs/<module>.py's get_config(arg) with batch bench.BATCH (and size x size)."""
  import importlib  # pylint: disable=g-import-not-at-top
  module, _, arg = name.partition(":")
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  config.input.batch_size = config.input.eval_batch_size = bench.BATCH
  config.model.backbone_weights = ""  # random: nothing to read or pretrain
  if size:
    config.dataset.image_size = (size, size)
  return config


def child(mode: str, name: str, size: int | None) -> dict:
  from freesine_jax import modeling  # pylint: disable=g-import-not-at-top
  from freesine_jax import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from freesine_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from freesine_jax import train  # pylint: disable=g-import-not-at-top
  config = get_config(name, size)
  if mode == "before":
    from freesine_jax import nonfinite  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    def before(model, config, mesh, state, backbone):
      tasks = tuple(config.tasks)
      forward = train._training_forward(  # pylint: disable=protected-access
          model, mesh, train.dropout_rng(config))
      rows = int(config.input.batch_size) // int(config.train.grad_accum_steps)
      images = jax.ShapeDtypeStruct((rows, *config.dataset.image_size, 3), np.float32)
      abstract = lambda tree: jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
      closed, outputs = jax.make_jaxpr(
          lambda *a: {t: forward(*a)[0][t] for t in tasks}, return_shape=True)(
              abstract(state.params), abstract(state.batch_stats), abstract(backbone), images,
              abstract(state.rng), abstract(state.rng))
      leaves = nonfinite.task_parameter_leaves(
          closed, outputs, len(jax.tree_util.tree_leaves(state.params)))
      return train.TracedForward(forward, leaves)

    train.traced_forward = before
  model = modeling.build_model(config)
  variables = modeling.init_variables(model, config)
  schedule = optimizer_lib.make_schedule(1e-4, 1e-6, 1e-6, 10, 100)
  start = time.perf_counter()
  setup = train.build_train_step(config, model, variables, schedule, donate_state=True)
  build_s = time.perf_counter() - start
  batch = sharding_lib.shard_batch(bench.random_batch(config, True), setup.mesh,
                                   ("image",) + tuple(config.tasks))
  start = time.perf_counter()
  setup.train_step.lower(setup.state, batch, setup.backbone)
  lower_s = time.perf_counter() - start
  return {"mode": mode, "build_s": round(build_s, 3), "lower_s": round(lower_s, 3),
          "load": round(os.getloadavg()[0], 2)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="synthetic:tiny")
  parser.add_argument("--size", type=int, default=0)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--child", choices=("once", "before"))
  args = parser.parse_args(argv)
  if args.child:
    print("RESULT " + json.dumps(child(args.child, args.config, args.size or None)), flush=True)
    return
  env = dict(os.environ)  # init compiles once, into a cache the children share
  env.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="step_tracing_"))
  for round_ in range(args.rounds):
    pair = {}
    for mode in ("once", "before"):
      out = subprocess.run(
          [sys.executable, "-m", "benchmarks.step_tracing", f"--child={mode}",
           f"--config={args.config}", f"--size={args.size}"],
          cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
      pair[mode] = json.loads(out.split("RESULT ", 1)[1])
    row = {"round": round_ + 1, **{f"{m}_{k}": v for m, r in pair.items()
                                   for k, v in r.items() if k != "mode"}}
    row["build_ratio"] = round(pair["once"]["build_s"] / pair["before"]["build_s"], 2)
    row["build_and_lower_ratio"] = round(
        (pair["once"]["build_s"] + pair["once"]["lower_s"])
        / (pair["before"]["build_s"] + pair["before"]["lower_s"]), 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
