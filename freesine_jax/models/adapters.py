"""Adapters: the shared LoRA (TA module), Sine-AWB (TS module) and the Clock Net.

Shapes follow Flax conventions: a linear kernel is (C_in, C_out), a conv kernel is HWIO
(k, k, C_in, C_out). For Sine-AWB:

  A: (C_in, r)   W: (k, k, r, r) ('full') or (k, k, r) ('depthwise')   B: (r, C_out)
  M_AWB[u, v, i, o] = sum_{l, j} A[i, l] W[u, v, l, j] B[j, o]        (fuse first ...)
  M_t = (rho / omega_0) sin(omega_0 omega_t M_AWB / rho), rho = RMS per tap  (... then the sine)
  M~_t = Gaussian low-pass of M_t;  update_t(x) = scale * conv(x, M~_t)

The sine's argument has RMS omega_0 omega_t whatever the weights' scale (docs/method.md). With B
zero-initialised, M_AWB = 0, M_t = 0 and every update is exactly zero at step 0.
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


MODULATIONS = ("sine", "linear")
BASE_NORMS = ("tap_rms", "rms", "none")
LOWPASS_MODES = ("matrix", "taps", "taps_full", "none")


def _check_choice(section, field, value, allowed):
  if value not in allowed:
    raise ValueError(f"{section}.{field}={value!r} is not one of {allowed}")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  scale: float = 4.0
  dropout: float = 0.05


@dataclasses.dataclass(frozen=True)
class SineSpec:
  """How one shared base M becomes T task kernels: frequency modulation, then low-pass.

  K_t = lowpass(amp * sin(omega_0 * omega_t * M / rho)),  amp = rho / omega_0,
  rho = the RMS of each tap's C_in x C_out matrix of M ('tap_rms', default), of the whole M
  ('rms') or 1 ('none'). The sine acts on the base measured in units of its own RMS, so its regime
  does not depend on how large the trained weights are (docs/method.md, "Where the sine acts").
  'linear' replaces the sine by its argument and keeps the amplitude:
  amp * omega_0 * omega_t * M / rho = omega_t * M, the "w/o sine" ablation.
  """
  modulation: str = "sine"      # 'sine' | 'linear' (the "w/o sine" ablation)
  omega_0: float = 3.0          # base frequency, in units of the base's RMS
  base_norm: str = "tap_rms"    # 'tap_rms' | 'rms' | 'none' (the literal sin(omega_0 omega_t M))
  lowpass: str = "matrix"       # 'matrix' | 'taps' | 'taps_full' | 'none'
  lowpass_size: int = 7
  lowpass_sigma: float = 1.0
  section: str = "model.sine_awb"  # config section named in error messages

  def __post_init__(self):
    _check_choice(self.section, "modulation", self.modulation, MODULATIONS)
    _check_choice(self.section, "base_norm", self.base_norm, BASE_NORMS)
    _check_choice(self.section, "lowpass", self.lowpass, LOWPASS_MODES)
    if not self.omega_0 > 0:
      raise ValueError(f"{self.section}.omega_0 must be > 0, got {self.omega_0}")
    if self.lowpass_size < 1 or self.lowpass_size % 2 == 0:
      raise ValueError(f"{self.section}.lowpass_size must be odd and >= 1, got "
                       f"{self.lowpass_size}")

  def kernels(self, m: jax.Array, omegas: jax.Array) -> jax.Array:
    """Task kernels (T, *m.shape) (taps_full: taps grown by lowpass_size - 1) from a base m."""
    return jax.vmap(lambda om: self.kernel(m, om))(omegas)

  def kernel(self, m: jax.Array, omega: jax.Array, modulation: str | None = None) -> jax.Array:
    """One task's kernel; `modulation` overrides the spec's ('linear' gives the counterpart)."""
    m = modulate(m, omega, modulation or self.modulation, self.omega_0, self.base_norm)
    return gaussian_lowpass(m, self.lowpass, self.lowpass_size, self.lowpass_sigma)


@dataclasses.dataclass(frozen=True)
class SineAwbSpec:
  """How the task-specific (TS) path of a layer is built. See docs/method.md for each choice."""
  kernel_size: int = 3
  w_mode: str = "full"          # 'full' r x r x k x k | 'depthwise' r x k x k
  w_init: str = "identity"      # 'identity' (centre tap = I) | 'kaiming'
  scale: float = 4.0            # output gain alpha: update_t = alpha * (K_t * x_t)
  independent_bases: bool = False  # ablation: per-task A, W, B instead of one shared base
  sine: SineSpec = SineSpec()

  def __post_init__(self):
    _check_choice("model.sine_awb", "w_mode", self.w_mode, ("full", "depthwise"))
    _check_choice("model.sine_awb", "w_init", self.w_init, ("identity", "kaiming"))
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(
          f"model.sine_awb.kernel_size must be odd and >= 1, got {self.kernel_size}")


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

  'matrix': over the (C_in, C_out) matrix of each tap ('same' size); 'taps': over the k x k taps
  ('same' size, the K x K filter truncated to the k x k support); 'taps_full': the full
  convolution of the taps, (k + K - 1)^2 taps, which equals blurring the feature map with the
  Gaussian before applying the k x k kernel; 'none'. Zero padding (shifted adds: measured faster
  on CPU than 1-channel convolutions).
  """
  if mode == "none":
    return m
  _check_choice("lowpass", "mode", mode, LOWPASS_MODES)
  g = gaussian_1d(size, sigma)
  if mode == "matrix":
    axes = (m.ndim - 2, m.ndim - 1)
  else:
    axes = (m.ndim - 4, m.ndim - 3)
    if mode == "taps_full":
      half = size // 2
      pad = [(0, 0)] * m.ndim
      for axis in axes:
        pad[axis] = (half, half)
      m = jnp.pad(m, pad)
  for axis in axes:
    m = _blur_axis(m, g, axis)
  return m


