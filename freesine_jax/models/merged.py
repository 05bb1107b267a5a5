"""The task path of merged inference weights (tools/export.py).

After export, a task-block layer holds per task one plain k x k kernel, the Sine-AWB update with
the sine, low-pass, Clock Net frequency and scale evaluated once. Where the frozen linear reads
the same stream as the task path (fc1, fc2) it is folded into the kernels' centre tap; where it
reads another input (proj: the shared attention output, while the task path reads the
prompt-conditioned one) it is kept as `frozen_kernel`. The module gives the task outputs
themselves, y_t = K_t * path_t + bias (+ frozen_in . frozen_kernel), with no LoRA, sine or
frequency left at inference.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from freesine_jax.models.adapters import apply_task_kernels
from freesine_jax.models.layers import dense


class MergedTaskPath(nn.Module):
  num_tasks: int
  features: int
  kernel_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, frozen_in, path_in):
    k, c_in = self.kernel_size, path_in.shape[-1]
    kernels = self.param("task_kernels", nn.initializers.zeros,
                         (self.num_tasks, k, k, c_in, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = apply_task_kernels(path_in.astype(self.dtype), kernels) + bias.astype(self.dtype)
    if frozen_in is not path_in:  # the frozen linear reads another input: kept apart
      frozen_kernel = self.param("frozen_kernel", nn.initializers.zeros, (c_in, self.features))
      y = y + dense(frozen_in.astype(self.dtype), frozen_kernel.astype(self.dtype))
    return y


@dataclasses.dataclass(frozen=True)
class MergedTaskPathSpec:
  """The task path of an exported model: k is the exported kernels' size."""
  kernel_size: int

  def task_outputs(self, layer, frozen_in, path_in, omegas):
    """The task outputs themselves: frozen layer and bias are in the merged kernels."""
    del omegas
    return MergedTaskPath(layer.num_tasks, layer.features, self.kernel_size, layer.dtype,
                          name="merged")(frozen_in, path_in)
