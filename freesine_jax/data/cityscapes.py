"""Cityscapes builder for the 2-task setting: semseg (19 train ids) + depth from disparity.

Layout under manual_dir (the official packages leftImg8bit_trainvaltest, gtFine_trainvaltest,
disparity_trainvaltest, camera_trainvaltest unpacked side by side; see docs/datasets.md):
  leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
  disparity/{train,val}/<city>/<city>_<seq>_<frame>_disparity.png
  camera/{train,val}/<city>/<city>_<seq>_<frame>_camera.json

semseg: labelIds -> trainIds with the official table (19 classes, everything else 255).
depth:  the 16-bit disparity PNG stores p = 256 * d + 1 for a disparity d > 0 and 0 for missing,
        so d = (p - 1) / 256 and depth [m] = baseline [m] * fx [px] / d, with baseline and fx
        from the camera JSON ('extrinsic.baseline', 'intrinsic.fx'). p = 0 (and p = 1, d = 0)
        give depth 0, the invalid value.
"""
from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from freesine_jax import tasks as tasks_lib
from freesine_jax.data import builder as builder_lib
from freesine_jax.data.builder import DatasetError

# Official labelId (0..33) -> trainId; 255 = not evaluated.
_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
              24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
NUM_LABEL_IDS = 34
# Class names of the 19 train ids (legends of freesine_jax.visualize; data/registry.py).
CLASS_NAMES = {"semseg": (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle")}
LABEL_TO_TRAIN = np.full(256, tasks_lib.IGNORE_INDEX, np.uint8)
for _label_id, _train_id in _TRAIN_IDS.items():
  LABEL_TO_TRAIN[_label_id] = _train_id


def semseg_from_label_ids(label_ids: np.ndarray) -> np.ndarray:
  return LABEL_TO_TRAIN[label_ids.astype(np.int64)]


def depth_from_disparity(raw: np.ndarray, baseline: float, fx: float) -> np.ndarray:
  """Metric depth (float32, 0 = invalid) from a raw Cityscapes disparity PNG."""
  disparity = (raw.astype(np.float64) - 1.0) / 256.0
  valid = (raw > 0) & (disparity > 0)
  depth = np.zeros(raw.shape, np.float64)
  depth[valid] = baseline * fx / disparity[valid]
  return depth.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Ref:
  split: str
  city: str
  stem: str  # <city>_<seq>_<frame>

  def __str__(self) -> str:
    return self.stem


class CityscapesMT(builder_lib.ManualDirBuilder):
  """Cityscapes: semseg (19 classes) + depth (metres) from disparity."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official layout; depth = baseline * fx / ((p - 1) / 256)."}
  TASKS = ("semseg", "depth")
  SPLITS = ("train", "val")
  DESCRIPTION = "Cityscapes semseg + depth from disparity, read from a local folder."
  HOMEPAGE = "https://www.cityscapes-dataset.com/"

  @staticmethod
  def paths(root: str, ref: _Ref) -> dict[str, str]:
    def path(kind: str, suffix: str) -> str:
      return os.path.join(root, kind, ref.split, ref.city, f"{ref.stem}_{suffix}")
    return {"image": path("leftImg8bit", "leftImg8bit.png"),
            "semseg": path("gtFine", "gtFine_labelIds.png"),
            "disparity": path("disparity", "disparity.png"),
            "camera": path("camera", "camera.json")}

  def list_examples(self, root: str) -> dict[str, list[_Ref]]:
    plan, required = {}, []
    what = {"image": "RGB image", "semseg": "labelIds PNG", "disparity": "16-bit disparity PNG",
            "camera": "camera JSON"}
    suffix = "_leftImg8bit.png"
    for split in self.SPLITS:
      split_dir = os.path.join(root, "leftImg8bit", split)
      if not os.path.isdir(split_dir):
        raise DatasetError(f"{builder_lib.rel(root, split_dir)}: missing (expected "
                           f"leftImg8bit/{split}/<city>/*{suffix})")
      files = sorted(glob.glob(os.path.join(split_dir, "*", "*" + suffix)))
      if not files:
        raise DatasetError(f"{builder_lib.rel(root, split_dir)}: no images found (expected "
                           f"<city>/*{suffix})")
      refs = [_Ref(split, os.path.basename(os.path.dirname(f)),
                   os.path.basename(f)[:-len(suffix)]) for f in files]
      for ref in refs:
        required += [(p, what[k]) for k, p in self.paths(root, ref).items() if k != "image"]
      plan[split] = refs
    builder_lib.check_files_exist(root, required)
    return plan

  def load_example(self, root: str, ref: _Ref) -> dict[str, Any]:
    p = self.paths(root, ref)
    image, hw = builder_lib.read_rgb_image(p["image"], root)

    label_ids = builder_lib.read_png_array(p["semseg"], root)
    builder_lib.check_shape(label_ids, hw, p["semseg"], root, "labelIds")
    builder_lib.check_values(label_ids, np.arange(NUM_LABEL_IDS), p["semseg"], root,
                             "Cityscapes labelId")

    disparity = builder_lib.read_png_array(p["disparity"], root)
    builder_lib.check_shape(disparity, hw, p["disparity"], root, "disparity")
    if disparity.dtype.kind not in "iu":
      raise DatasetError(f"{builder_lib.rel(root, p['disparity'])}: expected an integer "
                         f"(16-bit) PNG, got dtype {disparity.dtype}")

    camera = builder_lib.read_json(p["camera"], root)
    try:
      baseline = float(camera["extrinsic"]["baseline"])
      fx = float(camera["intrinsic"]["fx"])
    except (KeyError, TypeError, ValueError) as e:
      raise DatasetError(f"{builder_lib.rel(root, p['camera'])}: expected numeric "
                         f"extrinsic.baseline and intrinsic.fx ({type(e).__name__}: {e})"
                         ) from None
    if not (baseline > 0 and fx > 0):
      raise DatasetError(f"{builder_lib.rel(root, p['camera'])}: baseline ({baseline}) and "
                         f"fx ({fx}) must be positive")

    return {"image": image, "id": ref.stem, "semseg": semseg_from_label_ids(label_ids),
            "depth": depth_from_disparity(disparity, baseline, fx)}
