"""Tests for the procedurally rendered dataset (freesine_jax/data/synthetic.py)."""
import importlib.util
import os
import sys

import numpy as np
import pytest
from scipy import ndimage

from freesine_jax import tasks
from freesine_jax.data import registry
from freesine_jax.data import synthetic

SIZE = 48
SCENES = [synthetic.render_scene(synthetic.example_rng(3, "train", i), SIZE, SIZE)
          for i in range(10)]
TINY = synthetic.SyntheticConfig(name="test16", height=16, width=16, num_train=6, num_val=3,
                                 seed=5)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return synthetic.ensure_built(data_dir, config="tiny")


def _points(depth):
  h, w = depth.shape
  f, cx, cy = synthetic.camera_intrinsics(h, w)
  vv, uu = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
  z = depth.astype(np.float64)
  return np.stack([z * (uu - cx) / f, z * (vv - cy) / f, z], -1)


def _internal(normals):  # stored (x right, y down, z to camera) -> camera frame (Z forward)
  return normals.astype(np.float64) * np.array([1.0, 1.0, -1.0])


def test_registry_maps_synthetic():
  assert registry.builder_class("synthetic") is synthetic.SyntheticMultiTask
  assert synthetic.SyntheticMultiTask.name == "synthetic_multitask"


def test_builds_and_reads_without_tensorflow(built):
  assert importlib.util.find_spec("tensorflow") is None
  source = built.as_data_source("train")
  assert len(source) == 24
  assert len(built.as_data_source("val")) == 10
  ex = source[0]
  assert "tensorflow" not in sys.modules
  assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
  for key in ("semseg", "human_parts", "sal", "edge"):
    assert ex[key].dtype == np.uint8 and ex[key].shape == (32, 32), key
  assert ex["normals"].dtype == np.float32 and ex["normals"].shape == (32, 32, 3)
  assert ex["depth"].dtype == np.float32 and ex["depth"].shape == (32, 32)
  assert isinstance(ex["id"], bytes)


def test_stored_examples_equal_the_seeded_renderer(built):
  cfg = built.builder_config
  for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
    source = built.as_data_source(split)
    ids = set()
    for k in range(len(source)):
      ex = source[k]
      name = ex["id"].decode()
      ids.add(name)
      ex_split, index = name.rsplit("_", 1)
      assert ex_split == split
      want = synthetic.generate_example(cfg.seed, split, int(index), cfg.height, cfg.width)
      for key, value in want.items():
        np.testing.assert_array_equal(ex[key], value, err_msg=f"{name}/{key}")
    assert ids == {f"{split}_{i:06d}" for i in range(count)}


def test_rendering_is_deterministic_and_seed_dependent():
  a = synthetic.generate_example(7, "train", 4, 24, 24)
  b = synthetic.generate_example(7, "train", 4, 24, 24)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  for other in (synthetic.generate_example(8, "train", 4, 24, 24),
                synthetic.generate_example(7, "train", 5, 24, 24),
                synthetic.generate_example(7, "val", 4, 24, 24)):
    assert not np.array_equal(a["depth"], other["depth"])


def test_normals_unit_and_facing_the_camera():
  for scene in SCENES:
    n = scene["normals"]
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
    # Visible surfaces face the viewer: normal . (ray direction) < 0 in the camera frame.
    rays = synthetic.ray_directions(SIZE, SIZE).reshape(SIZE, SIZE, 3)
    assert np.all((_internal(n) * rays).sum(-1) < 0)
    wall = scene["semseg"] == synthetic.WALL
    assert np.all(n[wall][:, 2] > 0.8)  # the wall faces the camera (yaw <= 25 degrees)


