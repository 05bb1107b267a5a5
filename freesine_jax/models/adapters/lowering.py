"""How the task kernels are applied: exact rewrites of one function, chosen by model.compute
(`spec.TaskPathCompute`) for speed and memory only (docs/method.md, "Computation").

Per-task kernels (T, k, k, C_in, C_out) applied to stacked task streams (T, B, H, W, C_in),
'same' zero padding: `prepare_task_kernels` puts them in the layout a `task_conv` mode consumes,
`apply_prepared_kernels` applies them; `apply_task_kernels` does both. The modes ('gemm',
'conv', 'winograd') are the objects of `TASK_CONV_MODES`, each with `prepare` and `apply`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from freesine_jax.models.adapters.maths import layout_axes
from freesine_jax.models.adapters.spec import KERNEL_LAYOUTS, TASK_CONVS, TaskPathCompute, check_choice
from freesine_jax.models.layers import per_task_dense


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


# ----------------------------------------------------------------------------- the modes
#
# Each model.compute.task_conv is one small object: `prepare` puts the task kernels
# (T, k, k, C_in, C_out), k > 1, in the layout it multiplies by (once per step, or once for
# inference); `apply` gives the stacked task streams (T, B, H, W, C_in) through them,
# (T, B, H, W, C_out), 'same' zero padding. k = 1 kernels are plain per-task matrices for all.


@dataclasses.dataclass(frozen=True)
class GemmTaskConv:
  """'gemm' (CPU default): one GEMM per task whose contraction runs over the k*k taps stacked
  with the channels: im2col on the input when C_in <= C_out, else the taps stacked on the output
  and shift-added (`gather_taps` / `sum_taps`)."""

  def prepare(self, kernels: jax.Array) -> jax.Array:
    t, k, _, ci, co = kernels.shape
    if _im2col_on_input(ci, co):
      return kernels.reshape(t, k * k * ci, co)                      # taps major, then Ci
    return kernels.transpose(0, 3, 1, 2, 4).reshape(t, ci, k * k * co)

  def apply(self, x: jax.Array, prepared: jax.Array, k: int) -> jax.Array:
    t, bsz, h, w, ci = x.shape
    if prepared.shape[1] == k * k * ci:  # im2col layout
      patches = gather_taps(x, k).reshape(t, bsz, h, w, k * k * ci)
      return per_task_dense(patches, prepared)
    z = per_task_dense(x, prepared)
    return sum_taps(z.reshape(t, bsz, h, w, k * k, -1), k)


@dataclasses.dataclass(frozen=True)
class GroupedConvTaskConv:
  """'conv': one lax.conv_general_dilated with the tasks as feature groups (the TPU/GPU
  recommendation: native convolution units, no k*k-times copy of the activations)."""

  def prepare(self, kernels: jax.Array) -> jax.Array:
    t, k, _, ci, co = kernels.shape
    return kernels.transpose(1, 2, 3, 0, 4).reshape(k, k, ci, t * co)  # HWIO, tasks = groups

  def apply(self, x: jax.Array, prepared: jax.Array, k: int) -> jax.Array:
    del k
    t, bsz, h, w, ci = x.shape
    grouped = jnp.moveaxis(x, 0, -2).reshape(bsz, h, w, t * ci)
    y = jax.lax.conv_general_dilated(grouped, prepared, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=t)
    return jnp.moveaxis(y.reshape(bsz, h, w, t, -1), -2, 0)


@dataclasses.dataclass(frozen=True)
class WinogradTaskConv:
  """'winograd': F(2x2, 3x3), 2.25x fewer multiplies, 3x3 kernels only (float32 error measured
  in docs/benchmarks.md)."""

  def prepare(self, kernels: jax.Array) -> jax.Array:
    k = kernels.shape[1]
    if k != 3:
      raise ValueError(f"model.compute.task_conv='winograd' is F(2x2, 3x3): needs 3x3 kernels, "
                       f"got {k}x{k}")
    return _winograd_kernels(kernels)

  def apply(self, x: jax.Array, prepared: jax.Array, k: int) -> jax.Array:
    del k
    return _winograd_apply(x, prepared)


# model.compute.task_conv -> its mode (the names are spec.TASK_CONVS).
TASK_CONV_MODES = {"gemm": GemmTaskConv(), "conv": GroupedConvTaskConv(),
                   "winograd": WinogradTaskConv()}


def task_conv_mode(task_conv: str):
  """The mode object of a model.compute.task_conv name."""
  if task_conv not in TASK_CONV_MODES:
    raise ValueError(f"model.compute.task_conv={task_conv!r} is not one of {TASK_CONVS}")
  return TASK_CONV_MODES[task_conv]


def prepare_task_kernels(kernels: jax.Array, task_conv: str, layout: str = "uvio") -> jax.Array:
  """Task kernels (T, k, k, Ci, Co) (or (T, *layout)) in the layout `apply_prepared_kernels`
  consumes."""
  check_choice("sine_awb", "kernel layout", layout, KERNEL_LAYOUTS)
  if layout == "iuvo":  # (T, Ci, k, k, Co)
    t, ci, k, _, co = kernels.shape
    if kernel_layout(task_conv, k, ci, co) == "iuvo":
      return kernels.reshape(t, ci, k * k * co)                      # Ci, then taps major
    kernels = kernels.transpose(0, 2, 3, 1, 4)
  if kernels.shape[1] == 1:
    return kernels[:, 0, 0]                                          # (T, Ci, Co)
  return task_conv_mode(task_conv).prepare(kernels)


def apply_prepared_kernels(x: jax.Array, prepared: jax.Array, task_conv: str,
                           kernel_size: int) -> jax.Array:
  """Stacked task streams (T, B, H, W, Ci) through prepared task kernels -> (T, B, H, W, Co)."""
  prepared = prepared.astype(x.dtype)
  if kernel_size == 1:
    return per_task_dense(x, prepared)
  return task_conv_mode(task_conv).apply(x, prepared, kernel_size)


def apply_task_kernels(x: jax.Array, kernels: jax.Array, task_conv: str = "gemm",
                       layout: str = "uvio") -> jax.Array:
  """Per-task kernels (T, k, k, C_in, C_out) (or (T, *layout)) on stacked task streams
  (T, B, H, W, C_in)."""
  k = kernels.shape[layout_axes(layout, "u", kernels.ndim)[0]]
  return apply_prepared_kernels(x, prepare_task_kernels(kernels, task_conv, layout), task_conv, k)


def lowpass_on_activations(spec: Any, compute: TaskPathCompute, kernels_shape,
                           inputs_shape) -> bool:
  """Whether the 'matrix' low-pass runs on the activations (see TaskPathCompute.lowpass_site)."""
  if spec.sine.lowpass != "matrix" or compute.lowpass_site == "kernel":
    return False
  if compute.lowpass_site == "activations":
    return True
  tokens = int(np.prod(inputs_shape[1:-1]))  # B * H * W per task
  c_in, c_out = inputs_shape[-1], kernels_shape[-1]  # C_out is last in every layout
  return tokens * (c_in + c_out) < int(np.prod(kernels_shape[1:]))
