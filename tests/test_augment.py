"""Tests for freesine_jax/data/augment.py (geometric consistency of image and labels)."""
import numpy as np
import pytest

from freesine_jax import tasks
from freesine_jax.data import augment
from freesine_jax.data import synthetic

SIZE = 32
# The built-in tasks whose labels are class-id maps (nearest-neighbour resampling, 255 = ignore).
DISCRETE_TASKS = tuple(name for name, spec in tasks.TASKS.items()
                       if spec.kind.label == tasks.CLASS_IDS)


def _scene(index=0, size=SIZE):
  return synthetic.generate_example(11, "train", index, size, size)


def _random_example(rng, h=SIZE, w=SIZE):
  n = rng.normal(size=(h, w, 3)).astype(np.float32)
  n /= np.linalg.norm(n, axis=-1, keepdims=True)
  n[:4, :4] = 0.0  # an invalid patch
  return {
      "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
      "semseg": rng.integers(0, 6, (h, w), dtype=np.uint8),
      "human_parts": rng.integers(0, 7, (h, w), dtype=np.uint8),
      "sal": rng.integers(0, 2, (h, w), dtype=np.uint8),
      "edge": rng.integers(0, 2, (h, w), dtype=np.uint8),
      "normals": n,
      "depth": rng.uniform(0.5, 9.0, (h, w)).astype(np.float32),
  }


def test_flip_twice_is_identity():
  ex = _random_example(np.random.default_rng(0))
  once = augment.hflip(ex)
  twice = augment.hflip(once)
  for key in ex:
    np.testing.assert_array_equal(twice[key], ex[key], err_msg=key)
  np.testing.assert_array_equal(once["semseg"], ex["semseg"][:, ::-1])
  np.testing.assert_array_equal(once["normals"][..., 0], -ex["normals"][:, ::-1, 0])
  np.testing.assert_array_equal(once["normals"][..., 1:], ex["normals"][:, ::-1, 1:])


def test_flipped_synthetic_normals_still_match_geometry():
  """A mirrored scene is a valid scene: its wall normal's x flips sign, the floor's does not."""
  ex = _scene(1)
  flipped = augment.hflip(ex)
  h, w = ex["semseg"].shape
  mirror = w - 1 - np.arange(w)  # flipped column c shows original column w - 1 - c
  np.testing.assert_array_equal(flipped["semseg"], ex["semseg"][:, mirror])
  wall = flipped["semseg"] == synthetic.WALL
  floor = flipped["semseg"] == synthetic.FLOOR
  orig_wall = ex["semseg"] == synthetic.WALL
  orig_floor = ex["semseg"] == synthetic.FLOOR
  assert wall.sum() == orig_wall.sum() > 0 and floor.sum() == orig_floor.sum() > 0
  # Both surfaces are planes: one constant normal each, before and after the flip.
  (wall_n,) = np.unique(ex["normals"][orig_wall], axis=0)
  (floor_n,) = np.unique(ex["normals"][orig_floor], axis=0)
  np.testing.assert_allclose(floor_n, [0.0, -1.0, 0.0], atol=0)  # floor faces up (y down)
  assert abs(wall_n[0]) > 0.05 and wall_n[1] == 0.0 and wall_n[2] > 0  # yawed, faces camera
  # The mirrored wall is the wall with the opposite yaw: x negated, y and z unchanged; the
  # floor's normal has no x component, so it is unchanged.
  mirrored_wall_n = np.array([-wall_n[0], wall_n[1], wall_n[2]], np.float32)
  want = np.zeros((h, w, 3), np.float32)
  want[wall] = mirrored_wall_n
  want[floor] = floor_n
  got = np.where((wall | floor)[..., None], flipped["normals"], 0.0)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(flipped["normals"][floor], ex["normals"][orig_floor])
  # Every flipped normal (all classes) is the original at the mirrored position, x negated.
  sign = np.array([-1.0, 1.0, 1.0], np.float32)
  np.testing.assert_array_equal(flipped["normals"], ex["normals"][:, mirror] * sign)
  # Still valid normals: unit length where the scene has a surface.
  np.testing.assert_allclose(np.linalg.norm(flipped["normals"][wall | floor], axis=-1), 1.0,
                             atol=1e-6)


def test_identity_warp_is_exact():
  ex = _random_example(np.random.default_rng(1))
  out = augment.warp(ex, (SIZE, SIZE))
  np.testing.assert_array_equal(out["image"], ex["image"].astype(np.float32))
  for key in DISCRETE_TASKS:
    np.testing.assert_array_equal(out[key], ex[key])
  np.testing.assert_allclose(out["normals"], ex["normals"], atol=1e-6)
  np.testing.assert_array_equal(out["depth"], ex["depth"])


