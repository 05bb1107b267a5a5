"""One layer's task path, forward + backward, with model.compute.task_loop 'stacked' vs 'scan'.

  python benchmarks/task_loop.py [--reps=3]

Swin-T layers at 448 x 448, batch 2, 4 tasks, rank 64, 3x3 kernels, the frozen linear included,
the default lowering otherwise (adapters.TaskPathCompute). Both loops are measured side by side in one
process, per layer; printed: median step time, compile time, XLA's temporaries, and the ratio
scan / stacked. Tells whether the scan's cost is in a layer's own arithmetic (the whole train
step's lean_memory / block_recompute figures are in docs/benchmarks.md).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import run as bench  # noqa: E402
from freesine_jax.models import adapters  # noqa: E402

# (name, C_in, C_out, token grid side) at 448 x 448 (stage grids 112, 56, 28, 14).
LAYERS = (("stage 1 fc1", 96, 384, 112), ("stage 3 qkv", 384, 1152, 28),
          ("stage 4 fc1", 768, 3072, 14))
TASKS, BATCH, RANK, KERNEL = 4, 2, 64, 3


def measure(c_in: int, c_out: int, side: int, task_loop: str, reps: int):
  """(median seconds, compile seconds, XLA temporaries GiB) of one forward + backward."""
  spec, lowering = adapters.SineAwbSpec(), adapters.TaskPathCompute(task_loop=task_loop)
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (TASKS, BATCH, side, side, c_in))
  a = jax.random.normal(keys[1], (c_in, RANK)) / np.sqrt(c_in)
  w = jax.random.normal(keys[2], (KERNEL, KERNEL, RANK, RANK)) / RANK
  b = jax.random.normal(keys[3], (RANK, c_out)) / np.sqrt(RANK)
  omegas = jnp.linspace(0.5, 1.5, TASKS)
  frozen = (jax.random.normal(keys[4], (c_in, c_out)) / np.sqrt(c_in), jnp.zeros((c_out,)))

  def loss(x, a, w, b, omegas):
    y = adapters.sine_awb_outputs(x, (a, w, b), omegas, spec, lowering, frozen)
    return jnp.sum(y * y)

  args = (x, a, w, b, omegas)
  compiled, timings = bench.lower_and_compile(
      lambda: jax.jit(jax.grad(loss, argnums=range(5))).lower(*args))
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), timings["compile_s"], bench.compiled_stats(compiled)["temp_gib"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=3)
  reps = parser.parse_args().reps
  print(f"task path forward + backward, {TASKS} tasks, batch {BATCH}, rank {RANK}, "
        f"{KERNEL}x{KERNEL}, median of {reps} after a warm-up; load {os.getloadavg()[0]:.2f}")
  for name, c_in, c_out, side in LAYERS:
    got = {loop: measure(c_in, c_out, side, loop, reps) for loop in ("stacked", "scan")}
    text = "  ".join(f"{loop} {t:.2f} s (compile {c:.1f} s, temp {m:.2f} GiB)"
                     for loop, (t, c, m) in got.items())
    print(f"{name:12s} {text}  scan/stacked {got['scan'][0] / got['stacked'][0]:.2f}",
          flush=True)


if __name__ == "__main__":
  main()
