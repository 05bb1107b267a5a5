"""Numpy augmentations applied consistently to an image and all its dense labels (docs/design.md §3).

An example is a dict in the stored layout (freesine_jax/data/synthetic.py docstring): 'image' uint8
(H, W, 3) and any of 'semseg', 'human_parts', 'sal', 'edge' (uint8 (H, W)), 'normals' (float (H, W, 3),
zero = invalid) and 'depth' (float (H, W), 0 = invalid). Other keys pass through untouched. How
each label moves is its kind's `warp` (and `mirror`) in the task registry (freesine_jax/tasks.py);
those functions are defined here.

What follows MTLoRA's data/custom_transforms.py and data/mtl_ds.py (read for this port):
- RandomHorizontalFlip: p = 0.5, every map flipped, normals x negated.
- ScaleNRotate: one angle and scale per example (PASCAL: U(-20, 20) degrees, U(0.75, 1.25); NYUD:
  angle 0, scale drawn from {1.0, 1.2, 1.5}) about the image centre, zero borders for EVERY map
  (cv2.warpAffine's default constant 0): border pixels become class 0 for semseg/human_parts, 0 for
  sal/edge, zero normals (ignored) and zero depth (ignored). `label_fill='ignore'` is offered to fill
  discrete labels with 255 instead; it is not MTLoRA's behaviour and off by default.
  Interpolation: nearest for semseg, human_parts, sal, edge and depth; depth is divided by the scale
  (zooming in by s brings the scene s times closer). Normals: the in-plane (x, y) part is rotated
  with the image, then the map is resampled and renormalised.
- FixedResize to the training size (no crop); AddIgnoreRegions: a human_parts map with no part pixel
  left becomes all 255 (MTLoRA tests "all zero"; our stored maps are 255 without a person, so we test
  "no value in 1..254", which is the same rule).
- Normalize with the ImageNet mean/std after scaling to [0, 1].

Differences, by choice: rotation/scale and the resize are composed into ONE resampling (no double
interpolation); the image is bilinear by default (MTLoRA: bicubic; `image_order=3` gives scipy's
cubic spline); normals are bilinear and renormalised, valid where the nearest source pixel is valid;
pixel centres are aligned (source x = (x' + 0.5) * W_in / W_out - 0.5).

Sign conventions. Image coordinates: x = column (right), y = row (down). A positive angle rotates the
picture counter-clockwise as displayed (cv2.getRotationMatrix2D): a feature to the right of the
centre moves above it. The stored normal's x, y follow the same image axes, so the same rotation
applied to a normal vector is n_x' = cos(a) n_x + sin(a) n_y, n_y' = -sin(a) n_x + cos(a) n_y
(a normal pointing right, (1, 0, 0), becomes (0, -1, 0), pointing up, after +90 degrees) — exactly
MTLoRA's atan2 formula.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import ndimage

from freesine_jax import tasks as tasks_lib

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """One example's random transform (sampled by `sample_params`)."""
  flip: bool = False
  angle_degrees: float = 0.0
  scale: float = 1.0


def sample_params(rng: np.random.Generator, *, flip: bool = True, rotate_degrees: float = 0.0,
                  scale_range: Sequence[float] | None = None,
                  scales: Sequence[float] | None = None) -> AugmentParams:
  """Draws (flip, angle, scale); always three draws in the same order so streams stay aligned."""
  u_flip, u_angle, u_scale = rng.random(3)
  if scales is not None and scale_range is not None:
    raise ValueError("augment: give either `scales` (discrete, NYUD) or `scale_range`, not both; "
                     f"got scales={scales!r}, scale_range={scale_range!r}")
  if scales is not None:
    scale = float(scales[min(int(u_scale * len(scales)), len(scales) - 1)])
  elif scale_range is not None:
    lo, hi = scale_range
    scale = float(lo + (hi - lo) * u_scale)
  else:
    scale = 1.0
  return AugmentParams(flip=bool(flip and u_flip < 0.5),
                       angle_degrees=float(rotate_degrees * (2.0 * u_angle - 1.0)), scale=scale)


def _task_labels(example: dict) -> list[tuple[str, tasks_lib.TaskSpec]]:
  """(key, spec) of the example's task labels: the maps that move with the image."""
  return [(key, tasks_lib.TASKS[key]) for key in example if key in tasks_lib.TASKS]


def hflip(example: dict) -> dict:
  """Mirrors every map left-right, then applies the label kinds' mirrors (normals: -x)."""
  out = dict(example)
  out["image"] = np.ascontiguousarray(example["image"][:, ::-1])
  for key, spec in _task_labels(example):
    out[key] = np.ascontiguousarray(example[key][:, ::-1])
    if spec.kind.mirror is not None:
      out[key] = tasks_lib.resolve(spec.kind.mirror)(out[key])
  return out


def mirror_normals(normals: np.ndarray) -> np.ndarray:
  """Normals of a left-right mirrored picture: the x component changes sign."""
  return normals * np.array([-1.0, 1.0, 1.0], normals.dtype)


