"""Sine-AWB, the paper's task-specific (TS) module, by its name: its spec (`SineAwbSpec`, config
model.sine_awb; a `TaskPath`), the task outputs under a lowering (`sine_awb_outputs`) and the
Flax module (`SineAWB`), built on the layer's shared LoRA factors A, B:

  A: (C_in, r)   W: (k, k, r, r) ('full') or (k, k, r) ('depthwise')   B: (r, C_out)
  K~_t = scale * lowpass((rho / omega_0) sin(omega_0 omega_t A.W.B / rho));
  update_t(x) = conv(x, K~_t)

The sine's argument has RMS omega_0 omega_t whatever the weights' scale (docs/method.md). With B
zero-initialised, A.W.B = 0 and every update is exactly zero at step 0. The maths is maths.py,
the lowerings lowering.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from freesine_jax.models.adapters.dense import cached_weight, inference_cache, lora_a_init
from freesine_jax.models.adapters.lowering import (apply_task_kernels, kernel_layout,
                                                   lowpass_on_activations)
from freesine_jax.models.adapters.maths import (SineSpec, channel_blur, finished_kernels,
                                                modulated_kernels)
from freesine_jax.models.adapters.spec import TaskPathCompute, check_choice
from freesine_jax.models.layers import dense, recompute_in_backward


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
    check_choice("model.sine_awb", "w_mode", self.w_mode, ("full", "depthwise"))
    check_choice("model.sine_awb", "w_init", self.w_init, ("identity", "kaiming"))
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(
          f"model.sine_awb.kernel_size must be odd and >= 1, got {self.kernel_size}")

  @property
  def applied_kernel_size(self) -> int:
    """Taps of the applied kernels: 'taps_full' grows k by lowpass_size - 1."""
    if self.sine.lowpass == "taps_full":
      return self.kernel_size + self.sine.lowpass_size - 1
    return self.kernel_size

  def task_outputs(self, layer, frozen_in, path_in, omegas):
    """Phi(frozen_in) + SineAWB_t(path_in_t); where both read the same stream (fc1, fc2) the
    frozen layer joins the task kernels."""
    a, b = layer.shared_factors("Sine-AWB")
    sine_awb = SineAWB(self, layer.num_tasks, layer.features, layer.dtype, layer.compute,
                       name="sine_awb")
    if frozen_in is path_in:
      return sine_awb(path_in, a, b, omegas, frozen=(layer.kernel_0, layer.bias_0))
    return layer.frozen_of(frozen_in) + sine_awb(path_in, a, b, omegas)


def sine_awb_outputs(path_in: jax.Array, factors, omegas: jax.Array, spec: SineAwbSpec,
              compute: TaskPathCompute, frozen: tuple[jax.Array, Any] | None = None) -> jax.Array:
  """The Sine-AWB task outputs from the factors: scale * (K~_t * x_t) [+ Phi(x_t)].

  path_in (T, B, H, W, Ci); factors (A, W, B) of the base(s); frozen: (W_0, b_0) when the
  frozen layer's input is path_in too (its output is then included, folded into the kernels'
  centre tap when they are smoothed there). Same function for every `compute`.
  """
  # The named scopes only label the ops (XLA metadata) for benchmarks/op_profile.py.
  layout = kernel_layout(compute.task_conv, spec.applied_kernel_size, path_in.shape[-1],
                         factors[2].shape[-1])

  def run(path_in, factors, omegas, frozen):
    with jax.named_scope("kernel_build"):
      modulated = modulated_kernels(*factors, omegas, spec, layout=layout)

    def conv(x, kernels):
      with jax.named_scope("kernel_apply"):
        return apply_task_kernels(x, kernels, compute.task_conv, layout)

    if lowpass_on_activations(spec, compute, modulated.shape, path_in.shape):
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

  if compute.task_path_remat:
    # The input's gradient waits for the factors' and frequencies' (see recompute_in_backward).
    run = recompute_in_backward(run, finish_with=(1, 2))
  if compute.task_loop == "stacked" or path_in.shape[0] == 1:
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
  compute: TaskPathCompute = TaskPathCompute()

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
      return sine_awb_outputs(path_in, factors, omegas, self.spec, self.compute, frozen)
    # Inference: the finished kernels (T, k', k', C_in, C_out), frozen linear folded in, are
    # evaluated once; the same values are what tools/export writes. Each forward puts them in
    # its lowering's layout (a reshape for 'gemm' and 'conv', the 4x4 transform for 'winograd').
    kernels = cached_weight(self, "task_kernels", lambda: finished_kernels(
        modulated_kernels(*factors, omegas, self.spec), self.spec,
        None if frozen is None else frozen[0]))
    y = apply_task_kernels(path_in, kernels, self.compute.task_conv)
    return y if frozen is None else y + frozen[1]
