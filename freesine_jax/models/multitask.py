"""The multi-task model: Swin backbone + adapters + Clock Net + decoders.

Variables: 'backbone' (frozen pretrained Swin weights), 'params' (adapters, task tokens, Clock
Net, decoders, and whatever backbone weights the fine-tuning policy trains), 'batch_stats'.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from freesine_jax.models import adapters, decoders, swin


class MultiTaskModel(nn.Module):
  tasks: Sequence[str]
  num_outputs: Mapping[str, int]
  swin_spec: swin.SwinSpec
  adapter: swin.AdapterSpec
  decoder: decoders.DecoderSpec
  trainable_backbone: str = "none"
  clock_net: bool = True            # False: one learnable frequency per task ("w/o LCN")
  clock_s_init: float = 1.0
  clock_c_init: float = 1.0
  clock_spread: float = 0.0         # initial frequencies s (c + spread * linspace(-1, 1, T))
  use_task_tokens: bool = True
  has_frequencies: bool = True      # False: no Clock Net and no omega_t (baselines: nothing reads them)
  dtype: Any = jnp.float32
  block_remat: str = "none"         # model.compute.block_remat (swin.SwinBackbone)
  # Per task, the generation that added it: 0, or 1 for config.train.new_tasks (() = all 0). It sets
  # the Clock Net's offsets per generation; the prompts' attention mask is adapter.prompt_generations.
  task_generations: tuple[int, ...] = ()

  def setup(self):
    self.backbone = swin.SwinBackbone(self.swin_spec, self.adapter, self.trainable_backbone,
                                      self.dtype, self.block_remat)
    self.head = decoders.MultiTaskDecoder(tuple(self.tasks), dict(self.num_outputs), self.decoder,
                                          self.dtype)
    num_tasks = len(self.tasks)
    if self.use_task_tokens:
      self.task_tokens = self.param("task_tokens", nn.initializers.truncated_normal(0.02),
                                    (num_tasks, self.swin_spec.embed_dim))
    if self.has_frequencies and self.clock_net:
      self.clock = adapters.ClockNet(self.clock_s_init, self.clock_c_init, self.clock_spread,
                                     tuple(self.task_generations))
    elif self.has_frequencies:  # "w/o LCN": free per-task frequencies, started where the
      # Clock Net starts them
      generations = tuple(self.task_generations) or (0,) * num_tasks
      start = self.clock_s_init * (self.clock_c_init +
                                   adapters.clock_offsets_by_round(generations, self.clock_spread))
      self.fixed_omegas = self.param("omegas", lambda key, shape: jnp.asarray(start), (num_tasks,))

  def frequencies(self) -> jax.Array | None:
    """(T,) task frequencies omega_t (None without task frequencies)."""
    if not self.has_frequencies:
      return None
    if self.clock_net:
      return self.clock(self.task_tokens)
    return self.fixed_omegas

  def backbone_stages(self, images, *, train: bool = False, last_shared: bool = True):
    """Per stage (shared stream, stacked task streams or None), see swin.SwinBackbone."""
    omegas = self.frequencies()
    prompts = None
    if self.use_task_tokens and self.adapter.prompts:
      prompts = jnp.broadcast_to(self.task_tokens[None], (images.shape[0],
                                                          *self.task_tokens.shape))
    return self.backbone(images, prompts, omegas, train=train, last_shared=last_shared), omegas

  def encode(self, images, *, train: bool = False):
    """Per task, the list of stage features (one stream per task; shared when no TS path)."""
    stages, omegas = self.backbone_stages(images, train=train, last_shared=False)
    features = {task: [] for task in self.tasks}
    for shared, per_task in stages:
      for t, task in enumerate(self.tasks):
        features[task].append(shared if per_task is None else per_task[t])
    return features, omegas

  def __call__(self, images, *, train: bool = False):
    features, omegas = self.encode(images, train=train)
    return self.head(features, omegas, images.shape[1:3], train=train)


def merge_for_inference(model: MultiTaskModel, variables: Mapping[str, Any],
                        image_shape: Sequence[int]) -> dict[str, Any]:
  """`variables` plus the adapters.MERGED collection: every weight that depends on the
  parameters only, evaluated once (the shared LoRA merged into the frozen kernels, the finished
  task kernels with the frozen linear folded into their centre tap, the decoder's task kernels).

  The model applied to the result computes the same outputs (to float32 rounding) without
  rebuilding those weights for every batch. It is the one place weights are folded: evaluation
  caches its result, tools/export writes it as plain inference weights. image_shape: the (B, H, W, 3) shape inference will
  see (it fixes the window sizes); only the weights are computed, no image is processed. Merge
  again after the parameters change; never pass merged variables to a training step.
  """
  variables = {k: v for k, v in variables.items() if k != adapters.MERGED}
  images = jnp.zeros(tuple(image_shape), jnp.float32)
  merged = model.apply(variables, images, train=False, mutable=[adapters.MERGED])[1]
  return {**variables, **merged}
