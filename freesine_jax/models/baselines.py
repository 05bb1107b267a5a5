"""The single-task reference row: one independent model per task, trained side by side.

`SeparateModels` holds, for each task t, a `MultiTaskModel` for (t,) alone (its own backbone,
adapters and head) under '<t>_model', and returns {task: output} like a multi-task model, so
training, evaluation and counting treat it as any other model. Trained in one run the T models
share only the data order, the schedule and the gradient-norm clipping (clipped on the global
norm of all T gradients; docs/method.md, "Baselines").
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn


class SeparateModels(nn.Module):
  tasks: Sequence[str]
  build_one: Callable[..., nn.Module]  # (task, name=...) -> the model of that task alone

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    outputs = {}
    for task in self.tasks:
      outputs.update(self.build_one(task, name=f"{task}_model")(images, train=train))
    return outputs
