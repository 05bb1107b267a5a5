"""Sine-AWB's maths, one function per step of the paper: fuse A.W.B (`fuse_awb`), normalise
and modulate per task (`modulate`, `SineSpec`), low-pass (`gaussian_lowpass`), scale and fold
the frozen linear (`finished_kernels`). Kernels are (k, k, C_in, C_out) ('uvio') unless a
`layout` says otherwise (spec.KERNEL_LAYOUTS).

  M_AWB[u, v, i, o] = sum_{l, j} A[i, l] W[u, v, l, j] B[j, o]
  M_t = (rho / omega_0) sin(omega_0 omega_t M_AWB / rho), rho = RMS per tap
  K~_t = scale * lowpass(M_t)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from freesine_jax.models.adapters.spec import (BASE_NORMS, KERNEL_LAYOUTS, LOWPASS_MODES,
                                               MODULATIONS, check_choice)

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
    check_choice(self.section, "modulation", self.modulation, MODULATIONS)
    check_choice(self.section, "base_norm", self.base_norm, BASE_NORMS)
    check_choice(self.section, "lowpass", self.lowpass, LOWPASS_MODES)
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


def layout_axes(layout: str, letters: str, ndim: int) -> tuple[int, ...]:
  """Positions of kernel axes ('u', 'v' taps; 'i', 'o' channels) in an array of `ndim` axes
  whose last four are one kernel in `layout` (KERNEL_LAYOUTS)."""
  check_choice("sine_awb", "kernel layout", layout, KERNEL_LAYOUTS)
  return tuple(ndim - 4 + layout.index(letter) for letter in letters)


def fuse_awb(a: jax.Array, w: jax.Array, b: jax.Array, layout: str = "uvio") -> jax.Array:
  """M_AWB from A (C_in, r), W (k,k,r,r) or (k,k,r), B (r, C_out): (k, k, C_in, C_out), or
  (C_in, k, k, C_out) for layout 'iuvo'.

  One GEMM against the small product of the other two factors, whose output rows are already
  in the layout's order (an einsum left XLA free to produce M transposed and copy it back).
  """
  if w.ndim not in (3, 4):
    raise ValueError(f"W must be (k,k,r,r) or (k,k,r); got shape {w.shape}")
  check_choice("sine_awb", "kernel layout", layout, KERNEL_LAYOUTS)
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
  check_choice("lowpass", "mode", mode, LOWPASS_MODES)
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
  check_choice("sine", "base_norm", base_norm, BASE_NORMS)
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
                      spec: Any, modulation: str | None = None,
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
                     spec: Any, modulation: str | None = None) -> jax.Array:
  """M~_t for every task: (T, k', k', C_in, C_out), from one base or per-task bases.

  Shared base: a (C_in, r), w (k,k,r,r)|(k,k,r), b (r, C_out). Independent bases
  (spec.independent_bases): the same with a leading task axis. `modulation='linear'` gives the
  linear counterparts L_t (what the analysis compares the kernels with).
  """
  sine = spec.sine
  return gaussian_lowpass(modulated_kernels(a, w, b, omegas, spec, modulation), sine.lowpass,
                          sine.lowpass_size, sine.lowpass_sigma)


def channel_blur(x: jax.Array, size: int, sigma: float) -> jax.Array:
  """The 'matrix' low-pass moved onto activations: a 'same' Gaussian along the channel axis.

  lowpass(K)[i, o] = sum_{a, b} g_a g_b K[i + a - h, o + b - h] (zero outside), so for every tap
  x . lowpass(K) = blur(blur(x) . K), blur the same zero-padded correlation with g (symmetric)
  along the last axis. Exact; cheaper wherever the activations are smaller than the kernels.
  """
  return _blur_axis(x, gaussian_1d(size, sigma), x.ndim - 1)


def finished_kernels(modulated: jax.Array, spec: Any,
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
