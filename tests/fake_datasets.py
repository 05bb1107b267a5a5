"""Tiny fake dataset folders in the exact PASCAL_MT / NYUD_MT / Cityscapes layouts.

Every label is hand-designed so that the expected decoded value of each pixel can be written
down independently of the builders (see test_datasets_real.py).
"""
from __future__ import annotations

import json
import os

import numpy as np
import scipy.io
from PIL import Image

H, W = 16, 20


def _mkdir_for(path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return path


def rgb(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def save_png(path: str, arr: np.ndarray) -> None:
  Image.fromarray(arr).save(_mkdir_for(path))


def save_jpg(path: str, arr: np.ndarray) -> None:
  Image.fromarray(arr).save(_mkdir_for(path), format="JPEG", quality=95)


def write_lines(path: str, ids) -> None:
  with open(_mkdir_for(path), "w") as f:
    f.write("\n".join(ids) + "\n")


# ----------------------------------------------------------------------------- PASCAL


def box(r0, r1, c0, c1) -> np.ndarray:
  m = np.zeros((H, W), np.uint8)
  m[r0:r1, c0:c1] = 1
  return m


def pascal_part_anno(objects) -> np.ndarray:
  """objects: [(class_name, class_ind, mask, [(part_name, mask), ...])] -> 'anno' struct."""
  objs = np.empty((1, len(objects)),
                  dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
  for i, (name, ind, mask, parts) in enumerate(objects):
    if parts:
      p = np.empty((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
      for j, (pname, pmask) in enumerate(parts):
        p[0, j] = (pname, pmask.astype(np.uint8))
    else:
      p = np.zeros((0, 0))
    objs[0, i] = (name, np.array([[ind]], np.uint8), mask.astype(np.uint8), p)
  anno = np.empty((1, 1), dtype=[("imname", "O"), ("objects", "O")])
  anno[0, 0] = ("img", objs)
  return anno


# Objects per image id: 'p1' has a person with parts (and a dog), 'p2' only a cat,
# 'p3' a person without part annotations.
PASCAL_TRAIN = ("2008_000001", "2008_000002")
PASCAL_VAL = ("2008_000003",)

PERSON_A = box(2, 12, 3, 9)
PASCAL_OBJECTS = {
    "2008_000001": [
        ("person", 15, PERSON_A, [("hair", box(2, 4, 3, 9)), ("torso", box(4, 8, 3, 9)),
                                  ("luarm", box(4, 6, 3, 4)), ("rhand", box(6, 8, 8, 9)),
                                  ("ruleg", box(8, 10, 3, 9)), ("lfoot", box(10, 12, 3, 9))]),
        ("dog", 12, box(12, 16, 10, 20), []),
    ],
    "2008_000002": [("cat", 8, box(0, 8, 0, 8), [])],
    "2008_000003": [("person", 15, box(0, 5, 0, 5), [])],
}


def pascal_expected_parts(image_id: str) -> np.ndarray:
  """Hand-written expectation: 6-part ids painted in annotation order, else all 255."""
  if image_id != "2008_000001":
    return np.full((H, W), 255, np.uint8)
  t = np.zeros((H, W), np.uint8)
  t[2:4, 3:9] = 1   # hair -> head
  t[4:8, 3:9] = 2   # torso
  t[4:6, 3:4] = 3   # left upper arm
  t[6:8, 8:9] = 4   # right hand -> lower arm
  t[8:10, 3:9] = 5  # right upper leg
  t[10:12, 3:9] = 6  # left foot -> lower leg
  return t


def pascal_semseg(k: int) -> np.ndarray:
  s = np.zeros((H, W), np.uint8)
  s[:, 5:10] = 15
  s[:, 10:] = (k * 3) % 21
  s[0, 0] = 255
  return s


def pascal_sal(k: int) -> np.ndarray:
  s = np.zeros((H, W), np.uint8)
  s[:, 0:5] = 127   # 127/255 = 0.498 -> 0
  s[:, 5:10] = 128  # 0.502 -> 1
  s[:, 10:15] = 255
  s[0, 0] = 0
  return s


def pascal_normals_png(k: int) -> np.ndarray:
  rng = np.random.default_rng(100 + k)
  return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def pascal_label_map() -> np.ndarray:
  """Context classes: 72 'chair' (valid normals) left, 2 'aeroplane' (no normals) right,
  0 (unlabelled) in the bottom-left corner."""
  lm = np.full((H, W), 72, np.uint16)
  lm[:, 10:] = 2
  lm[12:, :4] = 0
  return lm


def make_pascal(root: str) -> str:
  for split, ids in (("train", PASCAL_TRAIN), ("val", PASCAL_VAL)):
    write_lines(os.path.join(root, "ImageSets", "Context", split + ".txt"), ids)
  for k, image_id in enumerate(PASCAL_TRAIN + PASCAL_VAL):
    save_jpg(os.path.join(root, "JPEGImages", image_id + ".jpg"), rgb(k))
    save_png(os.path.join(root, "semseg", "pascal-context", image_id + ".png"), pascal_semseg(k))
    scipy.io.savemat(_mkdir_for(os.path.join(root, "human_parts", image_id + ".mat")),
                     {"anno": pascal_part_anno(PASCAL_OBJECTS[image_id])})
    save_png(os.path.join(root, "sal_distill", image_id + ".png"), pascal_sal(k))
    save_png(os.path.join(root, "normals_distill", image_id + ".png"), pascal_normals_png(k))
    scipy.io.savemat(_mkdir_for(os.path.join(root, "pascal-context", "trainval",
                                             image_id + ".mat")),
                     {"LabelMap": pascal_label_map()})
  return root


# ----------------------------------------------------------------------------- NYUD

NYUD_TRAIN = ("0001", "0002")
NYUD_VAL = ("0003",)


def nyud_seg(k: int) -> np.ndarray:
  s = np.zeros((H, W), np.uint8)
  s[:, 4:] = 1
  s[:, 8:] = 40
  s[:, 12:] = 7 + k
  return s


def nyud_depth(k: int) -> np.ndarray:
  d = np.linspace(0.5, 9.5, H * W, dtype=np.float32).reshape(H, W) + k
  d[0, :] = 0.0
  return d


def nyud_normals(k: int) -> np.ndarray:
  n = np.zeros((H, W, 3), np.float32)
  n[..., 2] = -1.0
  n[:, :5] = (0.6, 0.0, -0.8)
  n[3, 3] = 0.0
  return n


def nyud_edge(k: int) -> np.ndarray:
  e = np.zeros((H, W), np.float64)  # The released files hold floats.
  e[:, 4] = 1.0
  e[5, :] = 1.0
  return e


def make_nyud(root: str) -> str:
  for split, ids in (("train", NYUD_TRAIN), ("val", NYUD_VAL)):
    write_lines(os.path.join(root, "gt_sets", split + ".txt"), ids)
  for k, image_id in enumerate(NYUD_TRAIN + NYUD_VAL):
    save_jpg(os.path.join(root, "images", image_id + ".jpg"), rgb(10 + k))
    save_png(os.path.join(root, "segmentation", image_id + ".png"), nyud_seg(k))
    np.save(_mkdir_for(os.path.join(root, "depth", image_id + ".npy")), nyud_depth(k))
    np.save(_mkdir_for(os.path.join(root, "normals", image_id + ".npy")), nyud_normals(k))
    np.save(_mkdir_for(os.path.join(root, "edge", image_id + ".npy")), nyud_edge(k))
  return root


# ----------------------------------------------------------------------------- Cityscapes

CITYSCAPES = {"train": [("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")],
              "val": [("lindau", "lindau_000000_000019")]}
BASELINE, FX = 0.209313, 2262.52


def cityscapes_label_ids(k: int) -> np.ndarray:
  s = np.zeros((H, W), np.uint8)  # 0 unlabeled -> 255
  s[:, 2:6] = 7    # road -> 0
  s[:, 6:10] = 26  # car -> 13
  s[:, 10:14] = 33  # bicycle -> 18
  s[:, 14:] = 9    # parking -> 255
  s[0, :] = 23 if k == 0 else 4  # sky -> 10 / static -> 255
  return s


def cityscapes_disparity(k: int) -> np.ndarray:
  p = np.full((H, W), 256 * 10 + 1, np.uint16)  # disparity 10 px
  p[:, 10:] = 256 * 40 + 1 + 128              # disparity 40.5 px
  p[2, :] = 0                                 # missing
  p[3, :] = 1                                 # disparity 0 -> invalid
  return p


def make_cityscapes(root: str) -> str:
  k = 0
  for split, items in CITYSCAPES.items():
    for city, stem in items:
      def path(kind, suffix):
        return os.path.join(root, kind, split, city, f"{stem}_{suffix}")
      save_png(path("leftImg8bit", "leftImg8bit.png"), rgb(20 + k))
      save_png(path("gtFine", "gtFine_labelIds.png"), cityscapes_label_ids(k))
      save_png(path("disparity", "disparity.png"), cityscapes_disparity(k))
      with open(_mkdir_for(path("camera", "camera.json")), "w") as f:
        json.dump({"extrinsic": {"baseline": BASELINE, "pitch": 0.038, "roll": 0.0,
                                 "x": 1.7, "y": 0.1, "yaw": -0.0195, "z": 1.22},
                   "intrinsic": {"fx": FX, "fy": FX, "u0": 1096.98, "v0": 513.137}}, f)
      k += 1
  return root
