"""FAAR's task-spectral pyramidal decoder (TS-PD), as its public code builds it
(Klodivio355/FAAR models/seg_hrnet.py: GlobalFilter2D_real, HighResolutionHead; model.decoder.kind
= 'tspd').

In each task's HRNet head, every projected branch b (upsampled to the finest scale, H x W, C_b
channels) goes through

1. a global filter:  x + alpha * SSF(irfft2(rfft2(x) * (1 + Delta[bin(u, v)]))),  Delta
   (16 radial bins x C_b) ~ N(0, 0.02), SSF scale ~ N(1, 0.02) and shift ~ N(0, 0.02) per
   channel, alpha from 0.6 (orthonormal FFTs);
2. a cross-task term against F_avg, the mean spectrum of the other tasks' branch b before their
   filters: in the low band (r <= 0.5) the amplitude moves toward gamma_L |F_avg| by
   s_L = 0.5 sigmoid(a_L), the phase kept; in the edge band (r >= 0.8, a ramp to 1) the spectrum
   moves toward gamma_E F_avg by s_H = 0.3 sigmoid(a_H) (a_L = a_H = 0, gamma = 1 at start);

then the branches are concatenated into the head's 1x1 conv, BN, ReLU, 1x1 conv as MTLoRA's.

The radial coordinate r of an rfft2 bin: FAAR's code lays linspace(-1, 1, H) over the rows and
linspace(0, 1, W/2 + 1) over the columns. rfft2's rows are in FFT order (0, 1, ..., H/2, ...,
-1), not centred, so that grid puts r = 0 at the middle row, the highest vertical frequency:
its "low band" holds the low horizontal and the highest vertical frequencies. grid='code' keeps
that (what FAAR trained and reported), grid='frequency' uses each bin's true frequency
(np.fft.fftfreq / rfftfreq, scaled so the Nyquist frequency is 1). docs/method.md ("Baselines").
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

GRIDS = ("code", "frequency")
BINS = 16  # FAAR's num_bins
LOW_RADIUS = 0.5  # FAAR's r_threshold: the low band, r <= 0.5
EDGE_START = 0.8  # the edge band's ramp starts here
CAP_LOW, CAP_EDGE = 0.5, 0.3  # FAAR's eug_cap_low / eug_cap_high
INIT_ALPHA = 0.6  # HighResolutionHead's init_alpha
INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class SpectralGrid:
  """Per rfft2 bin of an H x W map: its radial band index (BINS bands), low-band mask and
  edge-band weight, as numpy constants (H, W // 2 + 1)."""
  bins: np.ndarray
  low: np.ndarray
  edge: np.ndarray

  @classmethod
  def build(cls, height: int, width: int, grid: str) -> "SpectralGrid":
    if grid not in GRIDS:
      raise ValueError(f"model.decoder.tspd_grid={grid!r} is not one of {GRIDS}")
    if grid == "code":
      rows, cols = np.linspace(-1, 1, height), np.linspace(0, 1, width // 2 + 1)
    else:
      rows = np.fft.fftfreq(height) * 2.0
      cols = np.fft.rfftfreq(width) * 2.0
    y, x = np.meshgrid(rows, cols, indexing="ij")
    r = np.sqrt(np.clip(y * y + x * x, 0.0, 1.0))
    low = (r <= LOW_RADIUS).astype(np.float32)
    edge = np.clip((r - EDGE_START) / (1.0 - EDGE_START + 1e-6), 0.0, 1.0) * (1.0 - low)
    # torch.bucketize(r, boundaries, right=False): the first i with boundaries[i] >= r.
    bins = np.searchsorted(np.linspace(0.0, 1.0, BINS + 1)[1:-1], r, side="left")
    return cls(bins.astype(np.int32), low, edge.astype(np.float32))


def spectrum(x: jax.Array) -> jax.Array:
  """rfft2 over (H, W) of (..., H, W, C), orthonormal, in float32."""
  return jnp.fft.rfft2(x.astype(jnp.float32), axes=(-3, -2), norm="ortho")


def spatial(f: jax.Array, size: Sequence[int]) -> jax.Array:
  return jnp.fft.irfft2(f, s=tuple(size), axes=(-3, -2), norm="ortho")


class SpectralFilter(nn.Module):
  """Step 1: x + alpha * SSF(irfft2(rfft2(x) * (1 + Delta[bin]))) on (B, H, W, C)."""
  grid: str = "code"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels, size = x.shape[-1], x.shape[-3:-1]
    g = SpectralGrid.build(*size, self.grid)
    delta = self.param("bin_delta", nn.initializers.normal(INIT_STD), (BINS, channels))
    scale = self.param("ssf_scale", lambda k, s: 1.0 + INIT_STD * jax.random.normal(k, s),
                       (channels,))
    shift = self.param("ssf_shift", nn.initializers.normal(INIT_STD), (channels,))
    alpha = self.param("alpha", nn.initializers.constant(INIT_ALPHA), ())
    filtered = spatial(spectrum(x) * (1.0 + delta[jnp.asarray(g.bins)]), size)
    return x.astype(jnp.float32) + alpha * (filtered * scale + shift)


def cross_task(f_own: jax.Array, f_avg: jax.Array, g: SpectralGrid, a_low, a_high, gamma_low,
               gamma_edge) -> jax.Array:
  """Step 2 on spectra (B, H, W/2 + 1, C): the own spectrum's low-band amplitude pulled toward
  gamma_low |F_avg| (own phase kept), its edge band toward gamma_edge F_avg."""
  low = jnp.asarray(g.low)[:, :, None]
  edge = jnp.asarray(g.edge)[:, :, None]
  own_low, avg_low = low * f_own, low * f_avg
  mag_own, mag_avg = jnp.abs(own_low), jnp.abs(avg_low)
  phase = own_low / (mag_own + 1e-6)
  s_low = jax.nn.sigmoid(a_low) * CAP_LOW
  mixed = phase * (mag_own + s_low * (gamma_low * mag_avg - mag_own))
  out = (1.0 - low) * f_own + mixed
  s_high = jax.nn.sigmoid(a_high) * CAP_EDGE
  return out + s_high * edge * (gamma_edge * f_avg - f_own)


class TaskSpectralPyramid(nn.Module):
  """One task's TS-PD over its branches [(B, H, W, C_b)]; `donors[b]` is the mean spectrum of
  the other tasks' branch b (donor_spectra; None for a single task: no cross-task term)."""
  grid: str = "code"

  @nn.compact
  def __call__(self, branches: Sequence[jax.Array], donors) -> list[jax.Array]:
    n = len(branches)
    a_low = self.param("consensus_low", nn.initializers.zeros, (n,))
    a_high = self.param("consensus_edge", nn.initializers.zeros, (n,))
    gamma_low = self.param("anchor_low", nn.initializers.ones, (n,))
    gamma_edge = self.param("anchor_edge", nn.initializers.ones, (n,))
    out = []
    for i, x in enumerate(branches):
      y = SpectralFilter(self.grid, name=f"filter_{i}")(x)
      if donors is not None:
        size = y.shape[-3:-1]
        g = SpectralGrid.build(*size, self.grid)
        y = spatial(cross_task(spectrum(y), donors[i], g, a_low[i], a_high[i], gamma_low[i],
                               gamma_edge[i]), size)
      out.append(y.astype(x.dtype))
    return out


def donor_spectra(branches: Sequence[Sequence[jax.Array]]) -> list[list[jax.Array]] | None:
  """Per task t and branch b, the mean spectrum of the other tasks' branch b (their raw,
  unfiltered branches, as FAAR's donors); None for one task."""
  tasks = len(branches)
  if tasks < 2:
    return None
  spectra = [[spectrum(x) for x in task] for task in branches]
  totals = [sum(s[b] for s in spectra) for b in range(len(branches[0]))]
  return [[(totals[b] - spectra[t][b]) / (tasks - 1) for b in range(len(totals))]
          for t in range(tasks)]
