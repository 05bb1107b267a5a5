"""PASCAL-Context multi-task builder (the "PASCAL_MT" folder of ASTMT / MTI-Net / MTLoRA).

Layout under manual_dir (see docs/datasets.md):
  JPEGImages/<id>.jpg
  ImageSets/Context/{train,val}.txt               4,998 / 5,105 ids
  semseg/VOC12/<id>.png (optional) or semseg/pascal-context/<id>.png
  human_parts/<id>.mat                            Pascal-Part 'anno' struct
  sal_distill/<id>.png
  normals_distill/<id>.png
  pascal-context/trainval/<id>.mat                'LabelMap' (459 context classes)

Preprocessing reproduces the MTLoRA / MTI-Net loaders so that numbers are comparable:
  semseg       PNG values as stored (21 classes, 255 ignore); a semseg/VOC12 file takes precedence
               over semseg/pascal-context when both exist, as in the reference loader.
  human_parts  person objects (class 15) painted with 6 parts + background 0; an image without an
               annotated person part is ignored entirely (all 255).
  sal          PNG / 255 > 0.5.
  normals      2 * PNG / 255 - 1, zero vector where the LabelMap class has no valid normals.
               Stored as read (not unit length): renormalise after resizing, as the baselines do.
  edge         pixels where the 4-neighbour Laplacian of LabelMap (reflect-101 borders) is
               non-zero, thinned to one pixel (Guo-Hall thinning, as skimage.morphology.thin).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from freesine_jax import tasks as tasks_lib
from freesine_jax.data import builder as builder_lib
from freesine_jax.data.builder import DatasetError

PERSON_CLASS = 15  # Pascal VOC class index of 'person' in the Pascal-Part annotations.

# Pascal-Part person part name -> one of 6 parts (0 is background):
# 1 head, 2 torso, 3 upper arms, 4 lower arms + hands, 5 upper legs, 6 lower legs + feet.
_PART_GROUPS = {
    1: ("hair", "head", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"),
    2: ("neck", "torso"),
    3: ("luarm", "ruarm"),
    4: ("llarm", "rlarm", "lhand", "rhand"),
    5: ("luleg", "ruleg"),
    6: ("llleg", "rlleg", "lfoot", "rfoot"),
}
HUMAN_PART_IDS = {name: pid for pid, names in _PART_GROUPS.items() for name in names}
# Class names per classification task (legends of freesine_jax.visualize; data/registry.py):
# semseg is PASCAL VOC's 20 classes + background, human_parts the 6 groups above + background.
CLASS_NAMES = {
    "semseg": ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor"),
    "human_parts": ("background", "head", "torso", "upper_arms", "lower_arms", "upper_legs",
                    "lower_legs"),
}

# PASCAL-Context (459-class LabelMap) ids whose distilled normals are kept: the context classes
# whose names also appear in the NYUDv2 class list (except 'unknown'), plus 'tvmonitor' (427),
# as derived by the MTI-Net / MTLoRA loaders from their nyu_classes.json / context_classes.json.
NORMALS_VALID_CLASSES = np.array([
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49,
    50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101,
    104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159,
    165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223,
    225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269,
    272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309,
    310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368,
    370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417,
    419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
], dtype=np.int64)

NUM_CONTEXT_CLASSES = 459  # LabelMap values are 0 (unlabelled) .. 459.
SEMSEG_VALUES = np.array(list(range(21)) + [tasks_lib.IGNORE_INDEX])


# ----------------------------------------------------------------------------- pure transforms


def laplacian_edges(label_map: np.ndarray) -> np.ndarray:
  """Pixels where the 4-neighbour Laplacian of a label map is non-zero (reflect-101 borders).

  Equals `cv2.Laplacian(label_map, cv2.CV_64F) != 0` (ksize 1, default border), which the
  reference loaders use; note a pixel between two different labels can still have a zero
  Laplacian (e.g. labels 1, 2, 3 along a row).
  """
  x = label_map.astype(np.float64)
  p = np.pad(x, 1, mode="reflect")  # numpy 'reflect' = OpenCV BORDER_REFLECT_101.
  lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4.0 * x
  return lap != 0


def _neighbours(img: np.ndarray) -> list[np.ndarray]:
  """The 8 neighbours of every pixel (zero outside), counter-clockwise from east."""
  h, w = img.shape
  p = np.pad(img, 1)
  offsets = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))
  return [p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in offsets]


def thin(mask: np.ndarray) -> np.ndarray:
  """Guo & Hall (1989) parallel two-subiteration thinning of a binary image to 1-pixel lines.

  Same decisions as skimage.morphology.thin: a pixel is deleted when its 8-neighbourhood has
  exactly one 4-connected 'crossing', min(N1, N2) is 2 or 3, and the subiteration's directional
  condition holds; iterate until nothing changes.
  """
  img = np.asarray(mask, dtype=bool).copy()
  while True:
    count = int(img.sum())
    for subiteration in (0, 1):
      x = _neighbours(img)
      crossings = sum((~x[k]) & (x[k + 1] | x[(k + 2) % 8]) for k in (0, 2, 4, 6))
      n1 = sum((x[k - 1] | x[k]).astype(np.int32) for k in (1, 3, 5, 7))
      n2 = sum((x[k] | x[(k + 1) % 8]).astype(np.int32) for k in (1, 3, 5, 7))
      n = np.minimum(n1, n2)
      if subiteration == 0:
        directional = ~((x[1] | x[2] | ~x[7]) & x[0])
      else:
        directional = ~((x[5] | x[6] | ~x[3]) & x[4])
      img &= ~((crossings == 1) & (n >= 2) & (n <= 3) & directional)
    if int(img.sum()) == count:
      return img


def edges_from_label_map(label_map: np.ndarray) -> np.ndarray:
  """uint8 {0, 1} edge map: thinned Laplacian boundaries of the LabelMap."""
  return thin(laplacian_edges(label_map)).astype(np.uint8)


def normals_from_png(rgb: np.ndarray, label_map: np.ndarray) -> np.ndarray:
  """2x/255-1, zeroed where the LabelMap class has no valid (NYU-like) normals."""
  normals = 2.0 * rgb.astype(np.float32) / 255.0 - 1.0
  valid = np.isin(label_map, NORMALS_VALID_CLASSES)
  return np.where(valid[..., None], normals, np.float32(0)).astype(np.float32)


def saliency_from_png(gray: np.ndarray) -> np.ndarray:
  return (gray.astype(np.float64) / 255.0 > 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- .mat readers


def human_parts_from_anno(anno: Any, shape: tuple[int, int], where: str) -> np.ndarray:
  """Paints person parts from a Pascal-Part 'anno' struct (as read by scipy.io.loadmat).

  Struct fields are read by position, as the reference loader does: anno = (imname, objects),
  object = (class, class_ind, mask, parts), part = (part_name, mask). Returns uint8 (H, W) with
  0 background, 1..6 parts, or all 255 when the image has no annotated person part.
  """
  try:
    objects = anno[0][0][1][0]
  except (IndexError, TypeError, KeyError, ValueError) as e:
    raise DatasetError(f"{where}: 'anno' is not a Pascal-Part struct (anno.objects: {e})"
                       ) from None
  target = np.zeros(shape, np.uint8)
  has_person = False
  for i in range(len(objects)):
    obj = objects[i]
    try:
      class_ind = int(np.asarray(obj[1]).ravel()[0])
      obj_mask = np.asarray(obj[2])
      parts = obj[3]
    except (IndexError, TypeError, ValueError) as e:
      raise DatasetError(f"{where}: object {i} lacks (class, class_ind, mask, parts) ({e})"
                         ) from None
    if class_ind != PERSON_CLASS:
      continue
    if obj_mask.shape != shape:
      raise DatasetError(f"{where}: object {i} mask has shape {obj_mask.shape}, expected "
                         f"{shape} (the image's height x width)")
    has_person |= bool(obj_mask.sum() > 0)  # The reference's area threshold is 0.
    if len(parts) == 0:
      continue
    for j in range(len(parts[0])):
      part = parts[0][j]
      try:
        name = str(np.asarray(part[0]).ravel()[0])
        part_mask = np.asarray(part[1]).astype(bool)
      except (IndexError, TypeError, ValueError) as e:
        raise DatasetError(f"{where}: object {i} part {j} lacks (part_name, mask) ({e})"
                           ) from None
      if name not in HUMAN_PART_IDS:
        raise DatasetError(f"{where}: object {i} has unknown person part name {name!r}")
      if part_mask.shape != shape:
        raise DatasetError(f"{where}: object {i} part {name!r} mask has shape "
                           f"{part_mask.shape}, expected {shape}")
      target[part_mask] = HUMAN_PART_IDS[name]
  if not has_person or not np.any(target):
    return np.full(shape, tasks_lib.IGNORE_INDEX, np.uint8)
  return target


# ----------------------------------------------------------------------------- builder


@dataclasses.dataclass(frozen=True)
class _Ref:
  image_id: str
  semseg_path: str

  def __str__(self) -> str:
    return self.image_id


class PascalContextMT(builder_lib.ManualDirBuilder):
  """PASCAL-Context multi-task: semseg, human_parts, sal, normals, edge."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "PASCAL_MT layout, MTLoRA/MTI-Net preprocessing."}
  TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
  SPLITS = ("train", "val")
  DESCRIPTION = "PASCAL-Context multi-task (PASCAL_MT), read from a local folder."
  HOMEPAGE = "https://cs.stanford.edu/~roozbeh/pascal-context/"

  @staticmethod
  def paths(root: str, image_id: str) -> dict[str, str]:
    j = os.path.join
    return {
        "image": j(root, "JPEGImages", image_id + ".jpg"),
        "semseg_voc": j(root, "semseg", "VOC12", image_id + ".png"),
        "semseg": j(root, "semseg", "pascal-context", image_id + ".png"),
        "human_parts": j(root, "human_parts", image_id + ".mat"),
        "sal": j(root, "sal_distill", image_id + ".png"),
        "normals": j(root, "normals_distill", image_id + ".png"),
        "label_map": j(root, "pascal-context", "trainval", image_id + ".mat"),
    }

  def list_examples(self, root: str) -> dict[str, list[_Ref]]:
    plan, required = {}, []
    for split in self.SPLITS:
      ids = builder_lib.read_id_list(os.path.join(root, "ImageSets", "Context", split + ".txt"))
      refs = []
      for image_id in ids:
        p = self.paths(root, image_id)
        semseg = p["semseg_voc"] if os.path.isfile(p["semseg_voc"]) else p["semseg"]
        required += [(p["image"], "RGB image"), (semseg, "21-class semseg PNG"),
                     (p["human_parts"], "Pascal-Part annotation .mat"),
                     (p["sal"], "distilled saliency PNG"),
                     (p["normals"], "distilled normals PNG"),
                     (p["label_map"], "PASCAL-Context 'LabelMap' .mat")]
        refs.append(_Ref(image_id, semseg))
      plan[split] = refs
    builder_lib.check_files_exist(root, required)
    return plan

  def load_example(self, root: str, ref: _Ref) -> dict[str, Any]:
    p = self.paths(root, ref.image_id)
    image, hw = builder_lib.read_rgb_image(p["image"], root)

    semseg = builder_lib.read_png_array(ref.semseg_path, root)
    builder_lib.check_shape(semseg, hw, ref.semseg_path, root, "semseg")
    builder_lib.check_values(semseg, SEMSEG_VALUES, ref.semseg_path, root, "semseg class")

    anno = builder_lib.load_mat(p["human_parts"], root, "anno")
    parts = human_parts_from_anno(anno, hw, builder_lib.rel(root, p["human_parts"]))

    sal_png = builder_lib.read_png_array(p["sal"], root)
    builder_lib.check_shape(sal_png, hw, p["sal"], root, "saliency")

    label_map = np.asarray(builder_lib.load_mat(p["label_map"], root, "LabelMap"))
    builder_lib.check_shape(label_map, hw, p["label_map"], root, "LabelMap")
    if label_map.dtype.kind not in "iuf":
      raise DatasetError(f"{builder_lib.rel(root, p['label_map'])}: LabelMap has dtype "
                         f"{label_map.dtype}, expected integer class ids")
    builder_lib.check_values(label_map, np.arange(NUM_CONTEXT_CLASSES + 1), p["label_map"], root,
                   "PASCAL-Context class")

    normals_png = builder_lib.read_png_array(p["normals"], root, channels=3)
    builder_lib.check_shape(normals_png, hw + (3,), p["normals"], root, "normals")

    return {
        "image": image,
        "id": ref.image_id,
        "semseg": semseg.astype(np.uint8),
        "human_parts": parts,
        "sal": saliency_from_png(sal_png),
        "normals": normals_from_png(normals_png, label_map),
        "edge": edges_from_label_map(label_map),
    }
