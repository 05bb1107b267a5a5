"""The adapted linear layer and the task-path protocol.

`AdaptedDense` is a frozen linear + the shared LoRA on the shared stream (TA module) + a task
path on the task streams. Every task path (model.task_path: Sine-AWB, MTLoRA's task LoRA,
TADFormer's dynamic filter, none, or an exported model's merged kernels) is a frozen dataclass
with one method, `task_outputs(layer, frozen_in, path_in, omegas)` (`TaskPath`), which
AdaptedDense calls at one place with the layer's weights (`TaskPathLayer`). At inference the
weights that depend on the parameters only are read from the MERGED collection
(`inference_cache`, `cached_weight`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from freesine_jax.models import dora
from freesine_jax.models.adapters.spec import MERGED, LoraSpec, TaskPathCompute
from freesine_jax.models.layers import Dropout, backbone_weight, dense


def lora_a_init(key, shape, dtype=jnp.float32):
  """PyTorch's kaiming_uniform_(a=sqrt(5)) on an (r, C_in) weight: U(-1/sqrt(C_in), 1/sqrt(C_in))."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class TaskPathLayer:
  """What a layer gives its task path: its sizes and compute choices, its frozen weights W_0,
  b_0 (and `frozen_of(z)`, the frozen layer applied to z, computed once where z is the shared
  stream) and the shared LoRA factors A, B (None without a shared LoRA)."""
  num_tasks: int
  features: int
  dtype: Any
  compute: TaskPathCompute
  kernel_0: jax.Array
  bias_0: Any
  lora_a: jax.Array | None
  lora_b: jax.Array | None
  frozen_of: Callable[[jax.Array], jax.Array]

  def shared_factors(self, what: str) -> tuple[jax.Array, jax.Array]:
    """(A, B), or a ValueError naming `what` needs them."""
    if self.lora_a is None:
      raise ValueError(f"{what} is built on the shared LoRA (sized by its rank): set "
                       "model.lora.rank > 0")
    return self.lora_a, self.lora_b


class TaskPath(Protocol):
  """A task path: builds its modules as children of the calling layer (inside AdaptedDense's
  compact __call__, so their parameters keep the layer's scope) and returns each task stream's
  output of the layer, (T, B, H, W, C_out), frozen part included."""

  def task_outputs(self, layer: TaskPathLayer, frozen_in: jax.Array, path_in: jax.Array,
                   omegas: jax.Array | None) -> jax.Array:
    ...


@dataclasses.dataclass(frozen=True)
class NoTaskPath:
  """No task-specific update: each task stream sees the frozen layer (model.task_path = 'none',
  and every layer outside model.task_path_modules)."""

  def task_outputs(self, layer, frozen_in, path_in, omegas):
    del omegas
    return jnp.broadcast_to(layer.frozen_of(frozen_in), (*path_in.shape[:-1], layer.features))


NO_TASK_PATH = NoTaskPath()


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


class AdaptedDense(nn.Module):
  """Frozen linear + shared LoRA (shared stream) + the task path of the task streams.

  `x` is the shared stream (..., C_in). `task_inputs` (optional) is a pair
  (frozen_input, path_input): path_input stacks the T task streams (T, B, H, W, C_in);
  frozen_input is either such a stack or `x` itself. The task outputs follow the paper,
  f^t_{i+1} = Phi(f^t_i) + SineAWB_t(f'^t_i): the frozen layer plus the task's Sine-AWB update
  on the (possibly prompt-conditioned) path input. The shared LoRA adapts the shared stream; its
  factors A, B are the base of the Sine-AWB kernels.
  Returns (y_shared, y_tasks (T, B, H, W, C_out) or None); y_shared is None when
  `shared_output=False` (a shared stream nobody reads is not computed).
  At inference (MERGED collection present) the LoRA is merged into the frozen kernel,
  W_0 + scale A B, and the task kernels are read, not rebuilt. `task_path` is any `TaskPath`:
  Sine-AWB, a baseline's (models/lora.py), an exported model's merged kernels
  (models/merged.py), or none.
  """
  features: int
  lora: LoraSpec | None
  task_path: TaskPath = NO_TASK_PATH
  num_tasks: int = 0
  use_bias: bool = True
  trainable_backbone: str = "none"
  dtype: Any = jnp.float32
  compute: TaskPathCompute = TaskPathCompute()

  @nn.compact
  def __call__(self, x, task_inputs=None, omegas=None, *, deterministic: bool = True,
               shared_output: bool = True):
    if x is None and (shared_output or task_inputs is None):
      raise ValueError("AdaptedDense: the shared stream x is needed for a shared output")
    c_in = (x if x is not None else task_inputs[1]).shape[-1]
    kernel_0 = backbone_weight(self, "kernel", nn.initializers.truncated_normal(0.02),
                               (c_in, self.features), "linear",
                               self.trainable_backbone).astype(self.dtype)
    bias_0 = (backbone_weight(self, "bias", nn.initializers.zeros, (self.features,), "linear",
                              self.trainable_backbone).astype(self.dtype) if self.use_bias else 0.0)
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

    layer = TaskPathLayer(self.num_tasks, self.features, self.dtype, self.compute, kernel_0,
                          bias_0, a, b, frozen_of)
    return y_shared, self.task_path.task_outputs(layer, frozen_in, task_inputs[1], omegas)
