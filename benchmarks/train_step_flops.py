"""FLOPs (XLA cost analysis of the compiled program) of one train step on the small models.

  python benchmarks/train_step_flops.py [--models=tiny,free_sinewich]

`tiny` is the small conv model of tests/test_train.py (8x8 fake batch of 4); `free_sinewich` is
configs/synthetic.py:tiny (the real model, its tiny size). The counts are those of the program
XLA compiled, independent of the machine, both as traced and as compiled; comparing two checkouts shows what a change to the
step costs (e.g. an extra backward pass).
"""
import argparse
import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import synthetic  # noqa: E402
from freesine_jax import modeling  # noqa: E402
from freesine_jax import optimizer  # noqa: E402
from freesine_jax import tasks as tasks_lib  # noqa: E402
from freesine_jax import train  # noqa: E402


def _config(name: str):
  if name == "tiny":
    import test_train  # pylint: disable=g-import-not-at-top
    return test_train.tiny_config()
  config = synthetic.get_config("tiny")
  config.input.batch_size = 2
  return config


def train_step_flops(name: str) -> tuple[float, float]:
  """(FLOPs of the program as traced, FLOPs of the program XLA compiled: after its
  simplifications, e.g. a computation written twice is done once)."""
  config = _config(name)
  model = modeling.build_model(config)
  variables = modeling.init_variables(model, config)
  schedule = optimizer.make_schedule(1e-3, 1e-4, 1e-5, 2, 20)
  setup = train.build_train_step(config, model, variables, schedule)
  state, backbone, step = setup.state, setup.backbone, setup.train_step
  size = tuple(config.dataset.image_size)
  batch = {"image": jax.ShapeDtypeStruct((config.input.batch_size, *size, 3), jnp.float32)}
  for task in config.tasks:
    layout = tasks_lib.get_task(task).kind.label
    batch[task] = jax.ShapeDtypeStruct((config.input.batch_size,) + layout.shape(*size),
                                       np.dtype(layout.batch_dtype))
  lowered = step.lower(state, batch, backbone)
  first = lambda cost: float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  return first(lowered.cost_analysis()), first(lowered.compile().cost_analysis())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="tiny,free_sinewich")
  args = parser.parse_args()
  for name in args.models.split(","):
    traced, compiled = train_step_flops(name)
    print(f"{name}: train step {traced:.6g} FLOPs as traced, {compiled:.6g} compiled", flush=True)


if __name__ == "__main__":
  main()
