"""Streaming evaluation metrics for dense multi-task prediction (docs/design.md §5).

Pure numpy. The conventions follow MTI-Net / MTLoRA (scale-lab/MTLoRA, evaluation/*.py), so
numbers are comparable with the Free Sinewich paper table; where MTLoRA has a bug we do not
copy it and say so below.

Usage:
  meter = make_meter('semseg', num_classes=21)
  for batch in eval_batches:
    meter.update(postprocess('semseg', outputs['semseg']), batch['semseg'], valid=batch_mask)
  meter.result()  # {'mIoU': ..., 'pixel_acc': ..., 'per_class_IoU': [...]}

Every meter keeps only additive statistics (`state()`), so meters evaluated on different
shards/hosts combine exactly with `merge` (or by summing their states, e.g. after a
multihost all-gather); `result()` never depends on how the split was batched.

Label conventions are those of freesine_jax/tasks.py, whose registry names the
post-processing and the meter of each task kind.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from freesine_jax import tasks as tasks_lib

# Saliency thresholds on the probability (MTI-Net / MTLoRA 'mask_thres').
SAL_THRESHOLDS = np.linspace(0.2, 0.9, 15)
# Angular thresholds (degrees) for the "% within" normals metrics.
NORMALS_ANGLES = (11.25, 22.5, 30.0)

_NORMALS_ANGLE_KEYS = ("11.25", "22.5", "30")


# ----------------------------------------------------------------------------------------
# Post-processing of raw model outputs.
# ----------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
  # tanh form: no overflow for large |x|, unlike 1/(1+exp(-x)).
  return 0.5 * (np.tanh(0.5 * x) + 1.0)


def _expect_channels(task: str, output: np.ndarray, channels: int | None) -> None:
  if output.ndim != 4:
    raise ValueError(f"postprocess({task!r}): output must be (B,H,W,C), got shape {output.shape}")
  if channels is not None and output.shape[-1] != channels:
    raise ValueError(
        f"postprocess({task!r}): expected {channels} output channel(s), got shape {output.shape}")


def postprocess(task: str, output: Any) -> np.ndarray:
  """Turns a task's raw model output (B,H,W,C) into what its meter consumes (numpy).

  The task kind's post-processing in the registry: semseg/human_parts -> int32 argmax class
  ids (B,H,W); sal/edge -> float32 sigmoid probabilities (B,H,W) (applied exactly once: meters
  take probabilities, never logits); normals -> float32 unit vectors (B,H,W,3), zero where the
  output is the zero vector; depth -> float32 (B,H,W).
  """
  kind = tasks_lib.get_task(task).kind
  out = np.asarray(output)
  _expect_channels(task, out, kind.output_channels)
  return tasks_lib.resolve(kind.postprocess)(out)


def argmax_class_ids(output: np.ndarray) -> np.ndarray:
  """Logits (B,H,W,C) -> int32 class ids (B,H,W)."""
  return np.argmax(output, axis=-1).astype(np.int32)


def sigmoid_probabilities(output: np.ndarray) -> np.ndarray:
  """One logit (B,H,W,1) -> float32 probabilities (B,H,W)."""
  return _sigmoid(output[..., 0].astype(np.float32)).astype(np.float32)


def unit_vectors(output: np.ndarray) -> np.ndarray:
  """Vectors (B,H,W,3) -> float32 unit vectors, the zero vector where the output is zero."""
  out = output.astype(np.float32)
  norm = np.linalg.norm(out, axis=-1, keepdims=True)
  safe = np.where(norm > 0, norm, 1.0)
  return np.where(norm > 0, out / safe, 0.0).astype(np.float32)


def first_channel(output: np.ndarray) -> np.ndarray:
  """One value per pixel (B,H,W,1) -> float32 (B,H,W)."""
  return output[..., 0].astype(np.float32)


# ----------------------------------------------------------------------------------------
# Meters.
# ----------------------------------------------------------------------------------------


class Meter:
  """Base class: additive state, `update(pred, target, valid=None)`, `result()`."""

  def __init__(self, task: str):
    self.task = task  # names the task in error messages
    self._state = self._zero_state()

  def _zero_state(self) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def _accumulate(self, pred: np.ndarray, target: np.ndarray) -> None:
    raise NotImplementedError

  def result(self) -> dict[str, Any]:
    raise NotImplementedError

  def reset(self) -> None:
    self._state = self._zero_state()

  def state(self) -> dict[str, np.ndarray]:
    """A copy of the additive statistics (sum states of several meters to combine them)."""
    return {k: np.array(v, copy=True) for k, v in self._state.items()}

  def merge(self, other: "Meter | Mapping[str, np.ndarray]") -> "Meter":
    """Adds another meter's (or a `state()` dict's) statistics into this one; returns self."""
    other_state = other.state() if isinstance(other, Meter) else other
    if isinstance(other, Meter) and type(other) is not type(self):
      raise ValueError(f"merge: cannot merge {type(other).__name__} into {type(self).__name__}")
    if set(other_state) != set(self._state):
      raise ValueError(
          f"merge({self.task}): state keys {sorted(other_state)} != {sorted(self._state)}")
    for k, v in other_state.items():
      v = np.asarray(v)
      if v.shape != self._state[k].shape:
        raise ValueError(
            f"merge({self.task}): state {k!r} has shape {v.shape}, expected {self._state[k].shape}")
      self._state[k] = self._state[k] + v
    return self

  def update(self, pred: Any, target: Any, valid: Any = None) -> None:
    """Accumulates one batch.

    Args:
      pred: batched prediction as returned by `postprocess`.
      target: batched label in the tasks.py convention.
      valid: optional (B,) bool; False rows (padding examples) are skipped.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape[:1] != target.shape[:1]:
      raise ValueError(
          f"{self.task} meter: pred batch {pred.shape} and target batch {target.shape} differ")
    if valid is not None:
      valid = np.asarray(valid)
      if valid.shape != pred.shape[:1]:
        raise ValueError(
            f"{self.task} meter: valid must have shape {pred.shape[:1]}, got {valid.shape}")
      valid = valid.astype(bool)
      pred, target = pred[valid], target[valid]
    if pred.shape[0] == 0:
      return
    self._accumulate(pred, target)