def test_rotation_by_90_is_rot90_counter_clockwise():
  """+90 degrees on a square image maps pixel centres to pixel centres: compare with np.rot90."""
  ex = _random_example(np.random.default_rng(2))
  out = augment.warp(ex, (SIZE, SIZE), angle_degrees=90.0)
  for key in DISCRETE_TASKS + ("depth",):
    np.testing.assert_array_equal(out[key], np.rot90(ex[key]), err_msg=key)
  np.testing.assert_allclose(out["image"], np.rot90(ex["image"]).astype(np.float32), atol=1e-3)
  # Vector rotation by +90 (counter-clockwise as displayed, y pointing down): (x, y) -> (y, -x).
  n = np.rot90(ex["normals"])
  want = np.stack([n[..., 1], -n[..., 0], n[..., 2]], -1)
  np.testing.assert_allclose(out["normals"], want, atol=1e-5)


def test_constant_normal_rotates_with_the_picture():
  right = np.zeros((SIZE, SIZE, 3), np.float32)
  right[..., 0] = 1.0  # pointing to the right (+column)
  ex = {"image": np.zeros((SIZE, SIZE, 3), np.uint8), "normals": right}
  up = augment.warp(ex, (SIZE, SIZE), angle_degrees=90.0)["normals"]
  np.testing.assert_allclose(up[SIZE // 2, SIZE // 2], [0.0, -1.0, 0.0], atol=1e-6)  # up = -row
  tilt = np.array([0.6, 0.0, 0.8], np.float32)
  ex["normals"] = np.broadcast_to(tilt, (SIZE, SIZE, 3)).copy()
  out = augment.warp(ex, (SIZE, SIZE), angle_degrees=30.0)["normals"]
  a = np.deg2rad(30.0)
  np.testing.assert_allclose(out[SIZE // 2, SIZE // 2],
                             [0.6 * np.cos(a), -0.6 * np.sin(a), 0.8], atol=1e-6)


def test_normals_unit_or_zero_after_random_warps():
  rng = np.random.default_rng(3)
  ex = _scene(2)
  for _ in range(5):
    out = augment.augment(ex, rng, (40, 24), flip=True, rotate_degrees=20,
                          scale_range=(0.75, 1.25))
    norm = np.linalg.norm(out["normals"], axis=-1)
    valid = norm > 0
    np.testing.assert_allclose(norm[valid], 1.0, atol=1e-5)
    assert valid.mean() > 0.5


def test_rotation_roundtrip_matches_in_the_interior():
  """theta then -theta on a smooth image: two bilinear passes, error <= 2 * A |k|^2 / 8."""
  h = w = 48
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  k = 2 * np.pi / 32.0
  image = 127.5 + 100.0 * np.sin(k * (0.6 * xx + 0.8 * yy))
  ex = {"image": np.repeat(image[..., None], 3, -1).astype(np.float32),
        "semseg": (xx // 8 + yy // 8).astype(np.uint8)}
  there = augment.warp(ex, (h, w), angle_degrees=17.0)
  back = augment.warp(there, (h, w), angle_degrees=-17.0)
  inner = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 < (0.4 * h) ** 2
  bound = 2 * 100.0 * k**2 / 8
  assert np.abs(back["image"][..., 0] - image)[inner].max() <= bound
  assert (back["semseg"] == ex["semseg"])[inner].mean() > 0.9


def test_source_coordinates_closed_form():
  ys, xs = augment.source_coordinates((4, 4), (8, 8))
  np.testing.assert_allclose(xs[0], (np.arange(8) + 0.5) / 2 - 0.5)
  np.testing.assert_allclose(ys[:, 0], (np.arange(8) + 0.5) / 2 - 0.5)
  # Zoom by s about the centre: an output offset d comes from source offset d / s.
  ys, xs = augment.source_coordinates((21, 21), (21, 21), scale=2.0)
  np.testing.assert_allclose(xs[10], 10 + (np.arange(21) - 10) / 2.0)
  # Rotation by a: output pixel above the centre samples the source rotated clockwise from it.
  a = 30.0
  ys, xs = augment.source_coordinates((21, 21), (21, 21), angle_degrees=a)
  r = np.deg2rad(a)
  np.testing.assert_allclose([xs[0, 10], ys[0, 10]], [10 + 10 * np.sin(r), 10 - 10 * np.cos(r)])


def test_zero_borders_and_ignore_option():
  ex = _random_example(np.random.default_rng(4))
  ex["semseg"] = np.full((SIZE, SIZE), 3, np.uint8)
  ex["human_parts"] = np.full((SIZE, SIZE), 2, np.uint8)
  out = augment.warp(ex, (SIZE, SIZE), angle_degrees=45.0)
  corner = (0, 0)  # outside the rotated source square
  assert np.all(out["image"][corner] == 0)
  for key in DISCRETE_TASKS:
    assert out[key][corner] == 0, key
  assert np.all(out["normals"][corner] == 0) and out["depth"][corner] == 0
  assert out["semseg"][SIZE // 2, SIZE // 2] == 3
  ignore = augment.warp(ex, (SIZE, SIZE), angle_degrees=45.0, label_fill="ignore")
  for key in DISCRETE_TASKS:
    assert ignore[key][corner] == 255, key
  assert np.all(ignore["normals"][corner] == 0) and ignore["depth"][corner] == 0


def test_human_parts_without_parts_become_ignore():
  ex = _random_example(np.random.default_rng(5))
  ex["human_parts"] = np.full((SIZE, SIZE), 255, np.uint8)  # stored: no person
  out = augment.warp(ex, (SIZE, SIZE), angle_degrees=30.0, scale=0.8)
  assert np.all(out["human_parts"] == 255)
  parts = np.zeros((SIZE, SIZE), np.uint8)
  parts[0, 0] = 4  # a person only in the corner: zooming in crops it away
  ex["human_parts"] = parts
  assert np.all(augment.warp(ex, (SIZE, SIZE), scale=1.5)["human_parts"] == 255)
  assert augment.warp(ex, (SIZE, SIZE))["human_parts"][0, 0] == 4


def test_discrete_labels_stay_in_their_value_sets():
  rng = np.random.default_rng(6)
  ex = _scene(3)
  for _ in range(5):
    out = augment.augment(ex, rng, (24, 40), flip=True, rotate_degrees=20,
                          scale_range=(0.75, 1.25))
    assert set(np.unique(out["semseg"])) <= set(np.unique(ex["semseg"])) | {0}
    assert set(np.unique(out["sal"])) <= {0, 1}
    assert set(np.unique(out["edge"])) <= {0, 1}
    assert set(np.unique(out["human_parts"])) <= set(np.unique(ex["human_parts"])) | {0, 255}
    for key in DISCRETE_TASKS:
      assert out[key].dtype == np.uint8 and out[key].shape == (24, 40)
    assert out["image"].shape == (24, 40, 3) and out["normals"].shape == (24, 40, 3)


def test_depth_is_divided_by_scale():
  ex = _random_example(np.random.default_rng(7))
  ex["depth"] = np.full((SIZE, SIZE), 6.0, np.float32)
  out = augment.warp(ex, (SIZE, SIZE), scale=1.5)
  np.testing.assert_allclose(out["depth"], 4.0)
  out = augment.warp(ex, (SIZE, SIZE), scale=0.75)
  inside = out["depth"] > 0
  np.testing.assert_allclose(out["depth"][inside], 8.0)
  assert out["depth"][0, 0] == 0  # border of the zoomed-out image: invalid


def test_sample_params_ranges_and_determinism():
  rng = np.random.default_rng(8)
  draws = [augment.sample_params(rng, flip=True, rotate_degrees=20, scale_range=(0.75, 1.25))
           for _ in range(2000)]
  angles = np.array([d.angle_degrees for d in draws])
  scales = np.array([d.scale for d in draws])
  flips = np.array([d.flip for d in draws])
  assert angles.min() >= -20 and angles.max() <= 20 and angles.min() < -19 and angles.max() > 19
  assert scales.min() >= 0.75 and scales.max() <= 1.25
  assert abs(flips.mean() - 0.5) < 4 * np.sqrt(0.25 / 2000)
  nyud = [augment.sample_params(rng, flip=True, scales=(1.0, 1.2, 1.5)) for _ in range(300)]
  assert {d.scale for d in nyud} == {1.0, 1.2, 1.5}
  assert all(d.angle_degrees == 0.0 for d in nyud)
  assert not any(augment.sample_params(rng, flip=False).flip for _ in range(50))
  a = augment.sample_params(np.random.default_rng(9), rotate_degrees=20, scale_range=(0.5, 2))
  b = augment.sample_params(np.random.default_rng(9), rotate_degrees=20, scale_range=(0.5, 2))
  assert a == b
  with pytest.raises(ValueError, match="either"):
    augment.sample_params(rng, scale_range=(1, 2), scales=(1.0,))


def test_normalize_and_model_inputs():
  # The ImageNet statistics, written out here (not read from augment): [0, 255] RGB input.
  mean = np.array([0.485, 0.456, 0.406])
  std = np.array([0.229, 0.224, 0.225])
  mean_pixel = np.round(mean * 255).reshape(1, 1, 3)
  out = augment.normalize_image(mean_pixel)
  assert out.dtype == np.float32 and out.shape == (1, 1, 3)
  np.testing.assert_allclose(out, 0.0, atol=0.5 / 255 / 0.224)
  np.testing.assert_allclose(augment.normalize_image(np.zeros((1, 1, 3))),
                             (-mean / std).reshape(1, 1, 3), rtol=1e-6)
  np.testing.assert_allclose(augment.normalize_image(np.full((1, 1, 3), 255.0)),
                             ((1.0 - mean) / std).reshape(1, 1, 3), rtol=1e-6)
  pixel = np.array([[[12, 200, 77]]], np.uint8)
  np.testing.assert_allclose(augment.normalize_image(pixel),
                             ((np.array([12, 200, 77]) / 255.0 - mean) / std).reshape(1, 1, 3),
                             rtol=1e-5)
  ex = _scene(0)
  inputs = augment.to_model_inputs(ex, ("semseg", "normals", "depth", "sal"))
  assert set(inputs) == {"image", "semseg", "normals", "depth", "sal"}
  assert inputs["image"].dtype == np.float32 and inputs["semseg"].dtype == np.int32
  assert inputs["sal"].dtype == np.int32 and inputs["normals"].dtype == np.float32
  with pytest.raises(KeyError, match="human_parts"):
    augment.to_model_inputs({"image": ex["image"]}, ("human_parts",))
