"""Training / optimisation / evaluation defaults shared by every experiment config.

Dataset and model config files call `add_training_defaults(config)` (or merge the fragments
themselves) and override what differs. Values follow MTLoRA's recipe (docs/design.md §3):
AdamW (0.9, 0.999, eps 1e-8), weight decay 0.05 on >=2-D weights only, gradient clipping at
global norm 5.0, linear warmup over 20 epochs then cosine to min_lr over 300 epochs, per step,
learning rates scaled linearly by the global batch size over 512.
"""
from __future__ import annotations

import ml_collections


def optim_config() -> ml_collections.ConfigDict:
  """config.optim: AdamW + warmup/cosine schedule (rates are per 512 examples)."""
  c = ml_collections.ConfigDict()
  c.lr_base = 5e-4            # peak lr for a global batch of `lr_reference_batch`
  c.warmup_lr_base = 5e-7     # lr at step 0
  c.min_lr_base = 5e-6        # lr at the end of the cosine
  c.lr_reference_batch = 512  # lr = lr_base * global_batch / lr_reference_batch
  c.scale_lr_with_batch = True
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.05       # applied to 'params' leaves with ndim >= 2 only
  c.grad_clip = 5.0           # global-norm clipping; <= 0 disables
  return c


def train_config() -> ml_collections.ConfigDict:
  """config.train: loop length, logging, checkpointing."""
  c = ml_collections.ConfigDict()
  c.num_epochs = 300
  c.warmup_epochs = 20
  # Optional hard cap on the number of steps (None: num_epochs * steps_per_epoch). The
  # schedule always spans num_epochs, so capping does not change the lr at a given step.
  c.max_steps = ml_collections.FieldReference(None, field_type=int)
  # Optional override of the examples per epoch (None: read from the train split).
  c.num_train_examples = ml_collections.FieldReference(None, field_type=int)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.max_checkpoints_to_keep = 3
  c.eval_every_steps = 0      # 0: evaluate only at the end
  c.untrained_baseline = True  # evaluate the step-0 model to report "beats untrained"
  c.async_checkpointing = True
  return c


def eval_config() -> ml_collections.ConfigDict:
  """config.eval: single-task reference row for Δm ({task: {metric: value}}, optional)."""
  c = ml_collections.ConfigDict()
  c.reference = ml_collections.FieldReference(None, field_type=dict)
  c.max_batches = ml_collections.FieldReference(None, field_type=int)  # None: whole split
  return c


def add_training_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds config.optim / config.train / config.eval (missing ones only); returns config."""
  for name, make in (("optim", optim_config), ("train", train_config), ("eval", eval_config)):
    if name not in config:
      config[name] = make()
  return config