def _check_same_shape(task: str, pred: np.ndarray, target: np.ndarray, ndim: int) -> None:
  if pred.shape != target.shape or pred.ndim != ndim:
    raise ValueError(
        f"{task} meter: expected pred and target of equal rank-{ndim} shape, "
        f"got pred {pred.shape} and target {target.shape}")


class ConfusionMatrixMeter(Meter):
  """mIoU from one confusion matrix over the whole split (semseg, human_parts).

  Pixels whose target is 255 are ignored. IoU_c = tp/(tp+fp+fn) for every class c; as in
  MTLoRA (eval_semseg.py / eval_human_parts.py: tp / max(tp+fp+fn, 1e-8)) a class absent from
  both prediction and target over the whole split gets IoU 0 and still counts in the mean over
  all `num_classes` classes. Images whose target is entirely 255 (human_parts: no person)
  contribute nothing. MTLoRA skips them too: its validation transforms (AddIgnoreRegions) turn
  a person-free parts map all-255 before its meter sees it (docs/evaluation.md).
  Result values are percentages.
  """

  def __init__(self, task: str, num_classes: int):
    if num_classes < 1:
      raise ValueError(f"{task} meter: num_classes must be >= 1, got {num_classes}")
    self.num_classes = int(num_classes)
    super().__init__(task)

  def _zero_state(self):
    k = self.num_classes
    return {"confusion": np.zeros((k, k), np.int64), "num_images": np.zeros((), np.int64)}

  def _accumulate(self, pred, target):
    _check_same_shape(self.task, pred, target, 3)
    k = self.num_classes
    mask = target != tasks_lib.IGNORE_INDEX
    t = target[mask].astype(np.int64)
    p = pred[mask].astype(np.int64)
    if t.size and (t.min() < 0 or t.max() >= k):
      raise ValueError(
          f"{self.task} meter: target ids must be in [0, {k}) or {tasks_lib.IGNORE_INDEX}, "
          f"found range [{t.min()}, {t.max()}]")
    if p.size and (p.min() < 0 or p.max() >= k):
      raise ValueError(
          f"{self.task} meter: predicted ids must be in [0, {k}), found [{p.min()}, {p.max()}]")
    self._state["confusion"] += np.bincount(k * t + p, minlength=k * k).reshape(k, k)
    self._state["num_images"] += int(mask.reshape(mask.shape[0], -1).any(axis=1).sum())

  def result(self):
    cm = self._state["confusion"].astype(np.float64)  # rows: target, cols: prediction
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    iou = tp / np.maximum(tp + fp + fn, 1e-8)
    total = cm.sum()
    if total == 0:
      miou = pixel_acc = math.nan
    else:
      miou = 100.0 * float(iou.mean())
      pixel_acc = 100.0 * float(tp.sum() / total)
    return {
        "mIoU": miou,
        "pixel_acc": pixel_acc,
        "per_class_IoU": (100.0 * iou).tolist(),
        "num_images": int(self._state["num_images"]),
    }


