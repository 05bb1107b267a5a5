"""Losses against hand-computed values (docs/design.md §3)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freesine_jax import losses

LN2 = math.log(2.0)
LN43 = math.log(4.0 / 3.0)


def _img(values, channels=None):
  """A (1,1,N[,C]) batch from a list of per-pixel values."""
  a = np.asarray(values, np.float32 if channels else None)
  return jnp.asarray(a[None, None])


def test_cross_entropy_ignores_255_and_averages_valid_pixels():
  # Pixel 0: logits (0,0), label 0 -> ln 2. Pixel 1: logits (ln3,0), label 0 -> ln(4/3).
  # Pixel 2 is ignored even with a huge wrong logit.
  logits = _img([[0.0, 0.0], [math.log(3.0), 0.0], [-100.0, 100.0]], channels=2)
  labels = jnp.asarray([[[0, 0, 255]]], jnp.int32)
  got = losses.softmax_cross_entropy(logits, labels)
  np.testing.assert_allclose(got, (LN2 + LN43) / 2, rtol=1e-6)


def test_cross_entropy_pools_over_batch_not_per_image():
  # Image 0 has 1 valid pixel (loss ln2), image 1 has 3 valid pixels (loss 0 each, almost).
  logits = np.zeros((2, 1, 3, 2), np.float32)
  logits[1, ..., 0] = 50.0
  labels = np.array([[[0, 255, 255]], [[0, 0, 0]]], np.int32)
  got = losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, LN2 / 4, rtol=1e-5)


def test_all_ignored_gives_zero_loss_and_zero_grad():
  logits = jnp.ones((1, 2, 2, 3))
  labels = jnp.full((1, 2, 2), 255, jnp.int32)
  val, grad = jax.value_and_grad(losses.softmax_cross_entropy)(logits, labels)
  assert float(val) == 0.0
  assert not np.any(np.asarray(grad))


# Pixels: positive with logit ln3 (loss ln(4/3)); negative with logit 0 (ln2); negative with
# logit -ln3 (ln(4/3)); an ignored pixel with a huge logit.
_BIN_LOGITS = [[math.log(3.0)], [0.0], [-math.log(3.0)], [100.0]]
_BIN_LABELS = [[[1, 0, 0, 255]]]


def test_saliency_bce_weight_from_batch_balance():
  # Valid: 1 positive, 2 negatives -> w = N_neg/N = 2/3, N = 3.
  w = 2.0 / 3.0
  expected = (w * LN43 + (1 - w) * (LN2 + LN43)) / 3
  got = losses.task_loss("sal", _img(_BIN_LOGITS, channels=1), jnp.asarray(_BIN_LABELS))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_edge_bce_fixed_pos_weight():
  w = 0.95
  expected = (w * LN43 + (1 - w) * (LN2 + LN43)) / 3
  got = losses.task_loss("edge", _img(_BIN_LOGITS, channels=1), jnp.asarray(_BIN_LABELS))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def _mtlora_balanced_bce(output, label, pos_weight=None):
  """MTLoRA's BalancedCrossEntropyLoss formula, transcribed to numpy (no void pixels)."""
  labels = (label >= 0.5).astype(np.float64)
  if pos_weight is None:
    w = np.sum(1.0 - labels) / labels.size
  else:
    w = pos_weight
  gt0 = (output >= 0).astype(np.float64)
  loss_val = output * (labels - gt0) - np.log(1 + np.exp(output - 2 * output * gt0))
  final = w * np.sum(-labels * loss_val) + (1 - w) * np.sum(-(1.0 - labels) * loss_val)
  return final / labels.size