def test_normals_agree_with_depth_gradient():
  """Normals from central differences of the back-projected depth match the stored ones.

  Compared on pixels whose 3x3 neighbourhood lies on one primitive and one smooth face (no
  crease); the finite-difference error grows only at grazing angles on small curved objects.
  """
  errors = []
  for scene in SCENES:
    p = _points(scene["depth"])
    du = p[1:-1, 2:] - p[1:-1, :-2]
    dv = p[2:, 1:-1] - p[:-2, 1:-1]
    n_fd = -np.cross(du, dv)
    n_fd /= np.linalg.norm(n_fd, axis=-1, keepdims=True)
    n = _internal(scene["normals"])
    centre = n[1:-1, 1:-1]
    prim = scene["primitive"]
    one_prim = (ndimage.maximum_filter(prim, 3) == ndimage.minimum_filter(prim, 3))[1:-1, 1:-1]
    min_cos = np.ones(centre.shape[:2])
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        nb = n[1 + dy:SIZE - 1 + dy, 1 + dx:SIZE - 1 + dx]
        min_cos = np.minimum(min_cos, (centre * nb).sum(-1))
    sel = one_prim & (min_cos > np.cos(np.deg2rad(30)))
    assert sel.mean() > 0.7
    errors.append(np.degrees(np.arccos(np.clip((n_fd * centre).sum(-1), -1, 1)))[sel])
  errors = np.concatenate(errors)
  assert errors.mean() < 0.2
  assert np.percentile(errors, 99) < 2.0
  assert errors.max() < 8.0


def test_spheres_walls_and_floor_closed_form():
  """Depth and normals describe the same analytic surfaces."""
  spheres = 0
  for scene in SCENES:
    p = _points(scene["depth"]).reshape(-1, 3)
    n = _internal(scene["normals"]).reshape(-1, 3)
    prim = scene["primitive"].ravel()
    semseg = scene["semseg"].ravel()
    # Floor: Y = camera height everywhere, normal straight up (-Y).
    floor = semseg == synthetic.FLOOR
    assert floor.any()
    np.testing.assert_allclose(p[floor, 1], p[floor, 1].mean(), rtol=1e-5)
    np.testing.assert_allclose(n[floor], np.broadcast_to([0, -1, 0], n[floor].shape), atol=1e-6)
    # Wall: one constant normal, N . P constant.
    wall = semseg == synthetic.WALL
    np.testing.assert_allclose(n[wall], np.broadcast_to(n[wall][0], n[wall].shape), atol=1e-6)
    d = (n[wall] * p[wall]).sum(-1)
    np.testing.assert_allclose(d, d.mean(), rtol=1e-5)
    # Spheres: P - r N is one fixed centre for some radius r (linear least squares in r, C).
    for k in np.unique(prim[semseg == synthetic.SPHERE]):
      sel = prim == k
      if sel.sum() < 6:
        continue
      spheres += 1
      m = sel.sum()
      a = np.zeros((3 * m, 4))
      a[:, 0] = n[sel].ravel()
      a[:, 1:] = np.tile(np.eye(3), (m, 1))
      sol, *_ = np.linalg.lstsq(a, p[sel].ravel(), rcond=None)
      residual = a @ sol - p[sel].ravel()
      assert sol[0] > 0.25  # the radius, in metres (sampled in [0.3, 0.6])
      assert np.abs(residual).max() < 1e-4
  assert spheres >= 1


def test_edges_are_instance_boundaries():
  for scene in SCENES:
    inst = scene["instance"]
    cross = ndimage.generate_binary_structure(2, 1)
    boundary = (ndimage.grey_dilation(inst, footprint=cross, mode="nearest")
                != ndimage.grey_erosion(inst, footprint=cross, mode="nearest"))
    np.testing.assert_array_equal(scene["edge"], boundary.astype(np.uint8))
    sem = scene["semseg"].astype(np.int32)
    sem_boundary = (ndimage.grey_dilation(sem, footprint=cross, mode="nearest")
                    != ndimage.grey_erosion(sem, footprint=cross, mode="nearest"))
    assert np.all(scene["edge"][sem_boundary] == 1)  # every class boundary is an edge
    # Depth jumps (occlusions) are edges too.
    z = scene["depth"]
    jump = np.zeros_like(z, bool)
    jump[:, 1:] |= np.abs(np.diff(z, axis=1)) > 0.5
    assert np.all(scene["edge"][jump] == 1)