def rotate_normal_vectors(normals: np.ndarray, angle_degrees: float) -> np.ndarray:
  """Rotates the in-plane (x, y) part of every normal as the picture rotates (see docstring)."""
  a = np.deg2rad(angle_degrees)
  c, s = np.cos(a), np.sin(a)
  nx, ny = normals[..., 0], normals[..., 1]
  return np.stack([c * nx + s * ny, -s * nx + c * ny, normals[..., 2]], axis=-1)


def source_coordinates(in_size: tuple[int, int], out_size: tuple[int, int],
                       angle_degrees: float = 0.0, scale: float = 1.0):
  """Source (row, col) of each output pixel for rotate+scale about the centre, then resize."""
  (h_in, w_in), (h_out, w_out) = in_size, out_size
  yo, xo = np.meshgrid(np.arange(h_out, dtype=np.float64), np.arange(w_out, dtype=np.float64),
                       indexing="ij")
  qx = (xo - (w_out - 1) / 2.0) * (w_in / w_out)
  qy = (yo - (h_out - 1) / 2.0) * (h_in / h_out)
  a = np.deg2rad(angle_degrees)
  c, s = np.cos(a), np.sin(a)
  xs = (w_in - 1) / 2.0 + (c * qx - s * qy) / scale
  ys = (h_in - 1) / 2.0 + (s * qx + c * qy) / scale
  return ys, xs


class _Sampler:
  """Nearest and bilinear gather indices/weights of one warp, shared by every map."""

  def __init__(self, ys: np.ndarray, xs: np.ndarray, in_size: tuple[int, int]):
    h, w = in_size
    self.in_size = in_size
    self.inside = (ys >= -0.5) & (ys <= h - 0.5) & (xs >= -0.5) & (xs <= w - 0.5)
    r = np.clip(np.floor(ys + 0.5).astype(np.int64), 0, h - 1)
    c = np.clip(np.floor(xs + 0.5).astype(np.int64), 0, w - 1)
    self.nearest = (r * w + c).ravel()
    y = np.clip(ys, 0, h - 1)
    x = np.clip(xs, 0, w - 1)
    y0 = np.floor(y).astype(np.int64)
    x0 = np.floor(x).astype(np.int64)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (y - y0).ravel()
    wx = (x - x0).ravel()
    self.corners = [(y0 * w + x0).ravel(), (y0 * w + x1).ravel(), (y1 * w + x0).ravel(),
                    (y1 * w + x1).ravel()]
    self.weights = [((1 - wy) * (1 - wx)).astype(np.float32), ((1 - wy) * wx).astype(np.float32),
                    (wy * (1 - wx)).astype(np.float32), (wy * wx).astype(np.float32)]
    self.out_shape = ys.shape

  def _flat(self, arr):
    return arr.reshape((-1,) + arr.shape[2:])

  def _finish(self, out, fill, dtype):
    out = out.reshape(self.out_shape + out.shape[1:])
    mask = self.inside if out.ndim == 2 else self.inside[..., None]
    return np.where(mask, out, np.asarray(fill, dtype)).astype(dtype)

  def nearest_sample(self, arr: np.ndarray, fill) -> np.ndarray:
    return self._finish(np.take(self._flat(arr), self.nearest, axis=0), fill, arr.dtype)

  def bilinear_sample(self, arr: np.ndarray) -> np.ndarray:
    """Bilinear with edge clamping inside the source, 0 outside; float32 output."""
    flat = self._flat(np.asarray(arr, np.float32))
    out = None
    for idx, wgt in zip(self.corners, self.weights):
      term = np.take(flat, idx, axis=0) * (wgt if flat.ndim == 1 else wgt[:, None])
      out = term if out is None else out + term
    return self._finish(out, 0.0, np.float32)


def _cubic(arr, ys, xs, sampler: _Sampler):
  chans = arr[..., None] if arr.ndim == 2 else arr
  out = np.stack([ndimage.map_coordinates(chans[..., k].astype(np.float32), [ys, xs], order=3,
                                          mode="nearest") for k in range(chans.shape[-1])], -1)
  out = out[..., 0] if arr.ndim == 2 else out
  mask = sampler.inside if out.ndim == 2 else sampler.inside[..., None]
  return np.where(mask, out, 0.0).astype(np.float32)


