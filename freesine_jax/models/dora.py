"""The DoRA form of a LoRA update, as FAAR's code applies it (model.lora.form = 'dora').

A frozen kernel W0 (C_in, C_out) and a low-rank pair A (C_in, r), B (r, C_out) give the layer's
weight  W = m * V^, with  V^ = colnorm(colnorm(W0) + scale * A B)  (each output unit's column
of weights normalised over C_in: FAAR normalises the rows of PyTorch's (out, in) weight) and the
magnitude  m = ||W0||_col * exp(0.1 * log_m), log_m (C_out,) trained from 0. The layer adds
x . (W - W0) to the frozen output. FAAR stores theta = log m' initialised at log ||W0|| and
computes ||W0|| exp(0.1 (theta - log ||W0||)); our log_m is theta - log ||W0||: the same value
and gradient, and it starts at exactly 0 whatever weights are loaded after the model is built.
Its regulariser (FAAR: 1e-4 mean((m / ||W0|| - 1)^2) per layer's shared magnitude, added to the
loss) is `magnitude_penalty`. docs/method.md ("Baselines", FAAR).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

FORMS = ("lora", "dora")
MAGNITUDE_RATE = 0.1  # FAAR's beta_m: m = ||W0|| exp(0.1 (theta - theta_0))
NORM_EPS = 1e-6  # F.normalize's eps in FAAR's code
SHARED_MAGNITUDE = "lora_log_m"  # AdaptedDense's parameter (the task LoRA's is 'log_m')


def column_normalised(w: jax.Array) -> jax.Array:
  """w / max(||w[..., :, o]||, eps) per output column o (F.normalize over the input dim)."""
  norm = jnp.linalg.norm(w, axis=-2, keepdims=True)
  return w / jnp.maximum(norm, NORM_EPS)


def weight_delta(kernel_0: jax.Array, a: jax.Array, b: jax.Array, scale: float,
                 log_m: jax.Array) -> jax.Array:
  """m V^ - W0 (..., C_in, C_out) for W0 (C_in, C_out), A (..., C_in, r), B (..., r, C_out),
  log_m (..., C_out); computed in float32."""
  w0 = kernel_0.astype(jnp.float32)
  norm_0 = jnp.linalg.norm(w0, axis=-2)  # (C_out,)
  v = column_normalised(w0) + scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
  m = norm_0 * jnp.exp(MAGNITUDE_RATE * log_m.astype(jnp.float32))
  return m[..., None, :] * column_normalised(v) - w0


def magnitude_penalty(params: Any, weight: float) -> jax.Array:
  """weight * sum over the shared LoRA layers of mean((m / ||W0|| - 1)^2) (FAAR's regulariser;
  its task magnitudes are not regularised)."""
  terms = [jnp.mean(jnp.square(jnp.exp(MAGNITUDE_RATE * v) - 1.0))
           for path, v in traverse_util.flatten_dict(params).items()
           if path[-1] == SHARED_MAGNITUDE]
  return weight * sum(terms) if terms else jnp.zeros((), jnp.float32)