def test_saliency_is_the_largest_object():
  for scene in SCENES:
    inst, sal = scene["instance"], scene["sal"]
    assert set(np.unique(sal)) <= {0, 1}
    ids = np.unique(inst[sal == 1])
    assert len(ids) == 1 and ids[0] >= 2  # one object, never wall (0) or floor (1)
    np.testing.assert_array_equal(sal == 1, inst == ids[0])
    areas = {i: np.count_nonzero(inst == i) for i in np.unique(inst) if i >= 2}
    assert areas[ids[0]] == max(areas.values())


def test_human_parts_follow_persons():
  with_person = 0
  for scene in SCENES:
    person = scene["semseg"] == synthetic.PERSON
    parts = scene["human_parts"]
    if person.any():
      with_person += 1
      assert np.all((parts > 0) == person)
      assert set(np.unique(parts[person])) <= set(range(1, synthetic.NUM_HUMAN_PARTS_CLASSES))
    else:
      assert np.all(parts == tasks.IGNORE_INDEX)
  assert 0 < with_person < len(SCENES)


def test_class_ids_in_range():
  for scene in SCENES:
    assert scene["semseg"].max() < synthetic.NUM_SEMSEG_CLASSES
    assert np.all(scene["depth"] > 0)


def test_interrupted_build_is_not_used(tmp_path, monkeypatch):
  data_dir = str(tmp_path)
  real = synthetic.generate_example

  def failing(seed, split, index, height, width):
    if split == "val" and index == 2:
      raise RuntimeError("simulated crash")
    return real(seed, split, index, height, width)

  monkeypatch.setattr(synthetic, "generate_example", failing)
  with pytest.raises(RuntimeError, match="simulated crash"):
    synthetic.ensure_built(data_dir, config=TINY)
  assert not synthetic.SyntheticMultiTask(data_dir=data_dir, config=TINY).is_prepared()
  monkeypatch.setattr(synthetic, "generate_example", real)
  builder = synthetic.ensure_built(data_dir, config=TINY)
  assert builder.is_prepared()
  assert len(builder.as_data_source("train")) == 6
  assert len(builder.as_data_source("val")) == 3
  assert os.path.basename(str(builder.data_dir)) == "1.0.0"

  def never(*args):
    raise AssertionError("a prepared dataset must not be rendered again")

  monkeypatch.setattr(synthetic, "generate_example", never)
  again = synthetic.ensure_built(data_dir, config=TINY)
  ex = again.as_data_source("val")[0]
  want = real(TINY.seed, "val", int(ex["id"].decode().rsplit("_", 1)[1]), 16, 16)
  np.testing.assert_array_equal(ex["depth"], want["depth"])


def test_rendering_says_what_it_does_and_not_downloading(tmp_path, capfd, caplog):
  """The console shows the project's line and per-split progress; TFDS's "Downloading and
  preparing" wording, its "Variant folder" warnings and the OpenCV notice stay off it (the
  last two demoted to DEBUG, where the log keeps them at a verbose level)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  builder = synthetic.ensure_built(str(tmp_path), config=TINY)
  logging.warning("OpenCV is not installed. (what TFDS says when decoding an image)")
  logging.warning("an unrelated warning stays")
  out, err = capfd.readouterr()
  shown = [r.getMessage() for r in caplog.records if r.levelno > 10]
  assert builder.is_prepared()
  assert "rendering the synthetic multi-task dataset (test16)" in out
  assert "rendered 6/6 train scenes" in out and "rendered 3/3 val scenes" in out
  for hidden in ("Download", "downloaded", "Variant folder", "OpenCV"):
    assert hidden not in out + err, (hidden, out, err)
    assert not any(hidden in message for message in shown), (hidden, shown)
  assert "an unrelated warning stays" in shown