# mean(M^2) is floored by this: rho > 0 even for the all-zero base of step 0, so the normalised
# base M / rho is exactly 0 there (exact zero update) and every gradient stays finite.
RMS_FLOOR = 1e-30


def base_rms(m: jax.Array, base_norm: str) -> jax.Array | float:
  """rho, the scale the sine's argument is measured in, for a base m (..., C_in, C_out).

  'tap_rms': sqrt(mean(M_uv^2) + RMS_FLOOR) of each tap's C_in x C_out matrix (shape
  (..., 1, 1)); 'rms': one such RMS over the whole kernel; 'none': 1.
  """
  _check_choice("sine", "base_norm", base_norm, BASE_NORMS)
  if base_norm == "none":
    return 1.0
  axes = (-2, -1) if base_norm == "tap_rms" else None
  return jnp.sqrt(jnp.mean(jnp.square(m.astype(jnp.float32)), axis=axes, keepdims=True)
                  + RMS_FLOOR)


def modulate(m: jax.Array, omega: jax.Array, modulation: str, omega_0: float = 1.0,
             base_norm: str = "none") -> jax.Array:
  """amp * sin(omega_0 * omega * m / rho) ('sine') or amp * (its argument) ('linear').

  amp = rho / omega_0, rho = base_rms(m, base_norm). The linear form equals omega * m whatever
  omega_0 and rho are, so the sine and its "w/o sine" ablation differ only in the sine.
  Bounded: |amp * sin(.)| <= min(rho / omega_0, |omega * m|) entrywise.
  """
  rho = base_rms(m, base_norm)
  amplitude = rho / omega_0
  argument = (omega_0 * omega / rho) * m
  if modulation == "sine":
    return amplitude * jnp.sin(argument)
  if modulation == "linear":
    return amplitude * argument
  raise ValueError(f"modulation={modulation!r} is not one of {MODULATIONS}")


def sine_awb_kernels(a: jax.Array, w: jax.Array, b: jax.Array, omegas: jax.Array,
                     spec: SineAwbSpec, modulation: str | None = None) -> jax.Array:
  """M~_t for every task: (T, k', k', C_in, C_out), from one base or per-task bases.

  Shared base: a (C_in, r), w (k,k,r,r)|(k,k,r), b (r, C_out). Independent bases
  (spec.independent_bases): the same with a leading task axis. `modulation='linear'` gives the
  linear counterparts L_t (what the analysis compares the kernels with).
  """
  if spec.independent_bases:
    return jax.vmap(lambda a_t, w_t, b_t, om: spec.sine.kernel(fuse_awb(a_t, w_t, b_t), om,
                                                               modulation))(a, w, b, omegas)
  m = fuse_awb(a, w, b)
  return jax.vmap(lambda om: spec.sine.kernel(m, om, modulation))(omegas)


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


