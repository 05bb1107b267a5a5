"""Tests for freesine_jax.metrics against hand-computed values and closed forms."""
from __future__ import annotations

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from freesine_jax import metrics

# ------------------------------------------------------------------------------ postprocess


def test_postprocess_classification_argmax():
  logits = np.zeros((2, 4, 5, 3), np.float32)
  logits[0, 1, 2, 2] = 5.0
  logits[1, 3, 4, 1] = 1.0
  logits[..., 0] += 0.5  # class 0 wins elsewhere
  out = metrics.postprocess("semseg", jnp.asarray(logits))
  assert isinstance(out, np.ndarray) and out.dtype == np.int32
  chex.assert_shape(out, (2, 4, 5))
  expected = np.zeros((2, 4, 5), np.int32)
  expected[0, 1, 2] = 2
  expected[1, 3, 4] = 1
  np.testing.assert_array_equal(out, expected)


def test_postprocess_binary_sigmoid_once_and_stable():
  logits = np.array([0.0, math.log(3.0), -math.log(3.0), 1000.0, -1000.0], np.float32)
  out = metrics.postprocess("sal", logits.reshape(1, 1, 5, 1))
  assert out.dtype == np.float32
  chex.assert_shape(out, (1, 1, 5))
  # sigmoid(0)=1/2, sigmoid(ln 3)=3/4, sigmoid(-ln 3)=1/4; no overflow at +-1000.
  np.testing.assert_allclose(out[0, 0], [0.5, 0.75, 0.25, 1.0, 0.0], atol=1e-6)
  chex.assert_shape(metrics.postprocess("edge", np.zeros((2, 3, 4, 1))), (2, 3, 4))


def test_postprocess_normals_unit_and_zero_safe():
  raw = np.array([[[[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]]]], np.float32)  # (1,1,2,3)
  out = metrics.postprocess("normals", raw)
  assert out.dtype == np.float32
  chex.assert_shape(out, (1, 1, 2, 3))
  np.testing.assert_allclose(out[0, 0, 0], [0.6, 0.0, 0.8], rtol=1e-6)
  np.testing.assert_array_equal(out[0, 0, 1], [0.0, 0.0, 0.0])
  assert np.all(np.isfinite(out))


def test_postprocess_depth_and_bad_shapes():
  out = metrics.postprocess("depth", np.full((2, 3, 4, 1), 2.5))
  assert out.dtype == np.float32
  chex.assert_shape(out, (2, 3, 4))
  np.testing.assert_array_equal(out, 2.5)
  with pytest.raises(ValueError, match="channel"):
    metrics.postprocess("normals", np.zeros((1, 2, 2, 2)))
  with pytest.raises(ValueError, match="channel"):
    metrics.postprocess("sal", np.zeros((1, 2, 2, 2)))
  with pytest.raises(ValueError, match=r"\(B,H,W,C\)"):
    metrics.postprocess("semseg", np.zeros((2, 2, 3)))
  with pytest.raises(ValueError, match="unknown task"):
    metrics.postprocess("nope", np.zeros((1, 1, 1, 1)))


# ------------------------------------------------------------------------------ semseg


def _semseg_images():
  # Image A: class 2 absent. Valid pixels (t,p): (0,0) (0,1) (1,1) (1,1) (0,0); one ignored.
  ta = np.array([[0, 0, 1], [1, 255, 0]])
  pa = np.array([[0, 1, 1], [1, 1, 0]])
  # Image B: class 2 once right, once wrong (predicted 0); rest ignored.
  tb = np.array([[2, 2, 255], [255, 255, 255]])
  pb = np.array([[2, 0, 0], [0, 0, 0]])
  return ta, pa, tb, pb


def test_semseg_hand_computed_with_ignore_and_empty_class():
  ta, pa, _, _ = _semseg_images()
  meter = metrics.make_meter("semseg", num_classes=3)
  meter.update(pa[None], ta[None])
  res = meter.result()
  # class0: tp2 fn1 -> 2/3; class1: tp2 fp1 -> 2/3; class2 absent everywhere -> 0 (MTLoRA).
  np.testing.assert_allclose(res["per_class_IoU"], [200 / 3, 200 / 3, 0.0])
  np.testing.assert_allclose(res["mIoU"], 100 * 4 / 9)
  np.testing.assert_allclose(res["pixel_acc"], 80.0)
  assert res["num_images"] == 1


