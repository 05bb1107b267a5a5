"""Procedurally rendered multi-task scenes: the embedded default dataset.

Every scene is ray-cast analytically through a pinhole camera (a back wall, a floor and a few solid
objects resting on the floor), so all labels come from one geometry and agree with each other: depth
is the z-buffer, normals are the analytic normals of the surface that won the z-buffer, segmentation,
parts, saliency and edges come from the id of that surface, and the image is Lambertian shading of
those normals. Example `i` of split `s` depends only on (config.seed, s, i).

Stored example format (shared by every freesine_jax TFDS builder; the input pipeline relies on it)
-------------------------------------------------------------------------------------------------
TFDS builders use file_format='array_record' and are read with `builder.as_data_source(split)`
(no TensorFlow). One example is a dict; each task feature is optional (a dataset stores only the
tasks it has), names and layouts are fixed:

  key          TFDS feature                                        decoded value        ignore
  id           Text()                                              bytes, unique id     -
  image        Image(shape=(None, None, 3), encoding_format=png|jpeg)  uint8 (H, W, 3) RGB  -
               (fed as encoded bytes or a file path, never a numpy array: numpy needs TF)
  semseg       Tensor(shape=(None, None), uint8, encoding='zlib')  uint8 (H, W) class id 255
  human_parts  Tensor(shape=(None, None), uint8, encoding='zlib')  uint8 (H, W) part id  255
               (0 = not a part; the whole map is 255 when the image has no annotated person)
  sal          Tensor(shape=(None, None), uint8, encoding='zlib')  uint8 (H, W) in {0,1} 255
  edge         Tensor(shape=(None, None), uint8, encoding='zlib')  uint8 (H, W) in {0,1} 255
  normals      Tensor(shape=(None, None, 3), float32, encoding='zlib')  float32 (H, W, 3)  zero vector
               unit vectors, x = +column (right), y = +row (down), z = towards the camera
               (a fronto-parallel surface is (0, 0, 1), a floor seen by a level camera (0, -1, 0));
               invalid pixels are exactly (0, 0, 0)
  depth        Tensor(shape=(None, None), float32, encoding='zlib')  float32 (H, W) z-depth  0

All label maps have the image's (H, W). Splits are named 'train' and 'val'.

Synthetic specifics
-------------------
Camera: pinhole with square pixels, focal = width px, principal point (width / 2, 0.4 * height) in
continuous pixel coordinates (pixel (row v, col u) has its centre at (u + 0.5, v + 0.5)); see
`camera_intrinsics`. Internally the camera frame is X right, Y down, Z forward (depth = Z); the stored
normal is (N_X, N_Y, -N_Z). Classes (NUM_SEMSEG_CLASSES = 6): 0 wall (background), 1 floor,
2 sphere, 3 box, 4 cylinder, 5 person. Parts of persons (NUM_HUMAN_PARTS_CLASSES = 7, PASCAL's 6-part
grouping): 0 not a person, 1 head, 2 torso, 3 upper arm, 4 lower arm, 5 upper leg, 6 lower leg.
Saliency: the object (not wall/floor) with the largest visible area. Edges: pixels with a 4-neighbour
that belongs to another surface instance (wall, floor or object; 1 px each side of a boundary).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import os
import time
from typing import Callable, Iterator

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from freesine_jax import tasks as tasks_lib
from freesine_jax.data import builder as builder_lib

NUM_SEMSEG_CLASSES = 6
NUM_HUMAN_PARTS_CLASSES = 7
SEMSEG_CLASS_NAMES = ("wall", "floor", "sphere", "box", "cylinder", "person")
HUMAN_PARTS_NAMES = ("none", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")
# Class names per classification task (legends of freesine_jax.visualize; data/registry.py).
CLASS_NAMES = {"semseg": SEMSEG_CLASS_NAMES, "human_parts": HUMAN_PARTS_NAMES}
WALL, FLOOR, SPHERE, BOX, CYLINDER, PERSON = range(6)
# Only in the upstream (pretraining) mix, never in the dataset's scenes: class id 6.
ELLIPSOID = 6
UPSTREAM_CLASS_NAMES = SEMSEG_CLASS_NAMES + ("ellipsoid",)
SPLITS = ("train", "val")
TASK_KEYS = ("semseg", "human_parts", "sal", "edge", "normals", "depth")

# "upstream" is the pretraining stream (freesine_jax/pretrain.py): never a split of the dataset.
_SPLIT_CODE = {"train": 0, "val": 1, "upstream": 2}
_FOCAL_FRACTION = 1.0      # focal length in units of the image width
_PRINCIPAL_ROW_FRACTION = 0.4  # the horizon sits above the image centre, so the floor is visible


def camera_intrinsics(height: int, width: int) -> tuple[float, float, float]:
  """(focal, cx, cy) in pixels; pixel (v, u) looks along ((u+.5-cx)/f, (v+.5-cy)/f, 1)."""
  return _FOCAL_FRACTION * width, width / 2.0, _PRINCIPAL_ROW_FRACTION * height


def ray_directions(height: int, width: int) -> np.ndarray:
  """(H*W, 3) camera-frame ray directions with unit z (so the hit distance t is the z-depth)."""
  focal, cx, cy = camera_intrinsics(height, width)
  uu, vv = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
  d = np.stack([(uu - cx) / focal, (vv - cy) / focal, np.ones_like(uu)], axis=-1)
  return d.reshape(-1, 3)


# ----------------------------------------------------------------------------------------------
# Ray-primitive intersections. Each returns (t, normal): t (N,) is np.inf where the ray misses,
# normal (N, 3) is the outward unit normal in the internal camera frame (X right, Y down, Z fwd).


def _hit_plane(d: np.ndarray, normal: np.ndarray, offset: float):
  """Plane {P : normal . P = offset}; only its side facing the camera (origin) is visible."""
  denom = d @ normal
  with np.errstate(divide="ignore", invalid="ignore"):
    t = offset / denom
  hit = (denom < -1e-12) & (t > 0)
  return np.where(hit, t, np.inf), np.broadcast_to(normal, d.shape)


def _hit_sphere(d: np.ndarray, centre: np.ndarray, radius: float):
  a = np.einsum("ij,ij->i", d, d)
  b = -2.0 * d @ centre
  c = centre @ centre - radius**2
  disc = b * b - 4 * a * c
  sq = np.sqrt(np.maximum(disc, 0.0))
  t = (-b - sq) / (2 * a)
  hit = (disc >= 0) & (t > 0)
  t = np.where(hit, t, np.inf)
  normal = (np.where(hit, t, 0.0)[:, None] * d - centre) / radius
  return t, normal


def _hit_vertical_cylinder(d, x: float, z: float, radius: float, y_top: float, y_bottom: float):
  """Solid cylinder with a vertical axis through (x, ., z) spanning y_top < Y < y_bottom."""
  a = d[:, 0] ** 2 + d[:, 2] ** 2
  b = -2.0 * (d[:, 0] * x + d[:, 2] * z)
  c = x * x + z * z - radius**2
  disc = b * b - 4 * a * c
  t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
  y_side = t_side * d[:, 1]
  side = (disc >= 0) & (t_side > 0) & (y_side >= y_top) & (y_side <= y_bottom)
  t_side = np.where(side, t_side, np.inf)
  # Top cap (normal -Y, i.e. up); visible only from above (ray going down, d_y > 0).
  with np.errstate(divide="ignore", invalid="ignore"):
    t_cap = y_top / d[:, 1]
  cap = (d[:, 1] > 1e-12) & (t_cap > 0)
  cap &= (t_cap * d[:, 0] - x) ** 2 + (t_cap * d[:, 2] - z) ** 2 <= radius**2
  t_cap = np.where(cap, t_cap, np.inf)
  t = np.minimum(t_side, t_cap)
  ts = np.where(np.isfinite(t_side), t_side, 0.0)
  n_side = np.stack([(ts * d[:, 0] - x) / radius, np.zeros_like(ts), (ts * d[:, 2] - z) / radius], -1)
  n_cap = np.broadcast_to(np.array([0.0, -1.0, 0.0]), d.shape)
  normal = np.where((t_cap < t_side)[:, None], n_cap, n_side)
  return t, normal


def _yaw_matrix(yaw: float) -> np.ndarray:
  """Rotation about the vertical (Y) axis mapping object-local to camera coordinates."""
  c, s = np.cos(yaw), np.sin(yaw)
  return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _hit_box(d, centre: np.ndarray, half: np.ndarray, yaw: float):
  """Solid cuboid (half sizes `half`) rotated by `yaw` about its vertical axis (slab method)."""
  rot = _yaw_matrix(yaw)
  dl = d @ rot  # rot^T d for each row
  ol = -(rot.T @ centre)
  dl = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
  t1 = (-half - ol) / dl
  t2 = (half - ol) / dl
  tlo = np.minimum(t1, t2)
  thi = np.maximum(t1, t2)
  t_near = tlo.max(axis=1)
  t_far = thi.min(axis=1)
  hit = (t_near <= t_far) & (t_near > 0)
  axis = tlo.argmax(axis=1)
  n_local = np.zeros_like(d)
  n_local[np.arange(len(d)), axis] = -np.sign(dl[np.arange(len(d)), axis])
  return np.where(hit, t_near, np.inf), n_local @ rot.T


def _hit_ellipsoid(d, centre: np.ndarray, half: np.ndarray, yaw: float):
  """Solid ellipsoid with semi-axes `half` (object frame), rotated by `yaw` about its vertical axis.

  The ray is mapped to the frame where the ellipsoid is the unit sphere; the normal is the
  gradient of the implicit function, R diag(1/half^2) R^T (P - centre).
  """
  rot = _yaw_matrix(yaw)
  dl = (d @ rot) / half  # rot^T d, scaled
  ol = -(rot.T @ centre) / half
  a = np.einsum("ij,ij->i", dl, dl)
  b = 2.0 * dl @ ol
  c = ol @ ol - 1.0
  disc = b * b - 4 * a * c
  t = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2 * a)
  hit = (disc >= 0) & (t > 0)
  t = np.where(hit, t, np.inf)
  local = np.where(hit, t, 0.0)[:, None] * dl + ol  # on the unit sphere where hit
  normal = (local / half) @ rot.T
  norm = np.linalg.norm(normal, axis=-1, keepdims=True)
  return t, normal / np.where(norm > 0, norm, 1.0)


# ----------------------------------------------------------------------------------------------
# Scene description.


@dataclasses.dataclass
class _Primitive:
  hit: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  instance: int
  cls: int
  part: int
  texture: Callable[[np.ndarray], np.ndarray]  # (N, 3) points -> (N, 3) albedo in [0, 1]


def _solid(colour) -> Callable[[np.ndarray], np.ndarray]:
  colour = np.clip(np.asarray(colour, np.float64), 0, 1)
  return lambda p: np.broadcast_to(colour, p.shape)


def _jitter(rng: np.random.Generator, base, amount: float = 0.07) -> np.ndarray:
  return np.clip(np.asarray(base) + rng.uniform(-amount, amount, 3), 0.02, 0.98)


_SKIN = ((0.93, 0.76, 0.62), (0.78, 0.57, 0.42), (0.55, 0.38, 0.26), (0.40, 0.27, 0.18))
_SHIRT = ((0.85, 0.15, 0.55), (0.95, 0.85, 0.2), (0.2, 0.75, 0.85), (0.95, 0.5, 0.1))
_PANTS = ((0.12, 0.15, 0.35), (0.3, 0.3, 0.3), (0.35, 0.25, 0.15))


def _person(rng, instance: int, x: float, z: float, floor_y: float, height: float, yaw: float,
            random_colours: bool = False):
  """A standing person made of a sphere (head), a box (torso) and vertical cylinders (limbs)."""
  skin = _jitter(rng, _SKIN[rng.integers(len(_SKIN))], 0.04)
  if random_colours:
    shirt, pants = rng.uniform(0.08, 0.92, 3), rng.uniform(0.05, 0.6, 3)
  else:
    shirt = _jitter(rng, _SHIRT[rng.integers(len(_SHIRT))])
    pants = _jitter(rng, _PANTS[rng.integers(len(_PANTS))], 0.05)
  c, s = np.cos(yaw), np.sin(yaw)

  def place(lateral: float) -> tuple[float, float]:
    return x + lateral * c, z - lateral * s  # same yaw convention as _yaw_matrix

  def y(up: float) -> float:  # camera Y of a point `up` metres above the floor
    return floor_y - up * height

  prims = []
  for side in (-1.0, 1.0):
    lx, lz = place(side * 0.07 * height)
    prims.append(_Primitive(
        lambda d, lx=lx, lz=lz: _hit_vertical_cylinder(d, lx, lz, 0.05 * height, y(0.26), y(0.0)),
        instance, PERSON, 6, _solid(pants * 0.8)))
    prims.append(_Primitive(
        lambda d, lx=lx, lz=lz: _hit_vertical_cylinder(d, lx, lz, 0.06 * height, y(0.48), y(0.26)),
        instance, PERSON, 5, _solid(pants)))
    ax, az = place(side * 0.175 * height)
    prims.append(_Primitive(
        lambda d, ax=ax, az=az: _hit_vertical_cylinder(d, ax, az, 0.04 * height, y(0.81), y(0.62)),
        instance, PERSON, 3, _solid(shirt)))
    prims.append(_Primitive(
        lambda d, ax=ax, az=az: _hit_vertical_cylinder(d, ax, az, 0.035 * height, y(0.62), y(0.43)),
        instance, PERSON, 4, _solid(skin)))
  torso_c = np.array([x, y(0.65), z])
  torso_h = np.array([0.13, 0.17, 0.07]) * height
  prims.append(_Primitive(lambda d: _hit_box(d, torso_c, torso_h, yaw), instance, PERSON, 2,
                          _solid(shirt)))
  head_c = np.array([x, y(0.905), z])
  prims.append(_Primitive(lambda d: _hit_sphere(d, head_c, 0.075 * height), instance, PERSON, 1,
                          _solid(skin)))
  return prims


@dataclasses.dataclass(frozen=True)
class SceneMix:
  """What a scene holds. DATASET_MIX renders the dataset; UPSTREAM_MIX the pretraining images
  (freesine_jax/pretrain.py), another object mix whose objects have random colours."""
  person_probs: tuple[float, ...] = (0.45, 0.4, 0.15)  # P(0, 1, 2, ... persons)
  object_kinds: tuple[int, ...] = (SPHERE, BOX, CYLINDER)
  num_objects: tuple[int, int] = (2, 5)  # non-person objects drawn from [lo, hi)
  random_colours: bool = False  # False: each kind its colour (red spheres, blue boxes, ...)


DATASET_MIX = SceneMix()
UPSTREAM_MIX = SceneMix(person_probs=(0.3, 0.4, 0.3),
                        object_kinds=(SPHERE, BOX, CYLINDER, ELLIPSOID), num_objects=(1, 6),
                        random_colours=True)


def _sample_scene(rng: np.random.Generator, height: int, width: int,
                  mix: SceneMix = DATASET_MIX):
  """Random scene: returns (primitives, light direction in the internal camera frame)."""
  focal, cx, _ = camera_intrinsics(height, width)
  cam_h = rng.uniform(1.3, 1.7)  # camera height above the floor; the floor is the plane Y = cam_h
  wall_z = rng.uniform(6.5, 9.0)
  wall_yaw = np.deg2rad(rng.uniform(-25, 25))
  wall_n = np.array([np.sin(wall_yaw), 0.0, -np.cos(wall_yaw)])
  wall_col = _jitter(rng, rng.choice([(0.85, 0.82, 0.72), (0.7, 0.78, 0.85), (0.8, 0.7, 0.75)]))
  stripe = rng.uniform(0.3, 0.8)

  def wall_tex(p):
    lateral = p[:, 0] * np.cos(wall_yaw) + p[:, 2] * np.sin(wall_yaw)
    return wall_col * (0.9 + 0.1 * (np.floor(lateral / stripe) % 2))[:, None]

  tile_a = _jitter(rng, (0.55, 0.4, 0.25))
  tile_b = tile_a * rng.uniform(0.55, 0.75)
  tile = rng.uniform(0.6, 1.2)

  def floor_tex(p):
    odd = ((np.floor(p[:, 0] / tile) + np.floor(p[:, 2] / tile)) % 2)[:, None]
    return np.where(odd > 0, tile_a, tile_b)

  prims = [
      _Primitive(lambda d: _hit_plane(d, wall_n, -wall_z * np.cos(wall_yaw)), 0, WALL, 0, wall_tex),
      _Primitive(lambda d: _hit_plane(d, np.array([0.0, -1.0, 0.0]), -cam_h), 1, FLOOR, 0,
                 floor_tex),
  ]

  kinds = [PERSON] * int(rng.choice(len(mix.person_probs), p=list(mix.person_probs)))
  kinds += list(rng.choice(list(mix.object_kinds), size=int(rng.integers(*mix.num_objects))))
  rng.shuffle(kinds)
  placed: list[tuple[float, float, float]] = []  # footprints (x, z, radius)
  instance = 2
  for kind in kinds:
    if kind == PERSON:
      p_height = rng.uniform(1.5, 1.85)
      foot = 0.23 * p_height
    elif kind == SPHERE:
      radius = rng.uniform(0.3, 0.6)
      foot = radius
    elif kind == BOX:
      half = np.array([rng.uniform(0.25, 0.5), rng.uniform(0.25, 0.6), rng.uniform(0.25, 0.5)])
      foot = float(np.hypot(half[0], half[2]))
    elif kind == ELLIPSOID:
      half = np.array([rng.uniform(0.2, 0.5), rng.uniform(0.25, 0.7), rng.uniform(0.1, 0.3)])
      foot = float(max(half[0], half[2]))
    else:
      radius = rng.uniform(0.2, 0.4)
      c_height = rng.uniform(0.6, 1.4)
      foot = radius
    for _ in range(50):  # rejection sampling of a free spot in front of the wall, in view
      z = rng.uniform(2.6, min(wall_z - 1.0, 7.0))
      half_width = z * cx / focal
      x = rng.uniform(-0.9 * half_width, 0.9 * half_width)
      if z + foot > wall_z + x * np.tan(wall_yaw) - 0.2:
        continue
      if all(np.hypot(x - px, z - pz) > foot + pr + 0.1 for px, pz, pr in placed):
        break
    else:
      continue
    placed.append((x, z, foot))
    yaw = rng.uniform(-np.pi / 4, np.pi / 4)
    colour_of = ((lambda base: rng.uniform(0.08, 0.92, 3)) if mix.random_colours
                 else (lambda base: _jitter(rng, base, 0.1)))
    if kind == PERSON:
      prims += _person(rng, instance, x, z, cam_h, p_height, yaw * 0.4, mix.random_colours)
    elif kind == SPHERE:
      centre = np.array([x, cam_h - radius, z])
      prims.append(_Primitive(lambda d, c=centre, r=radius: _hit_sphere(d, c, r), instance,
                              SPHERE, 0, _solid(colour_of((0.85, 0.2, 0.15)))))
    elif kind == BOX:
      centre = np.array([x, cam_h - half[1], z])
      colour = colour_of((0.2, 0.3, 0.85))
      prims.append(_Primitive(lambda d, c=centre, h=half, w=yaw: _hit_box(d, c, h, w), instance,
                              BOX, 0, _solid(colour)))
    elif kind == ELLIPSOID:
      centre = np.array([x, cam_h - half[1], z])
      prims.append(_Primitive(lambda d, c=centre, h=half, w=yaw: _hit_ellipsoid(d, c, h, w),
                              instance, ELLIPSOID, 0, _solid(colour_of((0.6, 0.3, 0.7)))))
    else:
      colour = colour_of((0.2, 0.7, 0.25))
      band = rng.uniform(0.15, 0.3)

      def cyl_tex(p, colour=colour, band=band):
        return colour * (0.8 + 0.2 * (np.floor(p[:, 1] / band) % 2))[:, None]

      prims.append(_Primitive(
          lambda d, x=x, z=z, r=radius, h=c_height: _hit_vertical_cylinder(
              d, x, z, r, cam_h - h, cam_h), instance, CYLINDER, 0, cyl_tex))
    instance += 1

  light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-1.0, -0.4), -rng.uniform(0.5, 1.0)])
  return prims, light / np.linalg.norm(light)


def instance_boundaries(instance: np.ndarray) -> np.ndarray:
  """1 where a 4-neighbour has a different id (marks both sides of every boundary)."""
  edge = np.zeros(instance.shape, bool)
  dv = instance[1:, :] != instance[:-1, :]
  dh = instance[:, 1:] != instance[:, :-1]
  edge[1:, :] |= dv
  edge[:-1, :] |= dv
  edge[:, 1:] |= dh
  edge[:, :-1] |= dh
  return edge.astype(np.uint8)


def render_scene(rng: np.random.Generator, height: int, width: int,
                 mix: SceneMix = DATASET_MIX) -> dict[str, np.ndarray]:
  """Renders one random scene: the stored features plus int32 'instance' and 'primitive' ids."""
  prims, light = _sample_scene(rng, height, width, mix)
  d = ray_directions(height, width)
  hits = [p.hit(d) for p in prims]
  ts = np.stack([h[0] for h in hits])  # (P, N)
  winner = ts.argmin(axis=0)
  n_pix = d.shape[0]
  t = ts[winner, np.arange(n_pix)]
  if not np.all(np.isfinite(t)):
    raise AssertionError("Synthetic scene has pixels that hit no surface (wall/floor missing).")
  normal = np.stack([h[1] for h in hits])[winner, np.arange(n_pix)]
  normal = normal / np.linalg.norm(normal, axis=-1, keepdims=True)

  inst = np.array([p.instance for p in prims])[winner]
  cls = np.array([p.cls for p in prims])[winner]
  part = np.array([p.part for p in prims])[winner]
  points = t[:, None] * d
  albedo = np.zeros((n_pix, 3))
  for k, p in enumerate(prims):
    sel = winner == k
    if sel.any():
      albedo[sel] = p.texture(points[sel])
  shade = 0.35 + 0.65 * np.maximum(normal @ light, 0.0)
  rgb = albedo * shade[:, None] + rng.normal(0.0, 0.015, (n_pix, 3))
  image = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)

  shape = (height, width)
  inst = inst.reshape(shape).astype(np.int32)
  semseg = cls.reshape(shape).astype(np.uint8)
  objects = [i for i in np.unique(inst) if i >= 2]
  areas = [np.count_nonzero(inst == i) for i in objects]
  sal = np.zeros(shape, np.uint8)
  if objects:
    sal[inst == objects[int(np.argmax(areas))]] = 1
  if np.any(semseg == PERSON):
    parts = part.reshape(shape).astype(np.uint8)
  else:
    parts = np.full(shape, tasks_lib.IGNORE_INDEX, np.uint8)
  normals = normal * np.array([1.0, 1.0, -1.0])  # stored convention: z towards the camera
  return {
      "image": image.reshape(height, width, 3),
      "semseg": semseg,
      "human_parts": parts,
      "sal": sal,
      "edge": instance_boundaries(inst),
      "normals": normals.reshape(height, width, 3).astype(np.float32),
      "depth": t.reshape(shape).astype(np.float32),
      "instance": inst,
      "primitive": winner.reshape(shape).astype(np.int32),
  }


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of example `index` of `split`: independent of every other example."""
  return np.random.default_rng([seed, _SPLIT_CODE[split], index])


