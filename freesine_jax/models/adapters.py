"""Adapters: the shared LoRA (TA module), Sine-AWB (TS module) and the Clock Net.

Shapes follow Flax conventions: a linear kernel is (C_in, C_out), a conv kernel is HWIO
(k, k, C_in, C_out). For Sine-AWB:

  A: (C_in, r)   W: (k, k, r, r) ('full') or (k, k, r) ('depthwise')   B: (r, C_out)
  M_AWB[u, v, i, o] = sum_{l, j} A[i, l] W[u, v, l, j] B[j, o]      (fuse first ...)
  M_t = sin(omega_t * M_AWB)                                          (... then the sine)
  M~_t = Gaussian low-pass of M_t;  update_t(x) = scale * conv(x, M~_t)

With B zero-initialised, M_AWB = 0, sin(0) = 0 and every update is exactly zero at step 0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from freesine_jax.models.layers import backbone_weight


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  scale: float = 4.0
  dropout: float = 0.05


@dataclasses.dataclass(frozen=True)
class SineAwbSpec:
  """How the task-specific (TS) path of a layer is built. See docs/method.md for each choice."""
  kernel_size: int = 3
  w_mode: str = "full"          # 'full' r x r x k x k | 'depthwise' r x k x k
  w_init: str = "identity"      # 'identity' (centre tap = I) | 'kaiming'
  modulation: str = "sine"      # 'sine': sin(w M) | 'linear': w M (the "w/o sine" ablation)
  lowpass: str = "matrix"       # 'matrix' (over C_in x C_out per tap) | 'taps' | 'none'
  lowpass_size: int = 7
  lowpass_sigma: float = 1.0
  scale: float = 4.0
  independent_bases: bool = False  # ablation: per-task A, W, B instead of one shared base

  def __post_init__(self):
    _check_choice("w_mode", self.w_mode, ("full", "depthwise"))
    _check_choice("w_init", self.w_init, ("identity", "kaiming"))
    _check_choice("modulation", self.modulation, ("sine", "linear"))
    _check_choice("lowpass", self.lowpass, ("matrix", "taps", "none"))
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(
          f"model.task_path.kernel_size must be odd and >= 1, got {self.kernel_size}")


def _check_choice(field, value, allowed):
  if value not in allowed:
    raise ValueError(f"model.task_path.{field}={value!r} is not one of {allowed}")


def lora_a_init(key, shape, dtype=jnp.float32):
  """PyTorch's kaiming_uniform_(a=sqrt(5)) on an (r, C_in) weight: U(-1/sqrt(C_in), 1/sqrt(C_in))."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


# ----------------------------------------------------------------------------- Sine-AWB maths


