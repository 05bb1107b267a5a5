"""NYUDv2 multi-task builder (the "NYUD_MT" folder of ASTMT / MTI-Net / MTLoRA).

Layout under manual_dir (see docs/datasets.md):
  images/<id>.jpg
  segmentation/<id>.png     0 = unlabelled, 1..40 = the 40 NYUDv2 classes
  depth/<id>.npy            float (H, W), metres, 0 = missing
  normals/<id>.npy          float (H, W, 3), zero vector = missing
  edge/<id>.npy             (H, W) in {0, 1}
  gt_sets/{train,val}.txt   795 / 654 ids

Preprocessing as in the reference loaders: semseg label - 1 with 0 -> 255 (ignore), the rest
stored as read (depth and normals float32, edge uint8).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from freesine_jax import tasks as tasks_lib
from freesine_jax.data import builder as builder_lib
from freesine_jax.data.builder import DatasetError

NUM_CLASSES = 40
# Class names (legends of freesine_jax.visualize; data/registry.py): the 40 classes of
# Gupta et al.'s NYUDv2 labelling, in label order 1..40 (stored as 0..39).
CLASS_NAMES = {"semseg": (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop")}


def semseg_from_png(raw: np.ndarray) -> np.ndarray:
  """NYUD label PNG (0 unlabelled, 1..40) -> uint8 class ids 0..39 with 255 ignore."""
  raw = raw.astype(np.int64)
  return np.where(raw == 0, tasks_lib.IGNORE_INDEX, raw - 1).astype(np.uint8)


class NyudMT(builder_lib.ManualDirBuilder):
  """NYUDv2 multi-task: semseg (40), depth, normals, edge."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "NYUD_MT layout, MTLoRA/MTI-Net preprocessing."}
  TASKS = ("semseg", "depth", "normals", "edge")
  SPLITS = ("train", "val")
  DESCRIPTION = "NYUDv2 multi-task (NYUD_MT), read from a local folder."
  HOMEPAGE = "https://cs.nyu.edu/~fergus/datasets/nyu_depth_v2.html"

  @staticmethod
  def paths(root: str, image_id: str) -> dict[str, str]:
    j = os.path.join
    return {"image": j(root, "images", image_id + ".jpg"),
            "semseg": j(root, "segmentation", image_id + ".png"),
            "depth": j(root, "depth", image_id + ".npy"),
            "normals": j(root, "normals", image_id + ".npy"),
            "edge": j(root, "edge", image_id + ".npy")}

  def list_examples(self, root: str) -> dict[str, list[str]]:
    plan, required = {}, []
    what = {"image": "RGB image", "semseg": "40-class label PNG", "depth": "depth .npy (H, W)",
            "normals": "normals .npy (H, W, 3)", "edge": "edge .npy (H, W)"}
    for split in self.SPLITS:
      ids = builder_lib.read_id_list(os.path.join(root, "gt_sets", split + ".txt"))
      for image_id in ids:
        required += [(path, what[k]) for k, path in self.paths(root, image_id).items()]
      plan[split] = ids
    builder_lib.check_files_exist(root, required)
    return plan

  def load_example(self, root: str, image_id: str) -> dict[str, Any]:
    p = self.paths(root, image_id)
    image, hw = builder_lib.read_rgb_image(p["image"], root)

    raw = builder_lib.read_png_array(p["semseg"], root)
    builder_lib.check_shape(raw, hw, p["semseg"], root, "segmentation")
    builder_lib.check_values(raw, np.arange(NUM_CLASSES + 1), p["semseg"], root, "NYUD class")

    depth = builder_lib.load_npy(p["depth"], root)
    if depth.ndim == 3 and depth.shape[2] == 1:
      depth = depth[..., 0]
    builder_lib.check_shape(depth, hw, p["depth"], root, "depth")
    builder_lib.check_finite(depth, p["depth"], root, "depth")
    if np.any(depth < 0):
      raise DatasetError(f"{builder_lib.rel(root, p['depth'])}: depth has negative values")

    normals = builder_lib.load_npy(p["normals"], root)
    builder_lib.check_shape(normals, hw + (3,), p["normals"], root, "normals")
    builder_lib.check_finite(normals, p["normals"], root, "normals")

    edge = builder_lib.load_npy(p["edge"], root)
    if edge.ndim == 3 and edge.shape[2] == 1:
      edge = edge[..., 0]
    builder_lib.check_shape(edge, hw, p["edge"], root, "edge")
    builder_lib.check_values(edge, np.array([0, 1]), p["edge"], root, "edge")

    return {"image": image, "id": image_id, "semseg": semseg_from_png(raw),
            "depth": depth.astype(np.float32), "normals": normals.astype(np.float32),
            "edge": edge.astype(np.uint8)}
