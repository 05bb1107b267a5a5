"""Multi-scale decoders: per-task projections, the HRNet-style head, the shared decoder group.

Each task's stage features (4 scales) are projected to [18, 36, 72, 144] channels, upsampled to
the finest scale and concatenated (270 ch). MTLoRA/TADFormer then run a per-task HRNet head
(270 -> 1080 conv, BN, ReLU, 1x1 conv; FAAR filters each branch first, tspd.py). Free Sinewich
replaces the per-task 270 -> 1080 conv by one shared base modulated by each task's frequency
with the same sine and low-pass as the encoder's Sine-AWB (adapters.SineSpec):
h_t = M~_t * x_t + b + b_t.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from freesine_jax.models import adapters
from freesine_jax.models import layers
from freesine_jax.models import tspd


KINDS = ("shared", "independent", "tspd")


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  # 'shared' (Free Sinewich) | 'independent' (HRNet) | 'tspd' (HRNet + FAAR's TS-PD, tspd.py)
  kind: str = "shared"
  proj_channels: tuple[int, ...] = (18, 36, 72, 144)
  head_channels: int = 1080
  sine: adapters.SineSpec = adapters.SineSpec(section="model.decoder")  # the shared base's
  tspd_grid: str = "code"  # tspd.GRIDS: FAAR's code's radial grid or the true frequencies

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"model.decoder.kind={self.kind!r} is not one of {KINDS}")
    if self.tspd_grid not in tspd.GRIDS:
      raise ValueError(f"model.decoder.tspd_grid={self.tspd_grid!r} is not one of {tspd.GRIDS}")
    if self.sine.lowpass not in ("matrix", "none"):
      raise ValueError(f"model.decoder.lowpass={self.sine.lowpass!r} is not one of "
                       "('matrix', 'none') (the decoder base is a 1x1 conv: it has no taps)")


def _upsample_axis(x: jax.Array, axis: int, factor: int) -> jax.Array:
  """Bilinear upsampling by an integer factor along one axis (align_corners=False).

  Output s*i + r samples the input at i + (r + 0.5)/s - 0.5, clamped to the edge: a blend of
  x[i-1], x[i], x[i+1] with weights fixed per r, so it is three broadcast products of the
  edge-padded input (5 FLOPs per output) instead of jax.image.resize's dense resize matrix
  (2 * input-length FLOPs per output).
  """
  offsets = (np.arange(factor) + 0.5) / factor - 0.5  # in (-0.5, 0.5)
  weights = np.stack([np.maximum(-offsets, 0), 1 - np.abs(offsets), np.maximum(offsets, 0)])
  n = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 1)
  xp = jnp.pad(x, pad, mode="edge")
  shape = [1] * (x.ndim + 1)
  shape[axis + 1] = factor
  out = sum(jnp.expand_dims(jax.lax.slice_in_dim(xp, d, d + n, axis=axis), axis + 1)
            * jnp.asarray(weights[d].reshape(shape), x.dtype) for d in range(3))
  return out.reshape(*x.shape[:axis], n * factor, *x.shape[axis + 1:])


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of (B, H, W, C) to size (align_corners=False, as PyTorch's default).

  Integer upsampling factors (every resize of the model's decoders) use `_upsample_axis`, equal
  to jax.image.resize to float rounding (tests/test_model.py); other sizes use jax.image.resize.
  """
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  factors = [out // n if out % n == 0 else 0 for out, n in zip(size, x.shape[1:3])]
  if all(f >= 1 for f in factors):
    for axis, factor in zip((1, 2), factors):
      if factor > 1:
        x = _upsample_axis(x, axis, factor)
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


class ScaleProjections(nn.Module):
  """Per task: a bias-free 1x1 conv per scale (as MTLoRA's downsampler), upsample to the finest
  scale, concatenate."""
  channels: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], matrix: jax.Array | None = None, *,
               concatenate: bool = True):
    """The concatenation (B, H_0, W_0, sum(channels)); with `matrix` (sum(channels), C_out), the
    concatenation times matrix, computed as sum_i upsample(y_i . matrix_i) with matrix_i the
    rows of scale i: exact (upsampling is linear and acts per channel), and each scale's
    product runs at its own resolution instead of the finest (at 448, 4 x 1.6 GFLOP per image
    fewer for the shared decoder's 270 -> 1080 base). concatenate=False: the upsampled
    projections as a list (TS-PD filters each)."""
    if len(features) != len(self.channels):
      raise ValueError(f"got {len(features)} feature scales for {len(self.channels)} projections")
    size = features[0].shape[1:3]
    outs = []
    start = 0
    for i, (f, ch) in enumerate(zip(features, self.channels)):
      y = layers.Conv1x1(ch, use_bias=False, dtype=self.dtype, name=f"proj_{i}")(f)
      if matrix is not None:
        y = layers.dense(y, matrix[start:start + ch].astype(y.dtype))
        start += ch
      outs.append(resize_bilinear(y, size))
    if matrix is not None:
      return sum(outs)
    return jnp.concatenate(outs, axis=-1) if concatenate else outs