def warp(example: dict, out_size: tuple[int, int], *, angle_degrees: float = 0.0,
         scale: float = 1.0, image_order: int = 1, label_fill: str = "zero") -> dict:
  """Rotates by `angle_degrees`, zooms by `scale` about the centre and resizes to `out_size`.

  Returns 'image' float32 in [0, 255] (not yet normalised) and every task label resampled by
  its kind's warp (tasks.py): discrete labels uint8, 'normals' float32 unit-or-zero, 'depth'
  float32 (divided by `scale`).
  """
  if label_fill not in ("zero", "ignore"):
    raise ValueError(f"augment.warp: label_fill must be 'zero' or 'ignore', got {label_fill!r}")
  if image_order not in (1, 3):
    raise ValueError(f"augment.warp: image_order must be 1 (bilinear) or 3, got {image_order!r}")
  in_size = tuple(example["image"].shape[:2])
  out_size = (int(out_size[0]), int(out_size[1]))
  for key, _ in _task_labels(example):
    if tuple(example[key].shape[:2]) != in_size:
      raise ValueError(f"augment.warp: '{key}' has spatial shape {example[key].shape[:2]}, "
                       f"but 'image' has {in_size}")
  ys, xs = source_coordinates(in_size, out_size, angle_degrees, scale)
  sampler = _Sampler(ys, xs, in_size)
  out = dict(example)
  if image_order == 1:
    image = sampler.bilinear_sample(example["image"])
  else:
    image = _cubic(example["image"], ys, xs, sampler)
  out["image"] = np.clip(image, 0.0, 255.0)
  for key, spec in _task_labels(example):
    out[key] = tasks_lib.resolve(spec.kind.warp)(
        example[key], sampler, angle_degrees=angle_degrees, scale=scale, label_fill=label_fill)
    if spec.ignore_without_foreground:
      out[key] = _ignore_without_foreground(out[key])
  return out


def warp_class_ids(labels: np.ndarray, sampler: _Sampler, *, angle_degrees: float,
                   scale: float, label_fill: str) -> np.ndarray:
  """Nearest neighbour; pixels from outside the source are 0 (label_fill 'zero') or 255."""
  del angle_degrees, scale  # class ids do not change with the geometry
  fill = 0 if label_fill == "zero" else tasks_lib.IGNORE_INDEX
  return sampler.nearest_sample(np.asarray(labels, np.uint8), fill)


def warp_normals(normals: np.ndarray, sampler: _Sampler, *, angle_degrees: float, scale: float,
                 label_fill: str) -> np.ndarray:
  """In-plane part rotated with the picture, bilinear resampling, renormalised; zero = invalid.

  A pixel stays valid where its nearest source pixel is valid and the interpolated vector is
  not (near) zero; outside the source it is invalid whatever label_fill says.
  """
  del scale, label_fill  # zooming does not tilt a surface; invalid is always the zero vector
  normals = rotate_normal_vectors(np.asarray(normals, np.float32), angle_degrees)
  valid_src = np.linalg.norm(normals, axis=-1) > 0.5
  valid = sampler.nearest_sample(valid_src, False)
  n = sampler.bilinear_sample(normals)
  norm = np.linalg.norm(n, axis=-1, keepdims=True)
  valid &= norm[..., 0] > 1e-6
  return np.where(valid[..., None], n / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def warp_depth(depth: np.ndarray, sampler: _Sampler, *, angle_degrees: float, scale: float,
               label_fill: str) -> np.ndarray:
  """Nearest neighbour, divided by `scale` (zooming in by s brings the scene s times closer)."""
  del angle_degrees, label_fill  # rotation about the optical axis keeps depth; 0 = invalid
  depth = sampler.nearest_sample(np.asarray(depth, np.float32), 0.0)
  return np.where(depth > 0, depth / scale, 0.0).astype(np.float32)


def _ignore_without_foreground(labels: np.ndarray) -> np.ndarray:
  """All 255 when no foreground value (1..254) is left, e.g. parts of a person cropped away."""
  if np.any((labels > 0) & (labels != tasks_lib.IGNORE_INDEX)):
    return labels
  return np.full_like(labels, tasks_lib.IGNORE_INDEX)


def resize(example: dict, out_size: tuple[int, int], *, image_order: int = 1) -> dict:
  """Eval transform: resize only (same interpolation rules as `warp`)."""
  return warp(example, out_size, image_order=image_order)


def augment(example: dict, rng: np.random.Generator, out_size: tuple[int, int], *,
            flip: bool = True, rotate_degrees: float = 0.0,
            scale_range: Sequence[float] | None = None, scales: Sequence[float] | None = None,
            image_order: int = 1, label_fill: str = "zero") -> dict:
  """Train transform: random h-flip, rotation and scale, then resize to `out_size`."""
  params = sample_params(rng, flip=flip, rotate_degrees=rotate_degrees, scale_range=scale_range,
                         scales=scales)
  return apply_params(example, params, out_size, image_order=image_order, label_fill=label_fill)


def apply_params(example: dict, params: AugmentParams, out_size: tuple[int, int], *,
                 image_order: int = 1, label_fill: str = "zero") -> dict:
  if params.flip:
    example = hflip(example)
  return warp(example, out_size, angle_degrees=params.angle_degrees, scale=params.scale,
              image_order=image_order, label_fill=label_fill)


def normalize_image(image: np.ndarray) -> np.ndarray:
  """[0, 255] RGB -> ImageNet-normalised float32."""
  return ((np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(
      np.float32)


def to_model_inputs(example: dict, tasks: Sequence[str]) -> dict:
  """Normalised 'image' plus the labels of `tasks` in the batch dtypes of freesine_jax/tasks.py."""
  out = {"image": normalize_image(example["image"])}
  for task in tasks:
    if task not in example:
      raise KeyError(f"Task {task!r} is not in the example (keys: {sorted(example)}); the dataset "
                     "does not provide this label.")
    out[task] = np.asarray(example[task]).astype(tasks_lib.get_task(task).kind.label.batch_dtype)
  return out