def generate_example(seed: int, split: str, index: int, height: int, width: int):
  """Decoded example `index` of `split` (the values as_data_source returns, minus 'id')."""
  out = render_scene(example_rng(seed, split, index), height, width)
  del out["instance"], out["primitive"]
  return out


def upstream_example(seed: int, index: int, height: int, width: int) -> dict[str, np.ndarray]:
  """Pretraining image `index` (UPSTREAM_MIX) with its class map (UPSTREAM_CLASS_NAMES ids).

  Drawn from the 'upstream' stream of example_rng, which no split of the dataset uses: the
  pretraining images are disjoint from every train and val scene, whatever the seeds.
  """
  out = render_scene(example_rng(seed, "upstream", index), height, width, UPSTREAM_MIX)
  return {"image": out["image"], "classes": out["semseg"]}


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def example_features() -> tfds.features.FeaturesDict:
  """The stored feature spec described in the module docstring (all six tasks)."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
      **{task: builder_lib.task_feature(task) for task in TASK_KEYS},
  })


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Size of the rendered dataset. The name must identify the values (it names the directory)."""
  height: int = 64
  width: int = 64
  num_train: int = 384
  num_val: int = 96
  seed: int = 0


class SyntheticMultiTask(tfds.core.GeneratorBasedBuilder):
  """Rendered scenes with semseg, human_parts, sal, edge, normals and depth labels."""

  name = "synthetic_multitask"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticConfig(name="default", description="64x64, 384 train / 96 val."),
      SyntheticConfig(name="tiny", height=32, width=32, num_train=24, num_val=10,
                      description="32x32, 24 train / 10 val (tests)."),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default locates the file through `importlib_resources`, which is not installed here
    # (ModuleNotFoundError in download_and_prepare for builders defined inside a package).
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=example_features(),
                                 description=__doc__.split("\n\n")[0])

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "val": self._generate_examples("val", cfg.num_val)}

  def _generate_examples(self, split: str, count: int) -> Iterator[tuple[str, dict]]:
    cfg = self.builder_config
    every = max(count // 4, 1)  # a few progress lines per split (TFDS's bar is off: see below)
    t0 = time.time()
    for index in range(count):
      ex = generate_example(cfg.seed, split, index, cfg.height, cfg.width)
      key = f"{split}_{index:06d}"
      ex["id"] = key
      ex["image"] = encode_png(ex["image"])
      yield key, ex
      if (index + 1) % every == 0 or index + 1 == count:
        print(f"  rendered {index + 1}/{count} {split} scenes ({time.time() - t0:.0f} s)",
              flush=True)

  # Nothing is downloaded: ensure_built says what happens in its own line. TFDS's "Downloading
  # and preparing ..." / "... downloaded and prepared to ..." go to the log at INFO instead.
  def _log_download_bytes(self) -> None:
    logging.info("TFDS: preparing %s in %s", self.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("TFDS: %s prepared in %s", self.name, self.data_dir)


@contextlib.contextmanager
def file_lock(path: str):
  """Holds an exclusive lock on `path` (created if needed): concurrent first uses of a cached
  artefact on one host (this dataset, pretrain.py's proxy) wait for each other."""
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_built(data_dir: str | None = None,
                 config: str | SyntheticConfig = "default") -> SyntheticMultiTask:
  """Returns the prepared builder, rendering the dataset on first use.

  TFDS writes into an `incomplete.*` directory and renames it when every split is written, so a
  build that died half way is never mistaken for a prepared one (the next call rebuilds). A file
  lock in `data_dir` serialises concurrent first uses (e.g. several processes on one host).
  """
  builder = SyntheticMultiTask(data_dir=data_dir, config=config)
  if builder.is_prepared():
    return builder
  os.makedirs(builder.data_dir_root, exist_ok=True)
  with file_lock(os.path.join(builder.data_dir_root, ".synthetic_multitask.lock")):
    builder = SyntheticMultiTask(data_dir=data_dir, config=config)
    if not builder.is_prepared():
      if os.path.isdir(builder.data_dir):  # TFDS would "reuse" it, finding no splits
        raise builder_lib.incomplete_error("synthetic", builder.data_dir, data_dir)
      print(f"rendering the synthetic multi-task dataset ({builder.builder_config.name}) into "
            f"{builder.data_dir} (first use only)...", flush=True)
      tfds.disable_progress_bar()  # TFDS's nested bars garble a plain log; one line is enough
      builder.download_and_prepare()
  return SyntheticMultiTask(data_dir=data_dir, config=config)