def test_semseg_two_updates_equal_one_batch_and_hand_values():
  ta, pa, tb, pb = _semseg_images()
  m1 = metrics.make_meter("semseg", num_classes=3)
  m1.update(pa[None], ta[None])
  m1.update(pb[None], tb[None])
  m2 = metrics.make_meter("semseg", num_classes=3)
  m2.update(np.stack([pa, pb]), np.stack([ta, tb]))
  r1, r2 = m1.result(), m2.result()
  assert r1 == r2
  # class0: tp2 fp1 fn1 -> 1/2; class1: 2/3; class2: tp1 fn1 -> 1/2.
  np.testing.assert_allclose(r1["per_class_IoU"], [50.0, 200 / 3, 50.0])
  np.testing.assert_allclose(r1["mIoU"], 100 * 5 / 9)
  np.testing.assert_allclose(r1["pixel_acc"], 100 * 5 / 7)


def test_semseg_random_streaming_matches_naive_loop():
  rng = np.random.default_rng(0)
  k = 5
  target = rng.integers(0, k, size=(6, 8, 8))
  target[rng.random(target.shape) < 0.2] = 255
  pred = rng.integers(0, k, size=(6, 8, 8))
  meter = metrics.make_meter("semseg", num_classes=k)
  for i in range(0, 6, 4):  # uneven batches 4 + 2
    meter.update(pred[i:i + 4], target[i:i + 4])
  ious = []
  for c in range(k):
    v = target != 255
    tp = np.sum((pred == c) & (target == c) & v)
    fp = np.sum((pred == c) & (target != c) & v)
    fn = np.sum((pred != c) & (target == c) & v)
    ious.append(tp / (tp + fp + fn))
  np.testing.assert_allclose(meter.result()["per_class_IoU"], 100 * np.array(ious))
  np.testing.assert_allclose(meter.result()["mIoU"], 100 * np.mean(ious))


def test_semseg_valid_mask_skips_padding():
  ta, pa, tb, pb = _semseg_images()
  masked = metrics.make_meter("semseg", num_classes=3)
  masked.update(np.stack([pa, pb]), np.stack([ta, tb]), valid=np.array([True, False]))
  alone = metrics.make_meter("semseg", num_classes=3)
  alone.update(pa[None], ta[None])
  assert masked.result() == alone.result()


def test_semseg_rejects_out_of_range_labels():
  meter = metrics.make_meter("semseg", num_classes=3)
  with pytest.raises(ValueError, match="target ids"):
    meter.update(np.zeros((1, 2, 2), np.int32), np.full((1, 2, 2), 7))


def test_human_parts_all_ignore_image_contributes_nothing():
  ta, pa, _, _ = _semseg_images()
  empty_t = np.full_like(ta, 255)
  empty_p = np.full_like(pa, 2)  # would be false positives if it counted
  m = metrics.make_meter("human_parts", num_classes=3)
  m.update(np.stack([pa, empty_p]), np.stack([ta, empty_t]))
  ref = metrics.make_meter("human_parts", num_classes=3)
  ref.update(pa[None], ta[None])
  assert m.result() == ref.result()
  assert m.result()["num_images"] == 1
  assert metrics.make_meter("human_parts").num_classes == 7


def test_merge_equals_single_meter():
  ta, pa, tb, pb = _semseg_images()
  a = metrics.make_meter("semseg", num_classes=3)
  b = metrics.make_meter("semseg", num_classes=3)
  a.update(pa[None], ta[None])
  b.update(pb[None], tb[None])
  both = metrics.make_meter("semseg", num_classes=3)
  both.update(np.stack([pa, pb]), np.stack([ta, tb]))
  assert a.merge(b).result() == both.result()
  with pytest.raises(ValueError, match="merge"):
    a.merge(metrics.make_meter("depth"))


# ------------------------------------------------------------------------------ saliency


def _sal_image():
  prob = np.array([[0.10, 0.32, 0.52], [0.72, 0.95, 0.62]], np.float32)
  target = np.array([[0, 1, 1], [1, 255, 0]])  # 0.95 is ignored
  return prob, target


