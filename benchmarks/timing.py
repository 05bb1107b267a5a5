"""The two measurements every benchmark shares: wall seconds of a call, and the GEMM roof.

Kept apart from benchmarks/run.py so that op_profile.py, device_check.py and torch_lora_step.py
use them without importing the runner (which imports them).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

GEMM_N = 2048  # the roof's square matrix size


def timed(fn: Callable[[], Any], reps: int) -> list[float]:
  """Wall seconds of `reps` calls of fn (each waited for), after one warm-up call."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def measure_gemm(reps: int) -> dict[str, float]:
  """This machine's dense float32 GEMM roof: the median seconds of a jitted GEMM_N^3 jnp.dot
  and its FLOP/s."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (GEMM_N, GEMM_N), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (GEMM_N, GEMM_N), jnp.float32)
  matmul = jax.jit(jnp.dot)
  times = timed(lambda: matmul(a, b), max(reps, 5) * 4)
  seconds = statistics.median(times)
  return {"seconds": seconds, "flops_per_s": 2.0 * GEMM_N ** 3 / seconds}
