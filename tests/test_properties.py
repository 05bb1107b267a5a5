"""Property tests (hypothesis) for the metric meters and the augmentations on random inputs
(issue 14).

Each property holds for every input: streaming equals one batch equals merged meters; pixels that
are ignored do not count; a perfect prediction scores the closed-form best; the median of the
normals meter is within its bin width of np.median; augmentations keep every label in its value
set, keep image and labels geometrically together, and flip/identity are exact.

Examples are drawn deterministically (derandomize=True) and kept few, so the suite stays fast.
"""
import math

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np

from freesine_jax import metrics
from freesine_jax import tasks as tasks_lib
from freesine_jax.data import augment

PROPERTY = settings(max_examples=25, derandomize=True, deadline=None, database=None)
IGNORE = tasks_lib.IGNORE_INDEX
K = 5  # classes of the classification meter

seeds = st.integers(0, 2**32 - 1)
batch_sizes = st.integers(1, 4)
sides = st.integers(2, 9)


# ----------------------------------------------------------------------------- meters


def _batch(task: str, rng: np.random.Generator, b: int, h: int, w: int, ignore_rate: float):
  """(prediction as the meter takes it, label) of `task`, a random share of pixels invalid."""
  invalid = rng.random((b, h, w)) < ignore_rate
  if task == "semseg":
    label = rng.integers(0, K, (b, h, w)).astype(np.int32)
    return rng.integers(0, K, (b, h, w)), np.where(invalid, IGNORE, label)
  if task in ("sal", "edge"):
    label = rng.integers(0, 2, (b, h, w)).astype(np.int32)
    return rng.random((b, h, w)), np.where(invalid, IGNORE, label)
  if task == "normals":
    label = rng.normal(size=(b, h, w, 3))
    label /= np.linalg.norm(label, axis=-1, keepdims=True)
    pred = rng.normal(size=(b, h, w, 3))
    return pred, np.where(invalid[..., None], 0.0, label)
  label = rng.uniform(0.5, 10.0, (b, h, w))  # depth
  return rng.uniform(0.1, 12.0, (b, h, w)), np.where(invalid, 0.0, label)


def _filled(task: str, *updates) -> metrics.Meter:
  """A fresh meter of `task` after update(pred, label) with each (pred, label) in turn."""
  meter = metrics.make_meter(task, K if task == "semseg" else None)
  for pred, label in updates:
    meter.update(pred, label)
  return meter


def _score(task: str, *updates) -> dict:
  """result() of _filled(task, *updates)."""
  return _filled(task, *updates).result()


def _assert_results_equal(a: dict, b: dict, rtol: float = 0.0) -> None:
  assert a.keys() == b.keys()
  for key in a:
    x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=0, equal_nan=True, err_msg=key)


ALL_METER_TASKS = ("semseg", "sal", "edge", "normals", "depth")
METER_TASKS = st.sampled_from(ALL_METER_TASKS)


@PROPERTY
@given(task=METER_TASKS, seed=seeds, b=batch_sizes, h=sides, w=sides,
       ignore_rate=st.sampled_from([0.0, 0.3, 1.0]))
def test_meter_streaming_equals_one_batch_and_merged_halves(task, seed, b, h, w, ignore_rate):
  """Two updates == one update of the concatenation == two meters merged. Float64 sums in
  another order differ in the last bits only (rtol 1e-12); counts and histograms are exact."""
  rng = np.random.default_rng(seed)
  (p1, t1), (p2, t2) = (_batch(task, rng, b, h, w, ignore_rate) for _ in range(2))
  streamed = _score(task, (p1, t1), (p2, t2))
  whole = _score(task, (np.concatenate([p1, p2]), np.concatenate([t1, t2])))
  merged = _filled(task, (p1, t1)).merge(_filled(task, (p2, t2))).result()
  _assert_results_equal(streamed, whole, rtol=1e-12)
  _assert_results_equal(streamed, merged, rtol=1e-12)


@PROPERTY
@given(task=METER_TASKS, seed=seeds, b=batch_sizes, h=sides, w=sides)
def test_predictions_at_ignored_pixels_do_not_count(task, seed, b, h, w):
  """Another prediction at every invalid pixel (40% of them) gives the same result, bit for
  bit."""
  rng = np.random.default_rng(seed)
  pred, label = _batch(task, rng, b, h, w, 0.4)
  other, _ = _batch(task, rng, b, h, w, 0.0)
  valid = tasks_lib.get_task(task).kind.label.valid_pixels(label)
  changed = np.where(valid[..., None] if task == "normals" else valid, pred, other)
  _assert_results_equal(_score(task, (pred, label)), _score(task, (changed, label)))


