"""The baselines' task-specific (TS) paths, beside Free Sinewich's Sine-AWB
(models/adapters/sine_awb.py).

Each spec is an `adapters.TaskPath`: its `task_outputs` builds the module and gives each task
stream Phi(frozen input) + update_t, the update computed from the task stream (and, for
TADFormer, the layer's shared LoRA factors A, B):

* `TaskLoraSpec` (MTLoRA): per task t its own low-rank pair, update_t = s * x_t A_t B_t (FAAR:
  in the DoRA form, models/dora.py).
* `DynamicFilterSpec` (TADFormer, the variant whose counts match its paper): in the shared LoRA's
  rank space, z_t = x_t A, a depthwise k x k filter generated per example and task from the
  spatial mean of z_t by one generator shared by the tasks, update_t = s * filter(z_t) B.

docs/method.md ("Baselines") derives their parameter counts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from freesine_jax.models import dora
from freesine_jax.models.adapters import lora_a_init
from freesine_jax.models.layers import dense, per_task_dense


def stacked_lora_a_init(key, shape, dtype=jnp.float32):
  """lora_a_init for each of a leading axis of tasks: (T, C_in, r)."""
  keys = jax.random.split(key, shape[0])
  return jax.vmap(lambda k: lora_a_init(k, shape[1:], dtype))(keys)


class TaskLora(nn.Module):
  """MTLoRA's task-specific LoRA: update_t = scale * x_t A_t B_t, A_t kaiming-uniform, B_t = 0.

  form 'dora' (FAAR): update_t = x_t (m_t V^_t - W0), V^_t from W0 and scale A_t B_t, a
  magnitude log_m_t per task (models/dora.py); needs the layer's frozen kernel."""
  rank: int
  scale: float
  num_tasks: int
  features: int
  dtype: Any = jnp.float32
  form: str = "lora"

  @nn.compact
  def __call__(self, path_in, *, frozen_kernel=None):
    c_in = path_in.shape[-1]
    task_a = self.param("a", stacked_lora_a_init, (self.num_tasks, c_in, self.rank))
    task_b = self.param("b", nn.initializers.zeros, (self.num_tasks, self.rank, self.features))
    if self.form == "dora":
      log_m = self.param("log_m", nn.initializers.zeros, (self.num_tasks, self.features))
      delta = dora.weight_delta(frozen_kernel, task_a, task_b, self.scale, log_m)
      return per_task_dense(path_in.astype(self.dtype), delta.astype(self.dtype))
    low = per_task_dense(path_in.astype(self.dtype), task_a.astype(self.dtype))
    return self.scale * per_task_dense(low, task_b.astype(self.dtype))


def depthwise_filter(z: jax.Array, filters: jax.Array) -> jax.Array:
  """Per-example depthwise k x k cross-correlation, 'same' zero padding.

  z (..., H, W, r), filters (..., k, k, r) with the same leading axes.
  """
  k = filters.shape[-2]
  h, w = z.shape[-3:-1]
  half = k // 2
  zp = jnp.pad(z, [(0, 0)] * (z.ndim - 3) + [(half, half), (half, half), (0, 0)])
  out = 0.0
  for u in range(k):
    for v in range(k):
      out = out + zp[..., u:u + h, v:v + w, :] * filters[..., None, None, u, v, :]
  return out


class DynamicTaskFilter(nn.Module):
  """TADFormer's dynamic task filter in the rank space of the shared LoRA.

  z_t = x_t A; g = Conv1x1(mean_{H,W} z_t) (r -> r k^2, with bias), per rank channel its k^2 taps
  standardised (mean 0, unbiased std 1) then scaled and shifted by learned per-tap std and mean
  (DDF's filter norm); update_t = scale * depthwise(z_t, g) B. The generator is shared by the
  tasks; the filter differs per task and example because z_t does.
  """
  kernel_size: int
  scale: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, path_in, a, b):
    rank, k = a.shape[1], self.kernel_size
    taps = k * k
    z = dense(path_in.astype(self.dtype), a.astype(self.dtype))  # (T, B, H, W, r)
    pooled = jnp.mean(z.astype(jnp.float32), axis=(-3, -2))  # (T, B, r)
    bound = 1.0 / math.sqrt(rank)  # PyTorch's Conv2d default init
    uniform = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    kernel = self.param("generator_kernel", uniform, (rank, rank * taps))
    bias = self.param("generator_bias", uniform, (rank * taps,))
    gain = math.sqrt(2.0) / k  # DDF: calculate_gain('relu') / kernel_size
    tap_std = self.param("tap_std", lambda key, s: gain * jax.random.normal(key, s), (rank * taps,))
    tap_mean = self.param("tap_mean", nn.initializers.normal(1.0), (rank * taps,))
    g = (pooled @ kernel + bias).reshape(*pooled.shape[:-1], rank, taps)
    g = g - jnp.mean(g, axis=-1, keepdims=True)
    g = g / (jnp.std(g, axis=-1, keepdims=True, ddof=1) + 1e-10)
    g = g * tap_std.reshape(rank, taps) + tap_mean.reshape(rank, taps)
    filters = jnp.moveaxis(g.reshape(*g.shape[:-1], k, k), -3, -1)  # (T, B, k, k, r)
    filtered = depthwise_filter(z, filters.astype(self.dtype))
    return self.scale * dense(filtered, b.astype(self.dtype))


@dataclasses.dataclass(frozen=True)
class TaskLoraSpec:
  """model.task_path = 'task_lora' (MTLoRA); form: model.lora.form (FAAR's 'dora')."""
  rank: int = 4
  scale: float = 4.0
  form: str = "lora"

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"model.task_lora.rank must be >= 1, got {self.rank}")

  def task_outputs(self, layer, frozen_in, path_in, omegas):
    del omegas
    layer.shared_factors("model.task_path='task_lora'")
    update = TaskLora(self.rank, self.scale, layer.num_tasks, layer.features, layer.dtype,
                      self.form, name="task_lora")(path_in, frozen_kernel=layer.kernel_0)
    return layer.frozen_of(frozen_in) + update


@dataclasses.dataclass(frozen=True)
class DynamicFilterSpec:
  """model.task_path = 'dynamic_filter' (TADFormer); scale is the shared LoRA's (as TADFormer)."""
  kernel_size: int = 3
  scale: float = 4.0

  def __post_init__(self):
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f"model.dynamic_filter.kernel_size must be odd and >= 1, got "
                       f"{self.kernel_size}")

  def task_outputs(self, layer, frozen_in, path_in, omegas):
    del omegas
    a, b = layer.shared_factors("model.task_path='dynamic_filter'")
    update = DynamicTaskFilter(self.kernel_size, self.scale, layer.dtype,
                               name="task_filter")(path_in, a, b)
    return layer.frozen_of(frozen_in) + update