def test_sal_thresholds():
  np.testing.assert_allclose(metrics.SAL_THRESHOLDS, np.arange(15) * 0.05 + 0.2)


def test_sal_single_image_hand_computed():
  prob, target = _sal_image()
  meter = metrics.make_meter("sal")
  meter.update(prob[None], target[None])
  res = meter.result()
  # t<=0.30: mask {.32,.52,.72,.62}: tp3, |mask|4, |gt|3 -> IoU 3/4, P 3/4, R 1, F 6/7.
  # t in .35-.50: IoU 2/4, P=R=2/3; .55-.60: IoU 1/4; .65-.70: IoU 1/3; >=.75: 0.
  np.testing.assert_allclose(res["mIoU"], 75.0)
  np.testing.assert_allclose(res["maxF"], 100 * 6 / 7)
  np.testing.assert_allclose(res["mIoU_threshold"], 0.2)
  assert res["num_images"] == 1


def test_sal_averages_over_images_and_empty_image_convention():
  prob, target = _sal_image()
  neg_prob = np.full_like(prob, 0.1)
  neg_target = np.zeros_like(target)  # no salient pixel, none predicted: IoU 1, P = R = 0
  void_target = np.full_like(target, 255)  # skipped entirely
  meter = metrics.make_meter("sal")
  meter.update(np.stack([prob, neg_prob]), np.stack([target, neg_target]))
  meter.update(prob[None], void_target[None])
  res = meter.result()
  # Mean IoU per threshold: (.75+1)/2 = .875 at t<=.3 (the max).
  # Mean P, R at t<=.3: .375, .5 -> F = 3/7; t .35-.5: 1/3; .55-.6: .2; .65-.7: .25.
  np.testing.assert_allclose(res["mIoU"], 87.5)
  np.testing.assert_allclose(res["maxF"], 100 * 3 / 7)
  assert res["num_images"] == 2


def test_sal_threshold_sweep_per_threshold_values():
  prob, target = _sal_image()
  meter = metrics.make_meter("sal")
  meter.update(prob[None], target[None])
  expected_iou = [.75] * 3 + [.5] * 4 + [.25] * 2 + [1 / 3] * 2 + [0.0] * 4
  np.testing.assert_allclose(meter.state()["sum_iou"], expected_iou)
  expected_p = [.75] * 3 + [2 / 3] * 4 + [.5] * 2 + [1.0] * 2 + [0.0] * 4
  np.testing.assert_allclose(meter.state()["sum_precision"], expected_p)


def test_sal_streaming_and_valid_mask():
  rng = np.random.default_rng(1)
  prob = rng.random((5, 6, 7)).astype(np.float32)
  target = (rng.random((5, 6, 7)) < 0.4).astype(np.int32)
  target[:, 0, :] = 255
  one = metrics.make_meter("sal")
  one.update(prob, target)
  many = metrics.make_meter("sal")
  many.update(prob[:2], target[:2])
  many.update(np.concatenate([prob[2:], prob[:1]]), np.concatenate([target[2:], target[:1]]),
              valid=np.array([True, True, True, False]))
  for k in ("mIoU", "maxF"):
    np.testing.assert_allclose(many.result()[k], one.result()[k], rtol=1e-12)


# ------------------------------------------------------------------------------ normals


def _unit(deg):
  r = math.radians(deg)
  return [math.sin(r), 0.0, math.cos(r)]