class SaliencyMeter(Meter):
  """Saliency mIoU / maxF, MTI-Net convention (MTLoRA eval_sal_no_beta.py + jaccard.py).

  For each image and threshold t in linspace(0.2, 0.9, 15): the binary mask is prob > t
  (strict); IoU = |gt ∩ mask| / |gt ∪ mask|, defined as 1 when both are empty; precision =
  tp/|mask| (0 when the mask is empty), recall = tp/|gt| (0 when gt is empty). IoU, precision
  and recall are averaged over images per threshold; 'mIoU' = max_t mean IoU, 'maxF' =
  max_t 2·P̄·R̄/(P̄+R̄) (0 when P̄+R̄ = 0), both in percent. Pixels labelled 255 are void
  (excluded from every count, as jaccard.py's void_pixels); images with no valid pixel are
  skipped. Takes probabilities: no second sigmoid (MTLoRA's 'Beta maxF' applies one twice).
  """

  def __init__(self, task: str, thresholds: np.ndarray = SAL_THRESHOLDS):
    self.thresholds = np.asarray(thresholds, np.float64)
    super().__init__(task)

  def _zero_state(self):
    n = len(self.thresholds)
    return {
        "sum_iou": np.zeros(n), "sum_precision": np.zeros(n), "sum_recall": np.zeros(n),
        "num_images": np.zeros((), np.int64),
    }

  def _accumulate(self, pred, target):
    _check_same_shape(self.task, pred, target, 3)
    b = pred.shape[0]
    valid = (target != tasks_lib.IGNORE_INDEX).reshape(b, -1)
    keep = valid.any(axis=1)
    if not keep.any():
      return
    valid = valid[keep]
    prob = pred.reshape(b, -1)[keep].astype(np.float64)
    gt = (target.reshape(b, -1)[keep] == 1) & valid
    n_gt = gt.sum(axis=1).astype(np.float64)
    for j, thr in enumerate(self.thresholds):
      mask = (prob > thr) & valid
      tp = (mask & gt).sum(axis=1).astype(np.float64)
      n_mask = mask.sum(axis=1).astype(np.float64)
      union = n_mask + n_gt - tp
      iou = np.where(union > 0, tp / np.maximum(union, 1.0), 1.0)
      precision = np.where(n_mask > 0, tp / np.maximum(n_mask, 1.0), 0.0)
      recall = np.where(n_gt > 0, tp / np.maximum(n_gt, 1.0), 0.0)
      self._state["sum_iou"][j] += iou.sum()
      self._state["sum_precision"][j] += precision.sum()
      self._state["sum_recall"][j] += recall.sum()
    self._state["num_images"] += int(keep.sum())

  def result(self):
    n = int(self._state["num_images"])
    if n == 0:
      return {"mIoU": math.nan, "maxF": math.nan, "mIoU_threshold": math.nan,
              "maxF_threshold": math.nan, "num_images": 0}
    miou = self._state["sum_iou"] / n
    p = self._state["sum_precision"] / n
    r = self._state["sum_recall"] / n
    f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1.0), 0.0)
    return {
        "mIoU": 100.0 * float(miou.max()),
        "maxF": 100.0 * float(f.max()),
        "mIoU_threshold": float(self.thresholds[int(np.argmax(miou))]),
        "maxF_threshold": float(self.thresholds[int(np.argmax(f))]),
        "num_images": n,
    }