def fuse_awb(a: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """M_AWB (k, k, C_in, C_out) from A (C_in, r), W (k,k,r,r) or (k,k,r), B (r, C_out)."""
  if w.ndim == 4:
    return jnp.einsum("il,uvlj,jo->uvio", a, w, b)
  if w.ndim == 3:
    return jnp.einsum("il,uvl,lo->uvio", a, w, b)
  raise ValueError(f"W must be (k,k,r,r) or (k,k,r); got shape {w.shape}")


def gaussian_1d(size: int, sigma: float) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-0.5 * (x / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def _blur_axis(m: jax.Array, g: np.ndarray, axis: int) -> jax.Array:
  """Zero-padded 'same' 1-D correlation of m with the (symmetric) taps g along `axis`."""
  half = len(g) // 2
  pad = [(0, 0)] * m.ndim
  pad[axis] = (half, half)
  mp = jnp.pad(m, pad)
  n = m.shape[axis]
  out = 0.0
  for s, gs in enumerate(g):
    out = out + float(gs) * jax.lax.slice_in_dim(mp, s, s + n, axis=axis)
  return out


def gaussian_lowpass(m: jax.Array, mode: str, size: int, sigma: float) -> jax.Array:
  """Smooths fused kernels (..., k, k, C_in, C_out) with a separable K x K Gaussian.

  'matrix': over the (C_in, C_out) matrix of each tap; 'taps': over the k x k taps; 'none'.
  Zero padding, 'same' size (shifted adds: measured faster on CPU than 1-channel convolutions).
  """
  if mode == "none":
    return m
  if mode not in ("matrix", "taps"):
    raise ValueError(f"lowpass mode {mode!r} is not one of ('matrix', 'taps', 'none')")
  g = gaussian_1d(size, sigma)
  axes = (m.ndim - 2, m.ndim - 1) if mode == "matrix" else (m.ndim - 4, m.ndim - 3)
  for axis in axes:
    m = _blur_axis(m, g, axis)
  return m


def modulate(m: jax.Array, omega: jax.Array, modulation: str) -> jax.Array:
  """sin(omega * m) ('sine') or omega * m ('linear', the "w/o sine" ablation)."""
  if modulation == "sine":
    return jnp.sin(omega * m)
  if modulation == "linear":
    return omega * m
  raise ValueError(f"modulation={modulation!r} is not one of ('sine', 'linear')")


def task_kernel(a, w, b, omega, spec: SineAwbSpec) -> jax.Array:
  """M~_t = lowpass(sin(omega_t * (A W B))): the task's equivalent conv kernel."""
  m = modulate(fuse_awb(a, w, b), omega, spec.modulation)
  return gaussian_lowpass(m, spec.lowpass, spec.lowpass_size, spec.lowpass_sigma)


def apply_kernel(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Applies a (k, k, C_in, C_out) kernel to (..., H, W, C_in) tokens ('same' zero padding).

  Written as k*k shifted matmuls rather than a convolution: with a leading task axis (vmap over
  per-task kernels) XLA turns a convolution into a grouped one that is very slow on CPU, while
  batched matmuls stay fast on every backend.
  """
  kernel = kernel.astype(x.dtype)
  k = kernel.shape[0]
  h, w = x.shape[-3:-1]
  if k == 1:
    return jnp.dot(x, kernel[0, 0])
  half = k // 2
  pad = [(0, 0)] * (x.ndim - 3) + [(half, half), (half, half), (0, 0)]
  xp = jnp.pad(x, pad)
  out = 0.0
  for u in range(k):
    for v in range(k):
      out = out + jnp.dot(xp[..., u:u + h, v:v + w, :], kernel[u, v])
  return out


def apply_task_kernels(x: jax.Array, kernels: jax.Array) -> jax.Array:
  """Per-task kernels (T, k, k, C_in, C_out) on stacked task streams (T, B, H, W, C_in)."""
  return jax.vmap(apply_kernel)(x, kernels)


# ----------------------------------------------------------------------------- modules


class AdaptedDense(nn.Module):
  """Frozen linear + shared LoRA (shared stream) + optional per-task Sine-AWB path.

  `x` is the shared stream (..., C_in). `task_inputs` (optional) is a pair
  (frozen_input, path_input): path_input stacks the T task streams (T, B, H, W, C_in);
  frozen_input is either such a stack or `x` itself. The task outputs follow the paper,
  f^t_{i+1} = Phi(f^t_i) + scale * (M~_t * f'^t_i): the frozen layer plus the task's Sine-AWB
  kernel on the (possibly prompt-conditioned) path input. The shared LoRA adapts the shared
  stream; its factors A, B are the base of the Sine-AWB kernels. Tasks are vectorised (vmap), so
  the compiled graph does not grow with the number of tasks.
  Returns (y_shared, y_tasks (T, B, H, W, C_out) or None).
  """
  features: int
  lora: LoraSpec | None
  task_path: SineAwbSpec | None = None
  num_tasks: int = 0
  use_bias: bool = True
  policy: str = "none"
  dtype: Any = jnp.float32

  def _w(self, name, rank, stack=()):
    spec = self.task_path
    k = spec.kernel_size
    if spec.w_mode == "full":
      shape, centre = (k, k, rank, rank), jnp.eye(rank)
      axes = dict(in_axis=(-4, -3, -2), out_axis=-1)
    else:
      shape, centre = (k, k, rank), jnp.ones((rank,))
      axes = dict(in_axis=(-3, -2), out_axis=-1)
    if spec.w_init == "identity":  # centre tap = identity: k = 1 starts as the plain A B product
      tap = (slice(None),) * len(stack) + (k // 2, k // 2)
      init = lambda key, s: jnp.zeros(s).at[tap].set(centre)
    else:
      init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform", **axes)
    return self.param(name, init, (*stack, *shape))

  @nn.compact
  def __call__(self, x, task_inputs=None, omegas=None, *, deterministic: bool = True):
    c_in = x.shape[-1]
    kernel_0 = backbone_weight(self, "kernel", nn.initializers.truncated_normal(0.02),
                               (c_in, self.features), "linear", self.policy).astype(self.dtype)
    bias_0 = (backbone_weight(self, "bias", nn.initializers.zeros, (self.features,), "linear",
                              self.policy).astype(self.dtype) if self.use_bias else 0.0)
    frozen = lambda z: jnp.dot(z.astype(self.dtype), kernel_0) + bias_0

    y_frozen = frozen(x)
    y_shared = y_frozen
    if self.lora is not None:
      rank = self.lora.rank
      a = self.param("lora_a", lora_a_init, (c_in, rank))
      b = self.param("lora_b", nn.initializers.zeros, (rank, self.features))
      xd = nn.Dropout(self.lora.dropout)(x, deterministic=deterministic)
      y_shared = y_shared + self.lora.scale * jnp.dot(jnp.dot(xd, a.astype(self.dtype)),
                                                      b.astype(self.dtype))
    if task_inputs is None:
      return y_shared, None

    frozen_in, path_in = task_inputs
    y_tasks = y_frozen if frozen_in is x else frozen(frozen_in)
    spec = self.task_path
    if spec is None:  # this layer carries no TS path: the task streams see the frozen layer
      return y_shared, jnp.broadcast_to(y_tasks, (*path_in.shape[:-1], self.features))
    if self.lora is None:
      raise ValueError("the Sine-AWB base is sized by the LoRA rank: set model.lora.rank > 0")
    if path_in.shape[0] != self.num_tasks:
      raise ValueError(f"expected {self.num_tasks} task streams, got {path_in.shape[0]}")
    t = self.num_tasks
    if spec.independent_bases:
      stack_a = self.param("task_a", lambda k, s: jax.vmap(lambda kk: lora_a_init(kk, s[1:]))(
          jax.random.split(k, s[0])), (t, c_in, rank))
      stack_w = self._w("task_w", rank, stack=(t,))
      stack_b = self.param("task_b", nn.initializers.zeros, (t, rank, self.features))
      kernels = jax.vmap(lambda a_t, w_t, b_t, om: task_kernel(a_t, w_t, b_t, om, spec))(
          stack_a, stack_w, stack_b, omegas)
    else:
      w = self._w("awb_w", rank)
      kernels = jax.vmap(lambda om: task_kernel(a, w, b, om, spec))(omegas)
    updates = apply_task_kernels(path_in.astype(self.dtype), kernels)
    return y_shared, y_tasks + spec.scale * updates


class ClockNet(nn.Module):
  """omega_t = s * (tanh(W_q . ReLU(p_t)) + c): one bounded frequency per task.

  With s > 0, omega_t lies in (s (c - 1), s (c + 1)) whatever the tokens are.
  """
  s_init: float = 1.0
  c_init: float = 1.0

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: (T, C) task tokens -> (T,) frequencies."""
    s = self.param("s", nn.initializers.constant(self.s_init), ())
    c = self.param("c", nn.initializers.constant(self.c_init), ())
    q = nn.Dense(1, name="w_q")(jax.nn.relu(tokens))[:, 0]
    return s * (jnp.tanh(q) + c)
