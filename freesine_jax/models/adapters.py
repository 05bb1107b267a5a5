"""Adapters: the shared LoRA (TA module), Sine-AWB (TS module) and the Clock Net.

Shapes follow Flax conventions: a linear kernel is (C_in, C_out), a conv kernel is HWIO
(k, k, C_in, C_out). For Sine-AWB:

  A: (C_in, r)   W: (k, k, r, r) ('full') or (k, k, r) ('depthwise')   B: (r, C_out)
  M_AWB[u, v, i, o] = sum_{l, j} A[i, l] W[u, v, l, j] B[j, o]        (fuse first ...)
  M_t = (rho / omega_0) sin(omega_0 omega_t M_AWB / rho), rho = RMS per tap  (... then the sine)
  M~_t = Gaussian low-pass of M_t;  update_t(x) = scale * conv(x, M~_t)

The sine's argument has RMS omega_0 omega_t whatever the weights' scale (docs/method.md). With B
zero-initialised, M_AWB = 0, M_t = 0 and every update is exactly zero at step 0.

How the task path is computed (`Lowering`, config model.compute) is a choice of speed and memory
only: every lowering is an exact rewrite of the direct form above (docs/method.md, "Computation").
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from freesine_jax.models import dora
from freesine_jax.models.layers import (MASK_BITS, Dropout, backbone_weight, dense, per_task_dense,
                                       recompute_in_backward)


MODULATIONS = ("sine", "linear")
BASE_NORMS = ("tap_rms", "rms", "none")
LOWPASS_MODES = ("matrix", "taps", "taps_full", "none")
TASK_CONVS = ("gemm", "conv", "winograd")
LOWPASS_SITES = ("auto", "kernel", "activations")
TASK_LOOPS = ("stacked", "scan")
# Orders of a task kernel's axes: 'uvio' (k, k, C_in, C_out) is the API's (HWIO, what the
# inference cache and the exported models hold); 'iuvo' (C_in, k, k, C_out) is what the 'gemm'
# lowering that stacks the taps on the output multiplies by, so the task path builds its kernels
# in that order there (see kernel_layout).
KERNEL_LAYOUTS = ("uvio", "iuvo")
# Variable collection of weights that depend on the parameters only (the merged shared LoRA, the
# finished task kernels). Filled once by MultiTaskModel.merge_for_inference; when present, the
# layers read it instead of rebuilding the weights for every batch.
MERGED = "merged"


def _check_choice(section, field, value, allowed):
  if value not in allowed:
    raise ValueError(f"{section}.{field}={value!r} is not one of {allowed}")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  scale: float = 4.0
  dropout: float = 0.05
  dropout_bits: int = 8  # random bits per dropout-mask entry (layers.bernoulli_mask)
  form: str = "lora"  # 'lora': W0 + scale A B; 'dora': FAAR's DoRA form (models/dora.py)

  def __post_init__(self):
    _check_choice("model.lora", "dropout_bits", self.dropout_bits, MASK_BITS)
    _check_choice("model.lora", "form", self.form, dora.FORMS)


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

  @property
  def applied_kernel_size(self) -> int:
    """Taps of the applied kernels: 'taps_full' grows k by lowpass_size - 1."""
    if self.sine.lowpass == "taps_full":
      return self.kernel_size + self.sine.lowpass_size - 1
    return self.kernel_size


@dataclasses.dataclass(frozen=True)
class Lowering:
  """How the task path is computed: exact rewrites of one function (config model.compute).

  task_conv: how the per-task k x k kernels are applied. 'gemm' (CPU default): one GEMM per task
    whose contraction runs over the k*k taps stacked with the channels (im2col on the input
    when C_in <= C_out, else the taps stacked on the output and shift-added). 'conv': one
    lax.conv_general_dilated with the tasks as feature groups (the TPU/GPU recommendation:
    native convolution units, no k*k-times copy of the activations). 'winograd': F(2x2, 3x3),
    2.25x fewer multiplies, 3x3 kernels only; float32 error measured in docs/benchmarks.md.
  lowpass_site: where the 'matrix' low-pass acts. It is linear along the channel axes, so
    conv(x, G K G) = G-blur(conv(G-blur(x), K)) exactly: 'kernel' smooths the T k^2 C_in C_out
    kernels, 'activations' the T B H W (C_in + C_out) activations; 'auto' picks the smaller
    per layer (at 448 x 448, batch 2: the kernels at stages 1-2, the activations at 3-4). The
    frozen linear folds into the kernel's centre tap only when the kernel is smoothed.
  task_path_remat: the backward pass recomputes each layer's task kernels (and im2col copies)
    instead of keeping them (and the sine's cosines) from the forward: per layer only the input,
    the factors and the frequencies are kept (layers.recompute_in_backward).
  task_loop: 'stacked' computes every task's kernels and outputs in one batched computation;
    'scan' one task after another (lax.scan over the tasks), so a layer's kernel-sized
    temporaries (the kernels, their sine and cosine, their gradient) exist for one task at a
    time: T times less of them in the backward pass, one copy of the layer in the program.
  """
  task_conv: str = "gemm"
  lowpass_site: str = "auto"
  task_path_remat: bool = True
  task_loop: str = "stacked"

  def __post_init__(self):
    _check_choice("model.compute", "task_conv", self.task_conv, TASK_CONVS)
    _check_choice("model.compute", "lowpass_site", self.lowpass_site, LOWPASS_SITES)
    _check_choice("model.compute", "task_loop", self.task_loop, TASK_LOOPS)


def lora_a_init(key, shape, dtype=jnp.float32):
  """PyTorch's kaiming_uniform_(a=sqrt(5)) on an (r, C_in) weight: U(-1/sqrt(C_in), 1/sqrt(C_in))."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


# ----------------------------------------------------------------------------- Sine-AWB maths


def layout_axes(layout: str, letters: str, ndim: int) -> tuple[int, ...]:
  """Positions of kernel axes ('u', 'v' taps; 'i', 'o' channels) in an array of `ndim` axes
  whose last four are one kernel in `layout` (KERNEL_LAYOUTS)."""
  _check_choice("sine_awb", "kernel layout", layout, KERNEL_LAYOUTS)
  return tuple(ndim - 4 + layout.index(letter) for letter in letters)


def fuse_awb(a: jax.Array, w: jax.Array, b: jax.Array, layout: str = "uvio") -> jax.Array:
  """M_AWB from A (C_in, r), W (k,k,r,r) or (k,k,r), B (r, C_out): (k, k, C_in, C_out), or
  (C_in, k, k, C_out) for layout 'iuvo'.

  One GEMM against the small product of the other two factors, whose output rows are already
  in the layout's order (an einsum left XLA free to produce M transposed and copy it back).
  """
  if w.ndim not in (3, 4):
    raise ValueError(f"W must be (k,k,r,r) or (k,k,r); got shape {w.shape}")
  _check_choice("sine_awb", "kernel layout", layout, KERNEL_LAYOUTS)
  k, rank, c_in, c_out = w.shape[0], a.shape[1], a.shape[0], b.shape[1]
  if layout == "uvio":  # (A W) (k k C_in, r) x B
    aw = jnp.einsum("il,uvlj->uvij" if w.ndim == 4 else "il,uvl->uvil", a, w)
    return jnp.dot(aw.reshape(-1, rank), b).reshape(k, k, c_in, c_out)
  wb = jnp.einsum("uvlj,jo->luvo" if w.ndim == 4 else "uvl,lo->luvo", w, b)  # A x (W B)
  return jnp.dot(a, wb.reshape(rank, -1)).reshape(c_in, k, k, c_out)


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


def gaussian_lowpass(m: jax.Array, mode: str, size: int, sigma: float,
                     layout: str = "uvio") -> jax.Array:
  """Smooths fused kernels (..., k, k, C_in, C_out) (or `layout`) with a separable K x K
  Gaussian.

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
  axes = layout_axes(layout, "io" if mode == "matrix" else "uv", m.ndim)
  if mode != "matrix":
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


def base_rms(m: jax.Array, base_norm: str, layout: str = "uvio") -> jax.Array | float:
  """rho, the scale the sine's argument is measured in, for a base m (..., k, k, C_in, C_out)
  (or `layout`).

  'tap_rms': sqrt(mean(M_uv^2) + RMS_FLOOR) of each tap's C_in x C_out matrix (kept as size-1
  axes); 'rms': one such RMS over the whole kernel; 'none': 1.
  """
  _check_choice("sine", "base_norm", base_norm, BASE_NORMS)
  if base_norm == "none":
    return 1.0
  axes = layout_axes(layout, "io", m.ndim) if base_norm == "tap_rms" else None
  return jnp.sqrt(jnp.mean(jnp.square(m.astype(jnp.float32)), axis=axes, keepdims=True)
                  + RMS_FLOOR)


def modulate(m: jax.Array, omega: jax.Array, modulation: str, omega_0: float = 1.0,
             base_norm: str = "none", layout: str = "uvio") -> jax.Array:
  """amp * sin(omega_0 * omega * m / rho) ('sine') or amp * (its argument) ('linear').

  amp = rho / omega_0, rho = base_rms(m, base_norm). The linear form equals omega * m whatever
  omega_0 and rho are, so the sine and its "w/o sine" ablation differ only in the sine.
  Bounded: |amp * sin(.)| <= min(rho / omega_0, |omega * m|) entrywise.
  """
  rho = base_rms(m, base_norm, layout)
  amplitude = rho / omega_0
  argument = (omega_0 * omega / rho) * m
  if modulation == "sine":
    return amplitude * jnp.sin(argument)
  if modulation == "linear":
    return amplitude * argument
  raise ValueError(f"modulation={modulation!r} is not one of {MODULATIONS}")


def modulated_kernels(a: jax.Array, w: jax.Array, b: jax.Array, omegas: jax.Array,
                      spec: SineAwbSpec, modulation: str | None = None,
                      layout: str = "uvio") -> jax.Array:
  """(rho/omega_0) sin(omega_0 omega_t M / rho) for every task, before the low-pass.

  (T, k, k, C_in, C_out) (or (T, *layout)) from one shared base (a (C_in, r),
  w (k,k,r,r)|(k,k,r), b (r, C_out)) or, with spec.independent_bases, from per-task factors
  (the same with a leading task axis).
  """
  sine = spec.sine
  mod = modulation or sine.modulation
  modulated = lambda m, om: modulate(m, om, mod, sine.omega_0, sine.base_norm, layout)
  if spec.independent_bases:
    return jax.vmap(lambda a_t, w_t, b_t, om: modulated(fuse_awb(a_t, w_t, b_t, layout), om))(
        a, w, b, omegas)
  m = fuse_awb(a, w, b, layout)
  return jax.vmap(lambda om: modulated(m, om))(omegas)


def sine_awb_kernels(a: jax.Array, w: jax.Array, b: jax.Array, omegas: jax.Array,
                     spec: SineAwbSpec, modulation: str | None = None) -> jax.Array:
  """M~_t for every task: (T, k', k', C_in, C_out), from one base or per-task bases.

  Shared base: a (C_in, r), w (k,k,r,r)|(k,k,r), b (r, C_out). Independent bases
  (spec.independent_bases): the same with a leading task axis. `modulation='linear'` gives the
  linear counterparts L_t (what the analysis compares the kernels with).
  """
  sine = spec.sine
  return gaussian_lowpass(modulated_kernels(a, w, b, omegas, spec, modulation), sine.lowpass,
                          sine.lowpass_size, sine.lowpass_sigma)


# ----------------------------------------------------------------------------- lowerings
#
# Per-task kernels (T, k, k, C_in, C_out) applied to stacked task streams (T, B, H, W, C_in),
# 'same' zero padding. `prepare_task_kernels` puts the kernels in the layout a lowering consumes
# (done once per step, or once for inference), `apply_prepared_kernels` applies them.


def _im2col_on_input(c_in: int, c_out: int) -> bool:
  """'gemm' stacks the k*k taps on the smaller channel side: the input (im2col) or the output."""
  return c_in <= c_out


def kernel_layout(task_conv: str, k: int, c_in: int, c_out: int) -> str:
  """The layout (KERNEL_LAYOUTS) `task_conv` multiplies k x k kernels by without a copy.

  'iuvo' for the 'gemm' that stacks the taps on the output (C_in > C_out: fc2), 'uvio' else.
  Built in the other order, every kernel-sized array of the task path (the kernels, their sine
  and cosine, their gradient) went through a transposing copy, in the forward and the backward
  pass: measured at Swin-T stage 4's fc2 (3072 -> 768, 4 tasks, 224 x 224, forward + backward
  of one layer) 4.7 s against 2.25 s (docs/method.md, Computation).
  """
  return "iuvo" if task_conv == "gemm" and k > 1 and not _im2col_on_input(c_in, c_out) else "uvio"


# F(2x2, 3x3) (Lavin & Gray 2016): Y = A^T [(G K G^T) . (B^T d B)] A on 4x4 input tiles.
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_WINOGRAD_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)


def _combine(matrix: np.ndarray, terms: list) -> list:
  """[sum_j matrix[i, j] * terms[j] for each row i], skipping zero coefficients (exact +-1)."""
  out = []
  for row in matrix:
    acc = None
    for coeff, term in zip(row, terms):
      if coeff == 0:
        continue
      part = term if coeff == 1 else (-term if coeff == -1 else float(coeff) * term)
      acc = part if acc is None else acc + part
    out.append(acc)
  return out


def _winograd_kernels(kernels: jax.Array) -> jax.Array:
  """U = G K G^T per (task, C_in, C_out): (T, 3, 3, Ci, Co) -> (16, T, Ci, Co), (a, b) major."""
  taps = [[kernels[:, u, v] for v in range(3)] for u in range(3)]
  rows = [_combine(_WINOGRAD_G, [taps[u][v] for u in range(3)]) for v in range(3)]  # [v][a]
  u_ab = [_combine(_WINOGRAD_G, [rows[v][a] for v in range(3)]) for a in range(4)]  # [a][b]
  return jnp.stack([u_ab[a][b] for a in range(4) for b in range(4)])


def _winograd_apply(x: jax.Array, u: jax.Array) -> jax.Array:
  """F(2x2, 3x3) of (T, B, H, W, Ci) with transformed kernels u (16, T, Ci, Co)."""
  t, bsz, h, w, ci = x.shape
  nh, nw = -(-h // 2), -(-w // 2)
  xp = jnp.pad(x, ((0, 0), (0, 0), (1, 2 * nh - h + 1), (1, 2 * nw - w + 1), (0, 0)))
  tile = lambda p, q: jax.lax.slice(xp, (0, 0, p, q, 0), (t, bsz, p + 2 * nh - 1, q + 2 * nw - 1,
                                                          ci), (1, 1, 2, 2, 1))
  d = [[tile(p, q) for q in range(4)] for p in range(4)]
  rows = [_combine(_WINOGRAD_BT, [d[p][q] for p in range(4)]) for q in range(4)]  # [q][a]
  v = [_combine(_WINOGRAD_BT, [rows[q][a] for q in range(4)]) for a in range(4)]  # [a][b]
  v = jnp.stack([v[a][b] for a in range(4) for b in range(4)]).reshape(16, t, -1, ci)
  m = jnp.einsum("stnc,stco->stno", v, u.astype(x.dtype))
  m = m.reshape(4, 4, t, bsz, nh, nw, -1)
  cols = [_combine(_WINOGRAD_AT, [m[a, b] for a in range(4)]) for b in range(4)]  # [b][i]
  y = [_combine(_WINOGRAD_AT, [cols[b][i] for b in range(4)]) for i in range(2)]  # [i][j]
  y = jnp.stack([jnp.stack(y_i, axis=-2) for y_i in y], axis=-4)  # (T, B, nh, 2, nw, 2, Co)
  return y.reshape(t, bsz, 2 * nh, 2 * nw, -1)[:, :, :h, :w]


def prepare_task_kernels(kernels: jax.Array, task_conv: str, layout: str = "uvio") -> jax.Array:
  """Task kernels (T, k, k, Ci, Co) (or (T, *layout)) in the layout `apply_prepared_kernels`
  consumes."""
  _check_choice("sine_awb", "kernel layout", layout, KERNEL_LAYOUTS)
  if layout == "iuvo":  # (T, Ci, k, k, Co)
    t, ci, k, _, co = kernels.shape
    if kernel_layout(task_conv, k, ci, co) == "iuvo":
      return kernels.reshape(t, ci, k * k * co)                      # Ci, then taps major
    kernels = kernels.transpose(0, 2, 3, 1, 4)
  t, k, _, ci, co = kernels.shape
  if k == 1:
    return kernels[:, 0, 0]                                          # (T, Ci, Co)
  if task_conv == "gemm":
    if _im2col_on_input(ci, co):
      return kernels.reshape(t, k * k * ci, co)                      # taps major, then Ci
    return kernels.transpose(0, 3, 1, 2, 4).reshape(t, ci, k * k * co)
  if task_conv == "conv":
    return kernels.transpose(1, 2, 3, 0, 4).reshape(k, k, ci, t * co)  # HWIO, tasks = groups
  if task_conv == "winograd":
    if k != 3:
      raise ValueError(f"model.compute.task_conv='winograd' is F(2x2, 3x3): needs 3x3 kernels, "
                       f"got {k}x{k}")
    return _winograd_kernels(kernels)
  raise ValueError(f"model.compute.task_conv={task_conv!r} is not one of {TASK_CONVS}")


def _tap_offsets(k: int, flip: bool) -> list[tuple[int, int]]:
  """(u, v) of the k*k taps, row-major; flipped: (k-1-u, k-1-v), the transposed offsets."""
  taps = [(u, v) for u in range(k) for v in range(k)]
  return [(k - 1 - u, k - 1 - v) for u, v in taps] if flip else taps


def _shift(x: jax.Array, du: int, dv: int, grid_axis: int) -> jax.Array:
  """y[..., h, w, :] = x[..., h + du, w + dv, :], zero outside: one lax.pad (negative widths
  crop), which XLA fuses into its consumer instead of materialising a padded copy."""
  config = [(0, 0, 0)] * x.ndim
  config[grid_axis] = (-du, du, 0)
  config[grid_axis + 1] = (-dv, dv, 0)
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def gather_taps(x: jax.Array, k: int, flip: bool = False) -> jax.Array:
  """im2col: (..., H, W, C) -> (..., H, W, k*k, C), tap i = x shifted by its offset (zero
  padding). Its transpose is `sum_taps` with flipped offsets (custom VJP: the autodiff of
  slices would materialise k*k zero-padded copies of the cotangent)."""
  half = k // 2
  return jnp.stack([_shift(x, u - half, v - half, x.ndim - 3) for u, v in _tap_offsets(k, flip)],
                   axis=-2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def sum_taps(z: jax.Array, k: int, flip: bool = False) -> jax.Array:
  """(..., H, W, k*k, C) -> (..., H, W, C): the sum over taps of tap i shifted by its offset;
  the transpose of `gather_taps` with flipped offsets, and vice versa."""
  half = k // 2
  out = None
  for i, (u, v) in enumerate(_tap_offsets(k, flip)):
    term = _shift(z[..., i, :], u - half, v - half, z.ndim - 4)
    out = term if out is None else out + term
  return out


gather_taps.defvjp(lambda x, k, flip: (gather_taps(x, k, flip), None),
                   lambda k, flip, _, g: (sum_taps(g, k, not flip),))
sum_taps.defvjp(lambda z, k, flip: (sum_taps(z, k, flip), None),
                lambda k, flip, _, g: (gather_taps(g, k, not flip),))


def _gemm_apply(x: jax.Array, prepared: jax.Array, k: int) -> jax.Array:
  t, bsz, h, w, ci = x.shape
  if prepared.shape[1] == k * k * ci:  # im2col layout (prepare_task_kernels)
    patches = gather_taps(x, k).reshape(t, bsz, h, w, k * k * ci)
    return per_task_dense(patches, prepared)
  z = per_task_dense(x, prepared)
  return sum_taps(z.reshape(t, bsz, h, w, k * k, -1), k)


def apply_prepared_kernels(x: jax.Array, prepared: jax.Array, task_conv: str,
                           kernel_size: int) -> jax.Array:
  """Stacked task streams (T, B, H, W, Ci) through prepared task kernels -> (T, B, H, W, Co)."""
  prepared = prepared.astype(x.dtype)
  if kernel_size == 1:
    return per_task_dense(x, prepared)
  if task_conv == "gemm":
    return _gemm_apply(x, prepared, kernel_size)
  if task_conv == "conv":
    t, bsz, h, w, ci = x.shape
    grouped = jnp.moveaxis(x, 0, -2).reshape(bsz, h, w, t * ci)
    y = jax.lax.conv_general_dilated(grouped, prepared, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=t)
    return jnp.moveaxis(y.reshape(bsz, h, w, t, -1), -2, 0)
  if task_conv == "winograd":
    return _winograd_apply(x, prepared)
  raise ValueError(f"model.compute.task_conv={task_conv!r} is not one of {TASK_CONVS}")


def apply_task_kernels(x: jax.Array, kernels: jax.Array, task_conv: str = "gemm",
                       layout: str = "uvio") -> jax.Array:
  """Per-task kernels (T, k, k, C_in, C_out) (or (T, *layout)) on stacked task streams
  (T, B, H, W, C_in)."""
  k = kernels.shape[layout_axes(layout, "u", kernels.ndim)[0]]
  return apply_prepared_kernels(x, prepare_task_kernels(kernels, task_conv, layout), task_conv, k)


def apply_kernel(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Applies one (k, k, C_in, C_out) kernel to (..., H, W, C_in) tokens ('same' zero padding)."""
  kernel = kernel.astype(x.dtype)
  if kernel.shape[0] == 1:
    return dense(x, kernel[0, 0])
  lead = x.shape[:-3]
  flat = x.reshape(1, -1, *x.shape[-3:])
  return apply_task_kernels(flat, kernel[None])[0].reshape(*lead, *x.shape[-3:-1], -1)