@pytest.mark.parametrize("task,pos_weight", [("sal", None), ("edge", 0.95)])
def test_bce_equals_mtlora_without_ignore(task, pos_weight):
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3.0, size=(2, 4, 5, 1))
  labels = rng.integers(0, 2, size=(2, 4, 5))
  got = losses.task_loss(task, jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(got, _mtlora_balanced_bce(logits[..., 0], labels, pos_weight),
                             rtol=1e-5)


def test_bce_is_stable_for_large_logits():
  logits = jnp.asarray([[[[1e4], [-1e4]]]], jnp.float32)
  labels = jnp.asarray([[[0, 1]]])
  got = losses.task_loss("edge", logits, labels)
  # Each pixel's BCE is 1e4; w=0.95 for the positive, 0.05 for the negative, N=2.
  np.testing.assert_allclose(got, (0.95 * 1e4 + 0.05 * 1e4) / 2, rtol=1e-6)


def test_normals_l1_normalises_prediction_and_skips_zero_labels():
  pred = _img([[2.0, 0.0, 0.0], [0.0, 3.0, 4.0], [5.0, 5.0, 5.0]], channels=3)
  target = _img([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], channels=3)
  # Pixel 0: exact (0). Pixel 1: unit (0,.6,.8) vs (1,0,0): 1+.6+.8 = 2.4. Pixel 2 invalid.
  # Mean over the 6 valid elements: 0.4.
  np.testing.assert_allclose(losses.normals_l1(pred, target), 0.4, rtol=1e-6)


def test_normals_l1_gradient_is_finite_at_a_zero_prediction():
  """A head can output exactly (0, 0, 0) (a ReLU'd input, zero bias): that pixel has no direction,
  so its gradient is 0; every other pixel's is the closed form J^T sign(u - t) / N with
  J = (I - u u^T) / |x|, not NaN (sqrt's gradient at 0 once poisoned the whole step)."""
  rng = np.random.default_rng(0)
  pred = (0.3 * rng.standard_normal((2, 3, 4, 3))).astype(np.float32)
  pred[0, 1, 2] = 0.0
  target = rng.standard_normal((2, 3, 4, 3))
  target /= np.linalg.norm(target, axis=-1, keepdims=True)
  target = target.astype(np.float32)
  grad = np.asarray(jax.grad(lambda p: losses.normals_l1(p, jnp.asarray(target)))(
      jnp.asarray(pred)))
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(grad[0, 1, 2], 0.0)
  x = pred.astype(np.float64)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  u = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
  s = np.sign(u - target)
  want = (s - u * np.sum(u * s, axis=-1, keepdims=True))
  want = np.divide(want, norm, out=np.zeros_like(want), where=norm > 0) / (3 * 2 * 3 * 4)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
  pred[1, 0, 0] = np.nan  # a diverged prediction is not taken for a zero one
  assert np.isnan(float(losses.normals_l1(jnp.asarray(pred), jnp.asarray(target))))


def test_depth_l1_over_positive_targets():
  pred = _img([[1.0], [3.0], [10.0]], channels=1)
  target = jnp.asarray([[[2.0, 1.0, 0.0]]])
  np.testing.assert_allclose(losses.depth_l1(pred, target), 1.5, rtol=1e-6)


def test_multitask_loss_weights_and_per_task_values():
  outputs = {
      "semseg": _img([[0.0, 0.0]], channels=2),
      "depth": _img([[1.0]], channels=1),
  }
  batch = {"semseg": jnp.asarray([[[1]]]), "depth": jnp.asarray([[[3.0]]]),
           "image": jnp.zeros((1, 1, 1, 3))}
  total, per_task = losses.multitask_loss(outputs, batch, ("semseg", "depth"),
                                          {"semseg": 1.0, "depth": 10.0})
  np.testing.assert_allclose(per_task["semseg"], LN2, rtol=1e-6)
  np.testing.assert_allclose(per_task["depth"], 2.0, rtol=1e-6)
  np.testing.assert_allclose(total, LN2 + 20.0, rtol=1e-6)


def test_multitask_loss_names_missing_weight():
  outputs = {"depth": _img([[1.0]], channels=1)}
  batch = {"depth": jnp.asarray([[[3.0]]])}
  with pytest.raises(KeyError, match="loss_weights"):
    losses.multitask_loss(outputs, batch, ("depth",), {})


def test_parts_normalised_by_the_whole_batch_add_up_to_the_whole_batch():
  """Gradient accumulation's premise: with label_totals of the whole batch, the losses (and so
  the gradients) of its parts sum to the whole batch's loss. The parts are uneven on purpose:
  different valid-pixel counts and, for sal, a different label balance in each."""
  rng = np.random.default_rng(0)
  b, h, w = 4, 3, 5
  tasks = ("semseg", "sal", "edge", "normals", "depth")
  outputs = {"semseg": rng.normal(size=(b, h, w, 3)), "sal": rng.normal(size=(b, h, w, 1)),
             "edge": rng.normal(size=(b, h, w, 1)), "normals": rng.normal(size=(b, h, w, 3)),
             "depth": rng.normal(size=(b, h, w, 1))}
  semseg = rng.integers(0, 3, (b, h, w))
  semseg[0] = 255  # an image without a valid pixel
  semseg[1, :2] = 255
  sal = (rng.uniform(size=(b, h, w)) < np.array([0.9, 0.5, 0.1, 0.3])[:, None, None])
  sal = sal.astype(np.int32)
  sal[2, 0] = 255
  normals = rng.normal(size=(b, h, w, 3))
  normals[3, :, :2] = 0.0  # invalid pixels
  depth = rng.uniform(-1.0, 2.0, (b, h, w))
  batch = {"semseg": semseg.astype(np.int32), "sal": sal,
           "edge": (rng.uniform(size=(b, h, w)) < 0.2).astype(np.int32),
           "normals": normals.astype(np.float32), "depth": depth.astype(np.float32)}
  outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  weights = {"semseg": 1.0, "sal": 5.0, "edge": 50.0, "normals": 10.0, "depth": 1.0}

  whole, whole_tasks = losses.multitask_loss(outputs, batch, tasks, weights)
  totals = losses.label_totals(batch, tasks)
  parts = [slice(0, 1), slice(1, 4)]
  summed, summed_tasks = 0.0, {t: 0.0 for t in tasks}
  for rows in parts:
    part_total, part_tasks = losses.multitask_loss(
        {k: v[rows] for k, v in outputs.items()}, {k: v[rows] for k, v in batch.items()},
        tasks, weights, totals)
    summed += part_total
    summed_tasks = {t: summed_tasks[t] + part_tasks[t] for t in tasks}
  # float32 sums over a few dozen pixels, regrouped: rounding of order 1e-7 relative.
  np.testing.assert_allclose(summed, whole, rtol=1e-6)
  for t in tasks:
    np.testing.assert_allclose(summed_tasks[t], whole_tasks[t], rtol=1e-6, err_msg=t)
  # Each part normalised by its own counts instead does not add up (the premise is not void).
  own = sum(float(losses.multitask_loss({k: v[rows] for k, v in outputs.items()},
                                        {k: v[rows] for k, v in batch.items()}, tasks,
                                        weights)[0]) for rows in parts)
  assert abs(own - float(whole)) > 1e-2 * abs(float(whole))
