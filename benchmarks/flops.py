"""Forward FLOPs (XLA cost analysis) of the Sine-AWB readings next to the frozen backbone.

  python benchmarks/flops.py [--size=448] [--rank=64]

Counts the FLOPs of one 448x448 image through the PASCAL-Context model (4 tasks, Swin-T) for:
the frozen Swin-T alone, the full model with the full r x r x 3 x 3 W (default), the depthwise W,
and the k = 1 reading. The counts come from XLA's cost analysis of the lowered program (no run),
so they are exact for the program as written and independent of the machine.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import pascal_context  # noqa: E402
from freesine_jax import models  # noqa: E402


def forward_flops(config, size: int) -> float:
  model = models.builtin_model(config)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x), images)
  lowered = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def backbone_flops(config, size: int) -> float:
  """The frozen Swin alone (no adapters, no prompts, no decoders)."""
  plain = pascal_context.get_config(f"r{config.model.lora.rank}")
  plain.model.lora.rank = 0
  plain.model.task_path = "none"
  plain.model.prompts = False
  plain.model.clock_net = False
  model = models.builtin_model(plain)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x), images)
  lowered = jax.jit(lambda v, x: model.apply(v, x, method=model.backbone_stages)).lower(
      variables, images)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=448)
  parser.add_argument("--rank", type=int, default=64)
  args = parser.parse_args()
  base = pascal_context.get_config(f"r{args.rank}")
  rows = [("frozen Swin-T backbone only", backbone_flops(base, args.size))]
  readings = (("full W (r x r x 3 x 3), default", {}),
              ("depthwise W (r x 3 x 3)", {"w_mode": "depthwise"}),
              ("k = 1 (W is r x r)", {"kernel_size": 1}))
  for name, overrides in readings:
    config = pascal_context.get_config(f"r{args.rank}")
    for k, v in overrides.items():
      config.model.sine_awb[k] = v
    rows.append((f"Free Sinewich, {name}", forward_flops(config, args.size)))
  ref = rows[0][1]
  print(f"forward FLOPs at {args.size}x{args.size}, batch 1, r={args.rank}, 4 PASCAL tasks")
  for name, flops in rows:
    print(f"  {name:<52s} {flops / 1e9:10.1f} GFLOPs  ({flops / ref:5.1f}x backbone)")


if __name__ == "__main__":
  main()