@PROPERTY
@given(seed=seeds, b=batch_sizes, h=sides, w=sides)
def test_all_ignored_batch_changes_no_result(seed, b, h, w):
  """A batch whose labels are all invalid (each kind's padding value) adds nothing, for every
  task."""
  rng = np.random.default_rng(seed)
  for task in ALL_METER_TASKS:
    pred, label = _batch(task, rng, b, h, w, 0.2)
    junk, _ = _batch(task, rng, b, h, w, 0.0)
    padding = np.full_like(label, tasks_lib.get_task(task).kind.label.padding_value)
    _assert_results_equal(_score(task, (pred, label)),
                          _score(task, (pred, label), (junk, padding)))


# task -> (a prediction scoring perfectly, made from the label; whether the label has a valid
# pixel, by the task's label convention; the closed-form best score, given the label).
PERFECT = {
    "semseg": (lambda label: np.where(label == IGNORE, 0, label),
               lambda label: (label != IGNORE).any(),
               # absent classes score IoU 0 and still count (MTLoRA's convention)
               lambda label: {"mIoU": 100.0 * np.unique(label[label != IGNORE]).size / K,
                              "pixel_acc": 100.0}),
    "sal": (lambda label: (label == 1).astype(np.float64), lambda label: (label != IGNORE).any(),
            lambda label: {"mIoU": 100.0}),
    # same directions, another length; within 1e-5 degrees of 0 (arccos near 1)
    "normals": (lambda label: 3.0 * label, lambda label: (label != 0).any(),
                lambda label: {"11.25": 100.0}),
    "depth": (lambda label: label, lambda label: (label > 0).any(),
              lambda label: {"rmse": 0.0, "log_rmse": 0.0}),
}


@PROPERTY
@given(seed=seeds, b=batch_sizes, h=sides, w=sides)
def test_perfect_predictions_score_the_closed_form_best(seed, b, h, w):
  """With a valid pixel, a perfect prediction scores exactly the closed-form best (normals:
  mean error below 1e-5 degrees); semseg without one scores NaN."""
  rng = np.random.default_rng(seed)
  for task, (perfect, has_valid, best) in PERFECT.items():
    _, label = _batch(task, rng, b, h, w, 0.2)
    got = _score(task, (perfect(label), label))
    if has_valid(label):
      assert {k: got[k] for k in best(label)} == best(label), task
      if task == "normals":
        assert got["mean"] < 1e-5
    elif task == "semseg":
      assert math.isnan(got["mIoU"])


@PROPERTY
@given(seed=seeds, b=batch_sizes, h=sides, w=sides)
def test_normals_meter_against_a_direct_computation(seed, b, h, w):
  """Mean and RMSE to float64 accuracy of an arccos reference; median within the bin width."""
  rng = np.random.default_rng(seed)
  pred, label = _batch("normals", rng, b, h, w, 0.3)
  meter = _filled("normals", (pred, label))
  got = meter.result()
  valid = np.any(label != 0, axis=-1)
  if not valid.any():
    assert got["num_pixels"] == 0
    return
  p = pred[valid] / np.linalg.norm(pred[valid], axis=-1, keepdims=True)
  g = label[valid]
  err = np.degrees(np.arccos(np.clip(np.sum(p * g, axis=-1), -1.0, 1.0)))
  arccos_accuracy = 1e-5  # degrees: arccos loses digits near 0 and 180
  assert got["num_pixels"] == err.size
  assert abs(got["mean"] - err.mean()) < arccos_accuracy
  assert abs(got["rmse"] - np.sqrt(np.mean(err**2))) < arccos_accuracy
  assert abs(got["median"] - np.median(err)) <= meter.bin_width + arccos_accuracy
  assert 0.0 <= got["mean"] <= 180.0