class HRNetHead(nn.Module):
  """270 -> head_channels 1x1 conv, BN, ReLU, 1x1 conv to the task's outputs.

  With input_conv=False the first conv is left out (the shared decoder group supplies it).
  """
  num_outputs: int
  head_channels: int = 1080
  input_conv: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    if self.input_conv:
      x = layers.Conv1x1(self.head_channels, dtype=self.dtype, name="conv_in")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                     name="bn")(x)
    return layers.Conv1x1(self.num_outputs, dtype=self.dtype, name="conv_out")(nn.relu(x))


class MultiTaskDecoder(nn.Module):
  """Decodes {task: [4 stage features]} into {task: (B, H_out, W_out, C_task)}."""
  tasks: Sequence[str]
  num_outputs: Mapping[str, int]
  spec: DecoderSpec
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, task_features: Mapping[str, Sequence[jax.Array]], omegas, out_size, *,
               train: bool):
    spec = self.spec
    concat_channels = sum(spec.proj_channels)
    if spec.kind == "shared":
      base = self.param("base_kernel", nn.initializers.lecun_normal(),
                        (1, 1, concat_channels, spec.head_channels))
      base_bias = self.param("base_bias", nn.initializers.zeros, (spec.head_channels,))
      # All tasks' kernels from the one base (T, 1, 1, 270, head_channels); evaluated once for
      # inference (adapters.MERGED).
      build = lambda: spec.sine.kernels(base, omegas)
      kernels = (adapters.cached_weight(self, "task_kernels", build)
                 if adapters.inference_cache(self, "task_kernels") else build())
    projections = {task: ScaleProjections(spec.proj_channels, self.dtype,
                                          name=f"{task}_projections") for task in self.tasks}
    if spec.kind == "tspd":  # each task's branches, and the other tasks' mean spectra of them
      branches = {task: projections[task](task_features[task], concatenate=False)
                  for task in self.tasks}
      donors = tspd.donor_spectra([branches[task] for task in self.tasks])
    outputs = {}
    for t, task in enumerate(self.tasks):
      head = HRNetHead(self.num_outputs[task], spec.head_channels,
                       input_conv=spec.kind != "shared", dtype=self.dtype, name=f"{task}_head")
      if spec.kind == "independent":
        y = head(projections[task](task_features[task]), train=train)
      elif spec.kind == "tspd":
        filtered = tspd.TaskSpectralPyramid(spec.tspd_grid, name=f"{task}_spectral")(
            branches[task], None if donors is None else donors[t])
        y = head(jnp.concatenate(filtered, axis=-1), train=train)
      else:
        # b and b_t feed straight into BatchNorm, which removes any per-channel constant: they
        # get zero gradient and stay 0 (kept for the paper's parameter count, docs/method.md).
        task_bias = self.param(f"{task}_bias", nn.initializers.zeros, (spec.head_channels,))
        # M~_t (1 x 1) applied to the concatenated projections, scale by scale.
        h = projections[task](task_features[task], kernels[t][0, 0]) + base_bias + task_bias
        y = head(h.astype(self.dtype), train=train)
      outputs[task] = resize_bilinear(y, out_size).astype(jnp.float32)
    return outputs
