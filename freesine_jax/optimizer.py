"""The optimizer and its learning-rate schedule (MTLoRA's recipe, docs/design.md §3).

AdamW (config.optim.b1/b2/eps) with decoupled weight decay on 'params' leaves of ndim >= 2,
after clipping the gradient's global norm; the learning rate warms up linearly, then follows a
cosine per step, and scales linearly with the global batch (lr = lr_base * batch / 512).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from freesine_jax import pdrs

PyTree = Any


def scaled_learning_rates(config: ml_collections.ConfigDict,
                          global_batch: int) -> tuple[float, float, float]:
  """(peak lr, warmup-start lr, final lr), linearly scaled by global_batch / 512 (MTLoRA)."""
  optim = config.optim
  scale = global_batch / float(optim.lr_reference_batch) if optim.scale_lr_with_batch else 1.0
  return optim.lr_base * scale, optim.warmup_lr_base * scale, optim.min_lr_base * scale


def make_schedule(peak_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int,
                  total_steps: int) -> optax.Schedule:
  """Per-step linear warmup warmup_lr -> peak_lr, then cosine peak_lr -> min_lr.

  Equals timm's CosineLRScheduler with warmup_prefix=True as MTLoRA configures it: at step
  t < W, lr = warmup_lr + t (peak − warmup_lr) / W; at t >= W, lr = min_lr + ½ (peak − min_lr)
  (1 + cos(π (t − W) / (T − W))), and min_lr after T.
  """
  warmup_steps = int(warmup_steps)
  decay_steps = max(int(total_steps) - warmup_steps, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = warmup_lr + (peak_lr - warmup_lr) * t / max(warmup_steps, 1)
    frac = jnp.clip((t - warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(t < warmup_steps, warm, cosine)

  return schedule


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for leaves with ndim >= 2 (kernels, LoRA factors, tokens); biases, norms exempt."""
  return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   rank_selection: pdrs.PdrsSpec | None = None) -> optax.GradientTransformation:
  """clip_by_global_norm (unless optim.grad_clip <= 0) -> AdamW with masked weight decay; with
  `rank_selection` (pdrs.spec_from_config: FAAR's), AdamW inside its rank selection
  (pdrs.transformation, which scores the clipped gradients as FAAR does). Reads config.optim
  only, so the proxy pretraining's config builds it too."""
  optim = config.optim
  parts = []
  if optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
  adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=weight_decay_mask)
  if rank_selection is not None:
    adamw = pdrs.transformation(rank_selection, adamw)
  parts.append(adamw)
  return optax.chain(*parts)