def channel_blur(x: jax.Array, size: int, sigma: float) -> jax.Array:
  """The 'matrix' low-pass moved onto activations: a 'same' Gaussian along the channel axis.

  lowpass(K)[i, o] = sum_{a, b} g_a g_b K[i + a - h, o + b - h] (zero outside), so for every tap
  x . lowpass(K) = blur(blur(x) . K), blur the same zero-padded correlation with g (symmetric)
  along the last axis. Exact; cheaper wherever the activations are smaller than the kernels.
  """
  return _blur_axis(x, gaussian_1d(size, sigma), x.ndim - 1)


def lowpass_on_activations(spec: SineAwbSpec, lowering: Lowering, kernels_shape,
                           inputs_shape) -> bool:
  """Whether the 'matrix' low-pass runs on the activations (see Lowering.lowpass_site)."""
  if spec.sine.lowpass != "matrix" or lowering.lowpass_site == "kernel":
    return False
  if lowering.lowpass_site == "activations":
    return True
  tokens = int(np.prod(inputs_shape[1:-1]))  # B * H * W per task
  c_in, c_out = inputs_shape[-1], kernels_shape[-1]  # C_out is last in every layout
  return tokens * (c_in + c_out) < int(np.prod(kernels_shape[1:]))


def finished_kernels(modulated: jax.Array, spec: SineAwbSpec,
                     frozen_kernel: jax.Array | None = None, layout: str = "uvio") -> jax.Array:
  """scale * lowpass(kernels), plus the frozen linear in the centre tap when given.

  Folding is exact: Phi(x) + scale (K~ * x) = (scale K~ + W_0 at the centre tap) * x + b_0.
  """
  sine = spec.sine
  kernels = spec.scale * gaussian_lowpass(modulated, sine.lowpass, sine.lowpass_size,
                                          sine.lowpass_sigma, layout)
  if frozen_kernel is None:
    return kernels
  centre = [slice(None)] * kernels.ndim
  for axis in layout_axes(layout, "uv", kernels.ndim):
    centre[axis] = kernels.shape[axis] // 2
  return kernels.at[tuple(centre)].add(frozen_kernel.astype(kernels.dtype))