class SineAWB(nn.Module):
  """Sine-AWB, the paper's task-specific module: fuse A.W.B -> sine per task -> low-pass -> apply.

  Owns the convolutional prior W; A and B are the layer's shared LoRA factors, so the base is
  shared by all tasks and the only task-specific input is the frequency omega_t. With
  spec.independent_bases (ablation) it owns per-task A, W, B instead. Tasks are vectorised: the
  T kernels are one (T, k, k, C_in, C_out) array applied to the stacked task streams.
  """
  spec: SineAwbSpec
  num_tasks: int
  features: int
  dtype: Any = jnp.float32

  def _w(self, rank, stack=()):
    spec = self.spec
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
    return self.param("w", init, (*stack, *shape))

  def factors(self, a: jax.Array, b: jax.Array):
    """(A, W, B) of the base(s): the shared LoRA factors with this layer's W, or per-task ones."""
    c_in, rank = a.shape
    if not self.spec.independent_bases:
      return a, self._w(rank), b
    t = self.num_tasks
    task_a = self.param("a", lambda k, s: jax.vmap(lambda kk: lora_a_init(kk, s[1:]))(
        jax.random.split(k, s[0])), (t, c_in, rank))
    task_b = self.param("b", nn.initializers.zeros, (t, rank, self.features))
    return task_a, self._w(rank, stack=(t,)), task_b

  @nn.compact
  def __call__(self, path_in: jax.Array, a: jax.Array, b: jax.Array, omegas: jax.Array):
    """path_in (T, B, H, W, C_in), shared LoRA a (C_in, r), b (r, C_out), omegas (T,).

    Returns the task updates alpha * (M~_t * path_in_t), (T, B, H, W, C_out).
    """
    if path_in.shape[0] != self.num_tasks:
      raise ValueError(f"expected {self.num_tasks} task streams, got {path_in.shape[0]}")
    kernels = sine_awb_kernels(*self.factors(a, b), omegas, self.spec)
    return self.spec.scale * apply_task_kernels(path_in.astype(self.dtype), kernels)


class AdaptedDense(nn.Module):
  """Frozen linear + shared LoRA (shared stream) + optional per-task Sine-AWB path.

  `x` is the shared stream (..., C_in). `task_inputs` (optional) is a pair
  (frozen_input, path_input): path_input stacks the T task streams (T, B, H, W, C_in);
  frozen_input is either such a stack or `x` itself. The task outputs follow the paper,
  f^t_{i+1} = Phi(f^t_i) + SineAWB_t(f'^t_i): the frozen layer plus the task's Sine-AWB update
  on the (possibly prompt-conditioned) path input. The shared LoRA adapts the shared stream; its
  factors A, B are the base of the Sine-AWB kernels. `sine_awb` may instead be a baseline's
  task-path spec (models/lora.py), whose module gives the update from (path_in, A, B).
  Returns (y_shared, y_tasks (T, B, H, W, C_out) or None).
  """
  features: int
  lora: LoraSpec | None
  sine_awb: SineAwbSpec | None = None
  num_tasks: int = 0
  use_bias: bool = True
  policy: str = "none"
  dtype: Any = jnp.float32

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
    if getattr(self.sine_awb, "gives_task_outputs", False):  # merged weights (models/merged.py)
      return y_shared, self.sine_awb.build_task_path(self.num_tasks, self.features, self.dtype)(
          frozen_in, path_in)
    y_tasks = y_frozen if frozen_in is x else frozen(frozen_in)
    if self.sine_awb is None:  # this layer carries no TS path: the task streams see the frozen layer
      return y_shared, jnp.broadcast_to(y_tasks, (*path_in.shape[:-1], self.features))
    if self.lora is None:
      raise ValueError("the Sine-AWB base is sized by the LoRA rank: set model.lora.rank > 0")
    build_task_path = getattr(self.sine_awb, "build_task_path", None)
    if build_task_path is not None:  # a baseline's task path (models/lora.py)
      return y_shared, y_tasks + build_task_path(self.num_tasks, self.features, self.dtype)(
          path_in, a, b)
    updates = SineAWB(self.sine_awb, self.num_tasks, self.features, self.dtype,
                      name="sine_awb")(path_in, a, b, omegas)
    return y_shared, y_tasks + updates


def clock_offsets(num_tasks: int, spread: float) -> np.ndarray:
  """tanh of the Clock Net's fixed pre-tanh offsets: evenly spaced in [-spread, spread]."""
  if not 0.0 <= spread < 1.0:
    raise ValueError(f"model.clock_spread must be in [0, 1), got {spread}")
  if num_tasks == 1:
    return np.zeros((1,), np.float32)
  return (spread * np.linspace(-1.0, 1.0, num_tasks)).astype(np.float32)


class ClockNet(nn.Module):
  """omega_t = s * (tanh(W_q . ReLU(p_t) + phi_t) + c): one bounded frequency per task.

  phi_t are fixed (not learned) offsets with tanh(phi_t) evenly spaced in [-spread, spread], so
  the tasks start at distinct frequencies s (c + tanh(phi_t)) (docs/method.md, "Clock Net");
  spread = 0 is the paper's formula as written. With s > 0, omega_t lies in
  (s (c - 1), s (c + 1)) whatever the tokens are.
  """
  s_init: float = 1.0
  c_init: float = 1.0
  spread: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: (T, C) task tokens -> (T,) frequencies."""
    s = self.param("s", nn.initializers.constant(self.s_init), ())
    c = self.param("c", nn.initializers.constant(self.c_init), ())
    q = nn.Dense(1, name="w_q")(jax.nn.relu(tokens))[:, 0]
    phi = np.arctanh(clock_offsets(tokens.shape[0], self.spread))
    return s * (jnp.tanh(q + phi) + c)