def test_normals_known_angles():
  target = np.zeros((1, 2, 3, 3), np.float32)
  pred = np.zeros((1, 2, 3, 3), np.float32)
  for j, deg in enumerate([0.0, 20.0, 45.0, 90.0]):
    target[0, j // 3, j % 3] = [0, 0, 1]
    pred[0, j // 3, j % 3] = _unit(deg)
  pred[0, 1, 1] = [1, 0, 0]  # invalid (zero target): ignored
  pred[0, 1, 2] = [0, 1, 0]
  meter = metrics.make_meter("normals")
  meter.update(pred, target)
  res = meter.result()
  assert res["num_pixels"] == 4
  np.testing.assert_allclose(res["mean"], (0 + 20 + 45 + 90) / 4, atol=1e-4)
  np.testing.assert_allclose(res["rmse"], math.sqrt((400 + 2025 + 8100) / 4), atol=1e-4)
  assert abs(res["median"] - 32.5) <= 0.01
  np.testing.assert_allclose([res["11.25"], res["22.5"], res["30"]], [25.0, 50.0, 50.0])


def test_normals_zero_prediction_scores_90_degrees():
  target = np.array([[[[0.0, 1.0, 0.0]]]], np.float32)
  meter = metrics.make_meter("normals")
  meter.update(np.zeros_like(target), target)
  np.testing.assert_allclose(meter.result()["mean"], 90.0, atol=1e-9)


def test_normals_streaming_median_accuracy_and_valid_mask():
  rng = np.random.default_rng(2)
  pred = rng.normal(size=(4, 8, 8, 3))
  pred /= np.linalg.norm(pred, axis=-1, keepdims=True)
  target = rng.normal(size=(4, 8, 8, 3))
  target /= np.linalg.norm(target, axis=-1, keepdims=True)
  target[:, :2] = 0.0
  err = np.degrees(np.arccos(np.clip(np.sum(pred * target, -1), -1, 1)))[:, 2:]
  meter = metrics.make_meter("normals")
  meter.update(pred[:3], target[:3])
  meter.update(np.concatenate([pred[3:], pred[:1]]), np.concatenate([target[3:], target[:1]]),
               valid=np.array([True, False]))
  res = meter.result()
  np.testing.assert_allclose(res["mean"], err.mean(), rtol=1e-9)
  np.testing.assert_allclose(res["rmse"], np.sqrt(np.mean(err**2)), rtol=1e-9)
  assert abs(res["median"] - np.median(err)) <= 0.01  # documented histogram resolution
  np.testing.assert_allclose(res["30"], 100 * np.mean(err < 30))


# ------------------------------------------------------------------------------ depth


def test_depth_closed_form_with_invalid_pixels():
  target = np.array([[[1.0, 2.0, 0.0], [4.0, 0.0, 3.0]]], np.float32)
  pred = np.array([[[1.5, 2.0, 9.0], [2.0, 7.0, 3.0]]], np.float32)
  meter = metrics.make_meter("depth")
  meter.update(pred, target)
  res = meter.result()
  assert res["num_pixels"] == 4
  np.testing.assert_allclose(res["rmse"], math.sqrt((0.25 + 4.0) / 4), rtol=1e-6)
  np.testing.assert_allclose(
      res["log_rmse"], math.sqrt((math.log(1.5)**2 + math.log(2.0)**2) / 4), rtol=1e-6)


def test_depth_clamps_negative_predictions_before_both_errors_as_mtlora():
  """MTLoRA clamps predictions to >= 1e-9 before RMSE and log-RMSE; 'rmse_raw' does not."""
  target = np.array([[[1.0, 2.0], [4.0, 0.0]]], np.float32)
  pred = np.array([[[-1.0, 2.5], [4.0, -3.0]]], np.float32)  # the last pixel is invalid
  meter = metrics.make_meter("depth")
  meter.update(pred, target)
  res = meter.result()
  assert res["num_pixels"] == 3
  # clamped: errors (1e-9 - 1), 0.5, 0; raw: errors -2, 0.5, 0.
  np.testing.assert_allclose(res["rmse"], math.sqrt(((1 - 1e-9)**2 + 0.25) / 3), rtol=1e-9)
  np.testing.assert_allclose(res["rmse_raw"], math.sqrt((4.0 + 0.25) / 3), rtol=1e-9)
  np.testing.assert_allclose(
      res["log_rmse"], math.sqrt((math.log(1e-9)**2 + math.log(1.25)**2) / 3), rtol=1e-6)
  # With no negative prediction the two RMSEs are one number.
  positive = metrics.make_meter("depth")
  positive.update(np.abs(pred), target)
  assert positive.result()["rmse"] == positive.result()["rmse_raw"]


def test_depth_pools_pixels_over_split_not_images():
  # Image 1: 1 valid pixel, error 3. Image 2: 3 valid pixels, error 1 each.
  t = np.array([[[5.0, 0, 0, 0]], [[1.0, 1.0, 1.0, 0]]])
  p = np.array([[[2.0, 0, 0, 0]], [[2.0, 2.0, 2.0, 0]]])
  meter = metrics.make_meter("depth")
  meter.update(p[:1], t[:1])
  meter.update(p[1:], t[1:], valid=np.array([True]))
  np.testing.assert_allclose(meter.result()["rmse"], math.sqrt((9 + 3) / 4))


# ------------------------------------------------------------------------------ edge


def test_edge_balanced_bce_hand_computed():
  prob = np.array([[[0.9, 0.2], [0.5, 0.7]]], np.float32)
  target = np.array([[[1, 0], [255, 0]]])
  meter = metrics.make_meter("edge")
  meter.update(prob, target)
  expected = (-0.95 * math.log(0.9) - 0.05 * math.log(0.8) - 0.05 * math.log(0.3)) / 3
  np.testing.assert_allclose(meter.result()["loss"], expected, rtol=1e-6)
  assert meter.result()["num_pixels"] == 3


# ------------------------------------------------------------------------------ delta_m

_SINGLE = {"semseg": {"mIoU": 67.21}, "human_parts": {"mIoU": 61.93},
           "sal": {"mIoU": 62.35}, "normals": {"mean": 17.97}}


def _row(s, p, sal, n):
  return {"semseg": {"mIoU": s, "pixel_acc": 90.0}, "human_parts": {"mIoU": p},
          "sal": {"mIoU": sal, "maxF": 80.0}, "normals": {"mean": n, "median": 15.0}}


@pytest.mark.parametrize("row, paper", [
    ((71.25, 61.38, 66.24, 16.14), 5.39),  # Free Sinewich r=64
    ((71.02, 60.75, 65.94, 16.44), 4.51),  # Free Sinewich r=32
    ((70.82, 60.45, 65.88, 16.48), 4.24),  # TADFormer r=64
    ((67.90, 59.84, 65.40, 16.60), 2.55),  # MTLoRA r=64
])
def test_delta_m_reproduces_paper_table(row, paper):
  assert abs(metrics.delta_m(_row(*row), _SINGLE) - paper) < 0.01


def test_delta_m_signs_skipping_and_errors():
  # depth: lower is better -> 10% lower rmse is +10; edge has no reference: skipped.
  res = {"depth": {"rmse": 0.9}, "edge": {"loss": 1.0}}
  np.testing.assert_allclose(metrics.delta_m(res, {"depth": {"rmse": 1.0}}), 10.0)
  np.testing.assert_allclose(
      metrics.delta_m({"semseg": {"mIoU": 55.0}}, {"semseg": {"mIoU": 50.0}}), 10.0)
  with pytest.raises(ValueError, match="no task"):
    metrics.delta_m({"edge": {"loss": 1.0}}, {"depth": {"rmse": 1.0}})
  with pytest.raises(KeyError, match="mIoU"):
    metrics.delta_m({"sal": {"maxF": 1.0}}, {"sal": {"mIoU": 1.0}})


# ------------------------------------------------------------------------------ format_table


def test_format_table_lists_scalars():
  meter = metrics.make_meter("semseg", num_classes=3)
  ta, pa, _, _ = _semseg_images()
  meter.update(pa[None], ta[None])
  text = metrics.format_table({"semseg": meter.result(), "depth": {"rmse": 0.5}})
  lines = text.splitlines()
  assert lines[0].split() == ["task", "metric", "value"]
  assert any("semseg" in l and "mIoU ↑" in l and "44.4444" in l for l in lines)
  assert any("depth" in l and "rmse ↓" in l and "0.5000" in l for l in lines)
  assert "per_class_IoU" not in text


def test_format_table_names_each_class_iou():
  results = {"semseg": {"mIoU": 50.0, "per_class_IoU": [100.0, None, 0.0]}}
  lines = metrics.format_table(results, {"semseg": ("background", "cat")}).splitlines()
  rows = [line.split() for line in lines if "IoU" in line and "mIoU" not in line]
  assert rows == [["IoU", "background", "100.00"], ["IoU", "cat", "nan"],
                  ["IoU", "2", "0.00"]]  # under the task's mIoU row; no name given: the class id