def task_path(path_in: jax.Array, factors, omegas: jax.Array, spec: SineAwbSpec,
              lowering: Lowering, frozen: tuple[jax.Array, Any] | None = None) -> jax.Array:
  """The Sine-AWB task outputs from the factors: scale * (K~_t * x_t) [+ Phi(x_t)].

  path_in (T, B, H, W, Ci); factors (A, W, B) of the base(s); frozen: (W_0, b_0) when the
  frozen layer's input is path_in too (its output is then included, folded into the kernels'
  centre tap when they are smoothed there). Same function for every `lowering`.
  """
  # The named scopes only label the ops (XLA metadata) for benchmarks/op_profile.py.
  layout = kernel_layout(lowering.task_conv, spec.applied_kernel_size, path_in.shape[-1],
                         factors[2].shape[-1])

  def run(path_in, factors, omegas, frozen):
    with jax.named_scope("kernel_build"):
      modulated = modulated_kernels(*factors, omegas, spec, layout=layout)

    def conv(x, kernels):
      with jax.named_scope("kernel_apply"):
        return apply_task_kernels(x, kernels, lowering.task_conv, layout)

    if lowpass_on_activations(spec, lowering, modulated.shape, path_in.shape):
      blur = lambda z: channel_blur(z, spec.sine.lowpass_size, spec.sine.lowpass_sigma)
      with jax.named_scope("kernel_apply"):
        y = spec.scale * blur(conv(blur(path_in), modulated))
      if frozen is not None:
        y = y + (dense(path_in, frozen[0].astype(path_in.dtype)) + frozen[1])
      return y
    with jax.named_scope("kernel_build"):
      kernels = finished_kernels(modulated, spec, None if frozen is None else frozen[0], layout)
    y = conv(path_in, kernels)
    return y if frozen is None else y + frozen[1]

  if lowering.task_path_remat:
    # The input's gradient waits for the factors' and frequencies' (see recompute_in_backward).
    run = recompute_in_backward(run, finish_with=(1, 2))
  if lowering.task_loop == "stacked" or path_in.shape[0] == 1:
    return run(path_in, factors, omegas, frozen)
  # One task per iteration: its stream, its frequency and (independent bases) its factors.
  per_task = factors if spec.independent_bases else None
  one = lambda tree: jax.tree_util.tree_map(lambda a: a[None], tree)

  def task(_, inputs):
    x_t, omega_t, factors_t = inputs
    y_t = run(x_t[None], one(factors_t) if spec.independent_bases else factors, omega_t[None],
              frozen)
    return None, y_t[0]

  return jax.lax.scan(task, None, (path_in, omegas, per_task))[1]