class NormalsMeter(Meter):
  """Angular error (degrees) of surface normals over valid pixels of the whole split.

  Valid pixels: target is not the zero vector. Both vectors are L2-normalised and the angle
  is 2·atan2(|p−g|, |p+g|) in float64 (accurate near 0°, unlike acos of a dot product); a
  zero predicted vector scores 90°. Reports 'mean' (the paper's mErr; MTLoRA's logged
  'rmse' is this same mean because of a sqrt(x²) slip), a true 'rmse' = sqrt(mean err²),
  'median', and the % of pixels with error < 11.25/22.5/30°. mean, rmse and the
  percentages are exact; the median comes from a streaming histogram with `bin_width`
  degree bins (default 0.01°): each middle order statistic is placed inside its own bin
  (linear interpolation by rank), so the reported median is within `bin_width` of the exact
  one (np.median convention: mean of the two middle values for an even count).
  """

  def __init__(self, task: str, bin_width: float = 0.01):
    if bin_width <= 0:
      raise ValueError(f"{task} meter: bin_width must be > 0, got {bin_width}")
    self.bin_width = float(bin_width)
    self.num_bins = int(math.ceil(180.0 / self.bin_width))
    super().__init__(task)

  def _zero_state(self):
    return {
        "count": np.zeros((), np.int64), "sum": np.zeros(()), "sum_sq": np.zeros(()),
        "within": np.zeros(len(NORMALS_ANGLES), np.int64),
        "hist": np.zeros(self.num_bins, np.int64),
    }

  def _accumulate(self, pred, target):
    _check_same_shape(self.task, pred, target, 4)
    if pred.shape[-1] != 3:
      raise ValueError(f"normals meter: last axis must be 3, got shape {pred.shape}")
    valid = np.any(target != 0, axis=-1)
    g = target[valid].astype(np.float64)
    p = pred[valid].astype(np.float64)
    if g.shape[0] == 0:
      return
    g /= np.linalg.norm(g, axis=-1, keepdims=True)
    p_norm = np.linalg.norm(p, axis=-1, keepdims=True)
    p = np.where(p_norm > 0, p / np.where(p_norm > 0, p_norm, 1.0), 0.0)
    err = np.degrees(2.0 * np.arctan2(np.linalg.norm(p - g, axis=-1),
                                      np.linalg.norm(p + g, axis=-1)))
    s = self._state
    s["count"] += err.size
    s["sum"] += err.sum()
    s["sum_sq"] += np.square(err).sum()
    s["within"] += np.array([(err < a).sum() for a in NORMALS_ANGLES], np.int64)
    idx = np.clip((err / self.bin_width).astype(np.int64), 0, self.num_bins - 1)
    s["hist"] += np.bincount(idx, minlength=self.num_bins)

  def _order_statistic(self, k: int) -> float:
    """Estimate of the k-th smallest error (0-based): inside its bin, so within bin_width."""
    hist = self._state["hist"]
    cum = np.cumsum(hist)
    i = int(np.searchsorted(cum, k, side="right"))  # first bin with cum > k
    before = cum[i - 1] if i > 0 else 0
    return float((i + (k - before + 0.5) / hist[i]) * self.bin_width)

  def _median(self) -> float:
    n = int(self._state["count"])
    return 0.5 * (self._order_statistic((n - 1) // 2) + self._order_statistic(n // 2))

  def result(self):
    s = self._state
    n = int(s["count"])
    if n == 0:
      out = {"mean": math.nan, "median": math.nan, "rmse": math.nan}
      out.update({k: math.nan for k in _NORMALS_ANGLE_KEYS})
      out["num_pixels"] = 0
      return out
    out = {
        "mean": float(s["sum"] / n),
        "median": self._median(),
        "rmse": float(np.sqrt(s["sum_sq"] / n)),
    }
    for key, cnt in zip(_NORMALS_ANGLE_KEYS, s["within"]):
      out[key] = 100.0 * float(cnt) / n
    out["num_pixels"] = n
    return out


# MTLoRA's clamp of depth predictions before its errors (evaluation/eval_depth.py).
DEPTH_MIN_PREDICTION = 1e-9


class DepthMeter(Meter):
  """Depth RMSE and log-RMSE over valid pixels (target > 0), pooled over the whole split.

  As in MTI-Net / MTLoRA (evaluation/eval_depth.py): predictions are clamped to >= 1e-9 (no
  depth is negative) before *both* errors; squared errors are summed over every valid pixel of
  the split and divided by the pixel count (not a per-image average); log_rmse uses the natural
  log. 'rmse' is therefore comparable with published tables. 'rmse_raw' is the RMSE of the
  unclamped predictions: it differs from 'rmse' only while the (unbounded) depth head
  predicts negative depths, early in training or in a diverging run.
  """

  def _zero_state(self):
    return {"count": np.zeros((), np.int64), "sum_sq": np.zeros(()), "sum_log_sq": np.zeros(()),
            "sum_sq_raw": np.zeros(())}

  def _accumulate(self, pred, target):
    _check_same_shape(self.task, pred, target, 3)
    valid = target > 0
    t = target[valid].astype(np.float64)
    raw = pred[valid].astype(np.float64)
    p = np.maximum(raw, DEPTH_MIN_PREDICTION)
    self._state["count"] += t.size
    self._state["sum_sq"] += np.square(p - t).sum()
    self._state["sum_log_sq"] += np.square(np.log(p) - np.log(t)).sum()
    self._state["sum_sq_raw"] += np.square(raw - t).sum()

  def result(self):
    n = int(self._state["count"])
    if n == 0:
      return {"rmse": math.nan, "log_rmse": math.nan, "rmse_raw": math.nan, "num_pixels": 0}
    return {
        "rmse": float(np.sqrt(self._state["sum_sq"] / n)),
        "log_rmse": float(np.sqrt(self._state["sum_log_sq"] / n)),
        "rmse_raw": float(np.sqrt(self._state["sum_sq_raw"] / n)),
        "num_pixels": n,
    }


class EdgeMeter(Meter):
  """Class-balanced BCE of edge probabilities, averaged over the valid pixels of the split.

  loss = mean over pixels with target != 255 of −[w·y·log p + (1−w)·(1−y)·log(1−p)], w = 0.95
  (docs/design.md §3; the registry passes tasks.EDGE_POS_WEIGHT), p clipped to
  [1e-12, 1−1e-12]. MTLoRA's EdgeMeter instead feeds the probability into a logits loss (a
  double sigmoid) and counts 255 as an edge; we do neither, so our number is not comparable
  with its logs. The standard edge metric (odsF via the SEISM / BSDS toolbox with boundary
  matching) is out of scope here.
  """

  def __init__(self, task: str, pos_weight: float):
    self.pos_weight = float(pos_weight)
    super().__init__(task)

  def _zero_state(self):
    return {"count": np.zeros((), np.int64), "sum_loss": np.zeros(())}

  def _accumulate(self, pred, target):
    _check_same_shape(self.task, pred, target, 3)
    valid = target != tasks_lib.IGNORE_INDEX
    y = target[valid].astype(np.float64)
    p = np.clip(pred[valid].astype(np.float64), 1e-12, 1.0 - 1e-12)
    w = self.pos_weight
    loss = -(w * y * np.log(p) + (1.0 - w) * (1.0 - y) * np.log1p(-p))
    self._state["count"] += y.size
    self._state["sum_loss"] += loss.sum()

  def result(self):
    n = int(self._state["count"])
    if n == 0:
      return {"loss": math.nan, "num_pixels": 0}
    return {"loss": float(self._state["sum_loss"] / n), "num_pixels": n}


def make_meter(task: str, num_classes: int | None = None, **options) -> Meter:
  """The streaming meter of `task`'s kind (options go to its constructor, e.g. bin_width)."""
  kind = tasks_lib.get_task(task).kind
  classes = tasks_lib.class_count(task, num_classes)
  if classes is None and num_classes is not None:
    raise ValueError(f"make_meter({task!r}): num_classes only applies to tasks with classes")
  counts = {} if classes is None else {"num_classes": classes}
  return tasks_lib.resolve(kind.meter)(task, **counts, **{**kind.meter_options, **options})


# ----------------------------------------------------------------------------------------
# Multi-task summary.
# ----------------------------------------------------------------------------------------


def delta_m(results: Mapping[str, Mapping[str, Any]],
            reference: Mapping[str, Mapping[str, float]]) -> float:
  """Δm (%) = 100 · mean_t ±(M_t − S_t)/S_t over the tasks present in both dicts.

  M_t / S_t are the headline metrics of tasks.TASKS (sign + for higher-is-better: mIoU;
  − for lower-is-better: normals mean, depth rmse, edge loss). Tasks without a reference are
  skipped; raises if no task overlaps or a headline metric is missing.
  """
  terms = []
  for task, metrics in results.items():
    if task not in reference:
      continue
    spec = tasks_lib.get_task(task)
    key = spec.headline_metric
    if key not in metrics:
      raise KeyError(f"delta_m: results[{task!r}] has no headline metric {key!r}")
    if key not in reference[task]:
      raise KeyError(f"delta_m: reference[{task!r}] has no headline metric {key!r}")
    m, s = float(metrics[key]), float(reference[task][key])
    if s == 0:
      raise ValueError(f"delta_m: reference[{task!r}][{key!r}] is 0")
    sign = 1.0 if spec.higher_is_better else -1.0
    terms.append(sign * (m - s) / s)
  if not terms:
    raise ValueError(
        f"delta_m: no task in results {sorted(results)} has a reference {sorted(reference)}")
  return 100.0 * float(np.mean(terms))


def format_table(results: Mapping[str, Mapping[str, Any]],
                 class_names: Mapping[str, Sequence[str]] | None = None) -> str:
  """Plain-text table of scalar metrics per task; the headline metric is marked (↑/↓). A
  classification task's per-class IoU follows as one row per class ('IoU <name>', class ids
  where `class_names` has none)."""
  rows = []
  for task, metrics in results.items():
    spec = tasks_lib.TASKS.get(task)
    for key, value in metrics.items():
      if key == "per_class_IoU":
        names = list((class_names or {}).get(task, ()))
        for c, iou in enumerate(value):
          name = names[c] if c < len(names) else str(c)
          rows.append((task, f"  IoU {name}", "nan" if iou is None else f"{float(iou):.2f}"))
        continue
      if isinstance(value, (list, tuple, np.ndarray)):
        continue
      mark = ""
      if spec is not None and key == spec.headline_metric:
        mark = " ↑" if spec.higher_is_better else " ↓"
      if value is None:  # a non-finite value after a JSON round trip
        text = "nan"
      elif isinstance(value, (int, np.integer)):
        text = f"{int(value)}"
      else:
        text = f"{float(value):.4f}"
      rows.append((task, key + mark, text))
  headers = ("task", "metric", "value")
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(headers)]
  def line(cells):
    return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]),
                      cells[2].rjust(widths[2])])
  out = [line(headers), "  ".join("-" * w for w in widths)]
  prev = None
  for r in rows:
    out.append(line((r[0] if r[0] != prev else "", r[1], r[2])))
    prev = r[0]
  return "\n".join(out)