@PROPERTY
@given(seed=seeds, b=batch_sizes, h=sides, w=sides)
def test_bounded_metrics_stay_in_range(seed, b, h, w):
  """Percentages stay in [0, 100] (or NaN without a valid pixel); the edge loss is >= 0."""
  rng = np.random.default_rng(seed)
  for task, keys in (("semseg", ("mIoU", "pixel_acc")), ("sal", ("mIoU", "maxF"))):
    got = _score(task, _batch(task, rng, b, h, w, 0.3))
    for key in keys:
      assert math.isnan(got[key]) or 0.0 <= got[key] <= 100.0, (task, key, got[key])
  loss = _score("edge", _batch("edge", rng, b, h, w, 0.3))["loss"]
  assert math.isnan(loss) or loss >= 0.0


# ----------------------------------------------------------------------------- augmentations


def _indexed_example(rng: np.random.Generator, h: int, w: int) -> dict:
  """A random example whose depth encodes each pixel's index (1 + i), so where any label pixel
  came from can be read off the warped depth."""
  normals = rng.normal(size=(h, w, 3)).astype(np.float32)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  normals[rng.random((h, w)) < 0.2] = 0.0
  return {
      "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
      "semseg": rng.integers(0, 6, (h, w)).astype(np.uint8),
      "human_parts": np.where(rng.random((h, w)) < 0.5, IGNORE,
                              rng.integers(0, 7, (h, w))).astype(np.uint8),
      "sal": rng.integers(0, 2, (h, w)).astype(np.uint8),
      "edge": rng.integers(0, 2, (h, w)).astype(np.uint8),
      "normals": normals,
      "depth": (1.0 + np.arange(h * w, dtype=np.float32)).reshape(h, w),
  }


transforms = st.builds(augment.AugmentParams, flip=st.booleans(),
                       angle_degrees=st.floats(-30.0, 30.0),
                       scale=st.floats(0.6, 1.6))


@PROPERTY
@given(seed=seeds, h=sides, w=sides, out_h=sides, out_w=sides, params=transforms,
       fill=st.sampled_from(["zero", "ignore"]))
def test_augmented_labels_stay_in_their_value_sets_and_move_together(seed, h, w, out_h, out_w,
                                                                     params, fill):
  rng = np.random.default_rng(seed)
  example = _indexed_example(rng, h, w)
  out = augment.apply_params(example, params, (out_h, out_w), label_fill=fill)
  border = 0 if fill == "zero" else IGNORE
  assert out["image"].shape == (out_h, out_w, 3)
  assert 0.0 <= out["image"].min() and out["image"].max() <= 255.0
  for key in ("semseg", "human_parts", "sal", "edge"):
    assert out[key].shape == (out_h, out_w) and out[key].dtype == np.uint8
    allowed = set(np.unique(example[key]).tolist()) | {border, IGNORE}
    assert set(np.unique(out[key]).tolist()) <= allowed, key
  norms = np.linalg.norm(out["normals"], axis=-1)
  assert np.all((norms == 0.0) | (np.abs(norms - 1.0) < 1e-5))
  # Depth holds the source pixel's index + 1 (a flip moves it with the pixel), divided by the
  # scale: every label pixel with a depth came from that same source pixel.
  source = example
  has_source = out["depth"] > 0
  index = np.rint(out["depth"][has_source] * params.scale).astype(np.int64) - 1
  assert np.all((index >= 0) & (index < h * w))
  np.testing.assert_array_equal(out["semseg"][has_source], source["semseg"].reshape(-1)[index])
  np.testing.assert_array_equal(out["sal"][has_source], source["sal"].reshape(-1)[index])
  np.testing.assert_array_equal(
      out["depth"][has_source],
      np.float32(source["depth"].reshape(-1)[index]) / np.float32(params.scale))


@PROPERTY
@given(seed=seeds, h=sides, w=sides)
def test_flip_twice_and_identity_warp_are_exact(seed, h, w):
  rng = np.random.default_rng(seed)
  example = _indexed_example(rng, h, w)
  twice = augment.hflip(augment.hflip(example))
  for key, value in example.items():
    np.testing.assert_array_equal(twice[key], value, err_msg=key)
  same = augment.apply_params(example, augment.AugmentParams(), (h, w))
  np.testing.assert_array_equal(same["image"], example["image"].astype(np.float32))
  for key in ("semseg", "sal", "edge", "depth"):
    np.testing.assert_array_equal(same[key], example[key], err_msg=key)
  np.testing.assert_allclose(same["normals"], example["normals"], rtol=0, atol=1e-6)