# ----------------------------------------------------------------------------- modules


def inference_cache(module: nn.Module, name: str) -> bool:
  """Whether the weight MERGED/<name> of `module` (one that depends on the parameters only) is
  read from the MERGED collection instead of being rebuilt.

  True when it is there (inference after `merge_for_inference`) or while the merge fills the
  collection (the model run with MERGED mutable; never at init).
  """
  return module.has_variable(MERGED, name) or (not module.is_initializing()
                                               and module.is_mutable_collection(MERGED))


def cached_weight(module: nn.Module, name: str, compute) -> jax.Array:
  """MERGED/<name> of `module`, computed and stored by the first call of the merge."""
  if module.has_variable(MERGED, name):
    return module.get_variable(MERGED, name)
  value = compute()
  module.put_variable(MERGED, name, value)
  return value


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
  lowering: Lowering = Lowering()

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
  def __call__(self, path_in: jax.Array, a: jax.Array, b: jax.Array, omegas: jax.Array,
               frozen: tuple[jax.Array, Any] | None = None):
    """path_in (T, B, H, W, C_in), shared LoRA a (C_in, r), b (r, C_out), omegas (T,).

    Returns the task updates alpha * (M~_t * path_in_t), (T, B, H, W, C_out); with
    frozen = (W_0, b_0), the frozen layer applied to path_in is included (folded into the
    kernels' centre tap where they are smoothed).
    """
    if path_in.shape[0] != self.num_tasks:
      raise ValueError(f"expected {self.num_tasks} task streams, got {path_in.shape[0]}")
    factors = self.factors(a, b)
    path_in = path_in.astype(self.dtype)
    if not inference_cache(self, "task_kernels"):
      return task_path(path_in, factors, omegas, self.spec, self.lowering, frozen)
    # Inference: the finished kernels (T, k', k', C_in, C_out), frozen linear folded in, are
    # evaluated once; the same values are what tools/export writes. Each forward puts them in
    # its lowering's layout (a reshape for 'gemm' and 'conv', the 4x4 transform for 'winograd').
    kernels = cached_weight(self, "task_kernels", lambda: finished_kernels(
        modulated_kernels(*factors, omegas, self.spec), self.spec,
        None if frozen is None else frozen[0]))
    y = apply_task_kernels(path_in, kernels, self.lowering.task_conv)
    return y if frozen is None else y + frozen[1]


