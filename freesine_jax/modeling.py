"""The model a config describes and its initial variables (shared by training and evaluation).

`build_model(config)` is Free Sinewich (freesine_jax.models.builtin_model) or, when
config.model.factory names one, a custom linen model that follows the same contract: variable
collections 'backbone' (frozen), 'params' (trained) and 'batch_stats', outputs
{task: (B, H, W, C)}. `init_variables` initialises it from config.seed and loads the pretrained
backbone named by config.model.backbone_weights (a file, a converted directory, or
'proxy:<preset>', the proxy backbone of freesine_jax/pretrain.py).
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from freesine_jax import errors
from freesine_jax import models
from freesine_jax import pretrain
from freesine_jax.models import pretrained

PyTree = Any
COLLECTIONS = ("backbone", "params", "batch_stats")


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """freesine_jax.models.builtin_model(config), or the custom model config.model.factory builds."""
  factory = config.model.factory
  if not factory:
    return models.builtin_model(config)
  return errors.resolve(factory, "config.model.factory")(config)


def init_variables(model: nn.Module, config: ml_collections.ConfigDict) -> dict[str, PyTree]:
  """model.init from config.seed at config.dataset.image_size; loads pretrained backbone weights
  when config.model.backbone_weights is set. Always returns the three collections."""
  height, width = config.dataset.image_size
  k_params, k_dropout, k_path = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  images = jnp.zeros((1, int(height), int(width), 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      {"params": k_params, "dropout": k_dropout, "drop_path": k_path}, images)
  variables = flax.core.unfreeze(variables)
  if config.model.backbone_weights:
    # 'proxy:<preset>' names the proxy backbone (pretrained on first use, then cached).
    path = pretrain.resolve_weights(config.model.backbone_weights)
    variables = flax.core.unfreeze(pretrained.load_pretrained(
        path, variables, models.swin_spec(config.model), config.model.backbone_layout or None))
  unexpected = sorted(set(variables) - set(COLLECTIONS))
  if unexpected:
    raise ValueError(f"model.init returned unexpected variable collections {unexpected}; a "
                     f"model has only {COLLECTIONS}")
  return {name: variables.get(name, {}) for name in COLLECTIONS}


def count_parameters(tree: PyTree) -> int:
  """Number of scalars in a tree of arrays."""
  return sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree))
