"""Multi-scale decoders: per-task projections, the HRNet-style head, the shared decoder group.

Each task's stage features (4 scales) are projected to [18, 36, 72, 144] channels, upsampled to
the finest scale and concatenated (270 ch). MTLoRA/TADFormer then run a per-task HRNet head
(270 -> 1080 conv, BN, ReLU, 1x1 conv). Free Sinewich replaces the per-task 270 -> 1080 conv by
one shared base modulated by each task's frequency with the same sine and low-pass as the
encoder's Sine-AWB (adapters.SineSpec): h_t = M~_t * x_t + b + b_t.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from freesine_jax.models import adapters


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
  kind: str = "shared"                       # 'shared' (Free Sinewich) | 'independent' (HRNet)
  proj_channels: tuple[int, ...] = (18, 36, 72, 144)
  head_channels: int = 1080
  sine: adapters.SineSpec = adapters.SineSpec(section="model.decoder")  # the shared base's

  def __post_init__(self):
    if self.kind not in ("shared", "independent"):
      raise ValueError(f"model.decoder.kind={self.kind!r} is not one of ('shared', 'independent')")
    if self.sine.lowpass not in ("matrix", "none"):
      raise ValueError(f"model.decoder.lowpass={self.sine.lowpass!r} is not one of "
                       "('matrix', 'none') (the decoder base is a 1x1 conv: it has no taps)")


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of (B, H, W, C) to size (align_corners=False, as PyTorch's default)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


class ScaleProjections(nn.Module):
  """Per task: a bias-free 1x1 conv per scale (as MTLoRA's downsampler), upsample to the finest
  scale, concatenate."""
  channels: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]):
    if len(features) != len(self.channels):
      raise ValueError(f"got {len(features)} feature scales for {len(self.channels)} projections")
    size = features[0].shape[1:3]
    outs = []
    for i, (f, ch) in enumerate(zip(features, self.channels)):
      y = nn.Conv(ch, (1, 1), use_bias=False, dtype=self.dtype, name=f"proj_{i}")(f)
      outs.append(resize_bilinear(y, size))
    return jnp.concatenate(outs, axis=-1)


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
      x = nn.Conv(self.head_channels, (1, 1), dtype=self.dtype, name="conv_in")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                     name="bn")(x)
    return nn.Conv(self.num_outputs, (1, 1), dtype=self.dtype, name="conv_out")(nn.relu(x))


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
    outputs = {}
    for t, task in enumerate(self.tasks):
      x = ScaleProjections(spec.proj_channels, self.dtype, name=f"{task}_projections")(
          task_features[task])
      head = HRNetHead(self.num_outputs[task], spec.head_channels,
                       input_conv=spec.kind == "independent", dtype=self.dtype,
                       name=f"{task}_head")
      if spec.kind == "independent":
        y = head(x, train=train)
      else:
        # b and b_t feed straight into BatchNorm, which removes any per-channel constant: they
        # get zero gradient and stay 0 (kept for the paper's parameter count, docs/method.md).
        task_bias = self.param(f"{task}_bias", nn.initializers.zeros, (spec.head_channels,))
        h = adapters.apply_kernel(x.astype(self.dtype), kernels[t]) + base_bias + task_bias
        y = head(h.astype(self.dtype), train=train)
      outputs[task] = resize_bilinear(y, out_size).astype(jnp.float32)
    return outputs