class AdaptedDense(nn.Module):
  """Frozen linear + shared LoRA (shared stream) + optional per-task Sine-AWB path.

  `x` is the shared stream (..., C_in). `task_inputs` (optional) is a pair
  (frozen_input, path_input): path_input stacks the T task streams (T, B, H, W, C_in);
  frozen_input is either such a stack or `x` itself. The task outputs follow the paper,
  f^t_{i+1} = Phi(f^t_i) + SineAWB_t(f'^t_i): the frozen layer plus the task's Sine-AWB update
  on the (possibly prompt-conditioned) path input. The shared LoRA adapts the shared stream; its
  factors A, B are the base of the Sine-AWB kernels.
  Returns (y_shared, y_tasks (T, B, H, W, C_out) or None); y_shared is None when
  `shared_output=False` (a shared stream nobody reads is not computed).
  At inference (MERGED collection present) the LoRA is merged into the frozen kernel,
  W_0 + scale A B, and the task kernels are read, not rebuilt. `sine_awb` may instead be a
  baseline's task-path spec (models/lora.py), whose module gives the update from (path_in, A, B),
  or an exported model's merged task path (models/merged.py), which gives the task outputs.
  """
  features: int
  lora: LoraSpec | None
  sine_awb: SineAwbSpec | None = None
  num_tasks: int = 0
  use_bias: bool = True
  policy: str = "none"
  dtype: Any = jnp.float32
  lowering: Lowering = Lowering()

  @nn.compact
  def __call__(self, x, task_inputs=None, omegas=None, *, deterministic: bool = True,
               shared_output: bool = True):
    if x is None and (shared_output or task_inputs is None):
      raise ValueError("AdaptedDense: the shared stream x is needed for a shared output")
    c_in = (x if x is not None else task_inputs[1]).shape[-1]
    kernel_0 = backbone_weight(self, "kernel", nn.initializers.truncated_normal(0.02),
                               (c_in, self.features), "linear", self.policy).astype(self.dtype)
    bias_0 = (backbone_weight(self, "bias", nn.initializers.zeros, (self.features,), "linear",
                              self.policy).astype(self.dtype) if self.use_bias else 0.0)
    frozen = lambda z: dense(z.astype(self.dtype), kernel_0) + bias_0
    a = b = log_m = None
    if self.lora is not None:
      rank = self.lora.rank
      a = self.param("lora_a", lora_a_init, (c_in, rank))
      b = self.param("lora_b", nn.initializers.zeros, (rank, self.features))
      if self.lora.form == "dora":
        log_m = self.param(dora.SHARED_MAGNITUDE, nn.initializers.zeros, (self.features,))

    def lora_delta():  # the weight the shared LoRA adds to kernel_0 (merged inference)
      if log_m is not None:
        return dora.weight_delta(kernel_0, a, b, self.lora.scale, log_m).astype(self.dtype)
      return self.lora.scale * jnp.dot(a.astype(self.dtype), b.astype(self.dtype))

    merged = a is not None and inference_cache(self, "kernel")
    frozen_in = None if task_inputs is None else task_inputs[0]
    y_frozen = None  # Phi(x), computed once for the shared stream and the task streams
    if (shared_output and not merged) or frozen_in is x:
      y_frozen = frozen(x)
    frozen_of = lambda z: y_frozen if z is x else frozen(z)

    if merged:  # W_0 + scale A B of every LoRA layer, read here or not (tools/export writes all)
      w_merged = cached_weight(self, "kernel", lambda: kernel_0 + lora_delta())
    y_shared = None
    if shared_output:
      if a is None:
        y_shared = y_frozen
      elif merged:
        y_shared = dense(x.astype(self.dtype), w_merged) + bias_0
      else:
        xd = Dropout(self.lora.dropout, self.lora.dropout_bits)(x, deterministic=deterministic)
        if log_m is not None:  # DoRA: x_drop (m V^ - W0), a C_in x C_out product (as FAAR)
          y_shared = y_frozen + dense(xd, lora_delta())
        else:
          y_shared = y_frozen + self.lora.scale * dense(dense(xd, a.astype(self.dtype)),
                                                        b.astype(self.dtype))
    if task_inputs is None:
      return y_shared, None

    path_in = task_inputs[1]
    if getattr(self.sine_awb, "gives_task_outputs", False):  # merged weights (models/merged.py)
      return y_shared, self.sine_awb.build_task_path(self.num_tasks, self.features, self.dtype)(
          frozen_in, path_in)
    if self.sine_awb is None:  # this layer carries no TS path: the task streams see the frozen layer
      return y_shared, jnp.broadcast_to(frozen_of(frozen_in),
                                        (*path_in.shape[:-1], self.features))
    if a is None:
      raise ValueError("the Sine-AWB base is sized by the LoRA rank: set model.lora.rank > 0")
    build_task_path = getattr(self.sine_awb, "build_task_path", None)
    if build_task_path is not None:  # a baseline's task path (models/lora.py)
      return y_shared, frozen_of(frozen_in) + build_task_path(
          self.num_tasks, self.features, self.dtype)(path_in, a, b, frozen_kernel=kernel_0)
    sine_awb = SineAWB(self.sine_awb, self.num_tasks, self.features, self.dtype, self.lowering,
                       name="sine_awb")
    if frozen_in is path_in:  # e.g. fc1, fc2: the frozen layer can join the task kernels
      return y_shared, sine_awb(path_in, a, b, omegas, frozen=(kernel_0, bias_0))
    return y_shared, frozen_of(frozen_in) + sine_awb(path_in, a, b, omegas)


