"""Per-task training losses and their weighted sum (docs/design.md §3).

The formulas follow MTLoRA (scale-lab/MTLoRA, mtl_loss_schemes.py), with ignore handling made
explicit; label conventions are those of freesine_jax/tasks.py, whose registry names the loss
of each task kind.

  semseg, human_parts  softmax cross-entropy, mean over pixels whose label != 255 (pooled over
                       the batch, like torch NLLLoss(ignore_index=255)).
  sal, edge            class-balanced BCE on the logit (MTLoRA BalancedCrossEntropyLoss):
                         loss = (w · Σ_{y=1} ℓ + (1 − w) · Σ_{y=0} ℓ) / N,
                       ℓ = −[y log σ(x) + (1−y) log(1−σ(x))] per pixel. For edge w = 0.95 (a
                       fixed positive weight, tasks.EDGE_POS_WEIGHT); for sal w = N_neg / N is
                       recomputed from each batch's label balance (HED-style). Differences from
                       MTLoRA, which never passes its void mask for these tasks: pixels labelled
                       255 are excluded from the sums, from the label balance, and from N
                       (MTLoRA would count them as positives, since 255 >= 0.5, and divide by
                       every pixel). With no ignored pixel the two are identical.
  normals              L1 between the L2-normalised prediction (x / (|x| + 1e-12); 0, with gradient
                       0, where x is exactly 0: sqrt's gradient there is NaN) and the label,
                       mean over the components of valid pixels (label not the zero vector);
                       MTLoRA divides by the number of valid elements, i.e. 3 per pixel.
  depth                L1, mean over valid pixels (label > 0).

Every loss is 0 (not NaN) when a batch has no valid pixel for it, so one image without, e.g.,
a person never poisons the step.

Each loss is a sum over pixels divided by (and, for sal, weighted with) counts of the labels: its
*totals* (the registry's `loss_totals`: label -> {name: count}). Computed over the whole batch
and handed to the loss of each part, the parts' losses add up to the whole batch's loss exactly,
which is what gradient accumulation over micro-batches needs (`label_totals`, train.py).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from freesine_jax import tasks as tasks_lib

_NORMALS_EPS = 1e-12

Array = jax.Array


def _safe_mean(total: Array, count: Array) -> Array:
  """total / count, or 0 when count is 0 (no valid pixel in the batch)."""
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def _check_rank(task: str, logits: Array, labels: Array, channels: int | None = None) -> None:
  if logits.ndim != 4 or logits.shape[:3] != labels.shape[:3]:
    raise ValueError(
        f"loss for {task!r}: output {logits.shape} must be (B,H,W,C) matching label "
        f"{labels.shape}")
  if channels is not None and logits.shape[-1] != channels:
    raise ValueError(
        f"loss for {task!r}: expected {channels} output channel(s), got {logits.shape}")


def class_totals(labels: Array) -> dict[str, Array]:
  """{'valid': number of pixels whose label != 255}."""
  return {"valid": jnp.sum(labels != tasks_lib.IGNORE_INDEX)}


def softmax_cross_entropy(logits: Array, labels: Array,
                          totals: Mapping[str, Array] | None = None) -> Array:
  """Mean CE over pixels with label != 255. logits (B,H,W,C) float, labels (B,H,W) int.

  totals: class_totals of the whole batch when these rows are part of it (default: theirs).
  """
  _check_rank("cross-entropy", logits, labels)
  totals = class_totals(labels) if totals is None else totals
  labels = labels.astype(jnp.int32)
  valid = labels != tasks_lib.IGNORE_INDEX
  safe_labels = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  return _safe_mean(jnp.sum(jnp.where(valid, nll, 0.0)), totals["valid"])


def balanced_totals(labels: Array, pos_weight: float | None = None) -> dict[str, Array]:
  """{'valid': pixels != 255, 'negative': valid pixels labelled 0} (float32)."""
  del pos_weight  # the same counts serve a fixed and a batch-balanced weight
  valid = (labels != tasks_lib.IGNORE_INDEX).astype(jnp.float32)
  negative = jnp.where(labels != tasks_lib.IGNORE_INDEX, labels < 1, False).astype(jnp.float32)
  return {"valid": jnp.sum(valid), "negative": jnp.sum(negative)}


def balanced_binary_cross_entropy(logits: Array, labels: Array,
                                  pos_weight: float | None = None,
                                  totals: Mapping[str, Array] | None = None) -> Array:
  """Class-balanced BCE on logits (B,H,W,1) vs labels (B,H,W) in {0,1,255}.

  pos_weight: weight w of the positive class; None computes w = N_neg / N_valid from the
  batch's balanced_totals (MTLoRA's default for saliency). Normalised by the number of valid
  pixels. totals: balanced_totals of the whole batch when these rows are part of it.
  """
  _check_rank("balanced BCE", logits, labels, channels=1)
  totals = balanced_totals(labels) if totals is None else totals
  x = logits[..., 0].astype(jnp.float32)
  valid = labels != tasks_lib.IGNORE_INDEX
  y = jnp.where(valid, labels >= 1, False).astype(jnp.float32)
  validf = valid.astype(jnp.float32)
  # Numerically stable BCE-with-logits: max(x,0) − x·y + log(1 + exp(−|x|)).
  per_pixel = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
  loss_pos = jnp.sum(per_pixel * y * validf)
  loss_neg = jnp.sum(per_pixel * (1.0 - y) * validf)
  num_valid = totals["valid"]
  if pos_weight is None:
    w = _safe_mean(totals["negative"], num_valid)
  else:
    w = jnp.asarray(pos_weight, jnp.float32)
  return _safe_mean(w * loss_pos + (1.0 - w) * loss_neg, num_valid)


def normals_totals(target: Array) -> dict[str, Array]:
  """{'valid': 3 x the pixels whose label is not the zero vector} (valid elements)."""
  return {"valid": 3 * jnp.sum(jnp.any(target != 0, axis=-1))}


def normals_l1(pred: Array, target: Array,
               totals: Mapping[str, Array] | None = None) -> Array:
  """L1 between normalised predictions (B,H,W,3) and unit labels, over valid elements.

  totals: normals_totals of the whole batch when these rows are part of it.
  """
  _check_rank("normals", pred, target, channels=3)
  totals = normals_totals(target) if totals is None else totals
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  # A prediction of exactly (0, 0, 0) has no direction: its unit vector is 0 (as x / (|x| +
  # eps) gives) and its gradient 0, not sqrt's 0/0 = NaN, which would poison the whole step.
  # The double `where` keeps every other pixel's value and gradient as the plain formula's; a
  # NaN prediction stays NaN (`!= 0`, not `> 0`), so a diverged step is still reported.
  square = jnp.sum(jnp.square(pred), axis=-1, keepdims=True)
  nonzero = square != 0
  norm = jnp.sqrt(jnp.where(nonzero, square, 1.0))
  unit = jnp.where(nonzero, pred / (norm + _NORMALS_EPS), 0.0)
  valid = jnp.any(target != 0, axis=-1, keepdims=True)
  total = jnp.sum(jnp.where(valid, jnp.abs(unit - target), 0.0))
  return _safe_mean(total, totals["valid"])


def depth_totals(target: Array) -> dict[str, Array]:
  """{'valid': pixels with target > 0}."""
  return {"valid": jnp.sum(target > 0)}


def depth_l1(pred: Array, target: Array, totals: Mapping[str, Array] | None = None) -> Array:
  """L1 over pixels with target > 0. pred (B,H,W,1), target (B,H,W).

  totals: depth_totals of the whole batch when these rows are part of it.
  """
  _check_rank("depth", pred, target, channels=1)
  totals = depth_totals(target) if totals is None else totals
  p = pred[..., 0].astype(jnp.float32)
  t = target.astype(jnp.float32)
  valid = t > 0
  return _safe_mean(jnp.sum(jnp.where(valid, jnp.abs(p - t), 0.0)), totals["valid"])


def task_loss(task: str, output: Array, label: Array,
              totals: Mapping[str, Array] | None = None) -> Array:
  """The docs/design.md §3 loss of one task: its kind's loss in the task registry, normalised
  by `totals` (its kind's loss_totals of the whole batch; default: of `label`)."""
  kind = tasks_lib.get_task(task).kind
  return tasks_lib.resolve(kind.loss)(output, label, totals=totals, **kind.loss_options)


def label_totals(batch: Mapping[str, Array], tasks: Sequence[str]) -> dict[str, dict]:
  """{task: its kind's loss_totals of batch[task]}: the counts every loss divides by, of a
  whole batch (to hand to `multitask_loss` of each of its micro-batches)."""
  out = {}
  for task in tasks:
    kind = tasks_lib.get_task(task).kind
    out[task] = tasks_lib.resolve(kind.loss_totals)(batch[task], **kind.loss_options)
  return out


def multitask_loss(outputs: Mapping[str, Array], batch: Mapping[str, Array],
                   tasks: Sequence[str], weights: Mapping[str, float],
                   totals: Mapping[str, Mapping[str, Array]] | None = None
                   ) -> tuple[Array, dict[str, Array]]:
  """Σ_t w_t L_t over `tasks`; returns (total, {task: unweighted L_t}).

  totals: `label_totals` of the whole batch when `batch` is a micro-batch of it, so that the
  micro-batches' losses sum to the whole batch's (default: this batch's own).
  """
  per_task = {}
  total = jnp.zeros((), jnp.float32)
  for task in tasks:
    if task not in outputs:
      raise KeyError(f"multitask_loss: model outputs have no {task!r} (have {sorted(outputs)})")
    if task not in batch:
      raise KeyError(f"multitask_loss: batch has no label {task!r} (have {sorted(batch)})")
    if task not in weights:
      raise KeyError(f"multitask_loss: config.loss_weights has no entry for {task!r}")
    per_task[task] = task_loss(task, outputs[task], batch[task],
                               None if totals is None else totals[task])
    total = total + float(weights[task]) * per_task[task]
  return total, per_task