def clock_offsets(num_tasks: int, spread: float) -> np.ndarray:
  """tanh of the Clock Net's fixed pre-tanh offsets: evenly spaced in [-spread, spread]."""
  if not 0.0 <= spread < 1.0:
    raise ValueError(f"model.clock_spread must be in [0, 1), got {spread}")
  if num_tasks == 1:
    return np.zeros((1,), np.float32)
  return (spread * np.linspace(-1.0, 1.0, num_tasks)).astype(np.float32)


def clock_offsets_by_round(generations, spread: float) -> np.ndarray:
  """clock_offsets of each round of tasks on its own (generations: per task, the round that
  added it, in order): adding tasks to a trained model keeps the old tasks' offsets."""
  generations = tuple(generations)
  return np.concatenate([clock_offsets(generations.count(g), spread)
                         for g in sorted(set(generations))]).astype(np.float32)


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
  generations: tuple[int, ...] = ()  # per task, the round that added it (() = all 0)

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: (T, C) task tokens -> (T,) frequencies."""
    s = self.param("s", nn.initializers.constant(self.s_init), ())
    c = self.param("c", nn.initializers.constant(self.c_init), ())
    q = nn.Dense(1, name="w_q")(jax.nn.relu(tokens))[:, 0]
    phi = np.arctanh(clock_offsets_by_round(self.generations or (0,) * tokens.shape[0],
                                            self.spread))
    return s * (jnp.tanh(q + phi) + c)
