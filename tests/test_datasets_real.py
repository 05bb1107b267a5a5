"""Real-dataset builders on tiny fake folders: decoded values, ignore handling, bad inputs."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import scipy.io

import fake_datasets as fake
from freesine_jax.data import builder as builder_lib
from freesine_jax.data import cityscapes
from freesine_jax.data import nyud
from freesine_jax.data import pascal_context
from freesine_jax.data.builder import DatasetError

H, W = fake.H, fake.W


def _build(cls, manual_dir, data_dir):
  b = cls(manual_dir=manual_dir, data_dir=str(data_dir))
  b.download_and_prepare()
  return b


def _read_all(builder, split):
  src = builder.as_data_source(split)
  return [src[i] for i in range(len(src))]


def _decoded_jpeg(path):
  return np.asarray(Image.open(path).convert("RGB"))


# ----------------------------------------------------------------------------- pure pieces


def test_thin_matches_published_guo_hall_example():
  # Example from skimage.morphology.thin's documentation (same algorithm as the baselines').
  sq = np.zeros((7, 7), bool)
  sq[1:-1, 2:-2] = True
  sq[0, 1] = True
  expected = np.zeros((7, 7), bool)
  expected[0, 1] = expected[1, 2] = True
  expected[2:5, 3] = True
  np.testing.assert_array_equal(pascal_context.thin(sq), expected)


def test_laplacian_edges_hand_computed():
  lm = np.array([[1, 1, 2, 2],
                 [1, 1, 2, 2],
                 [1, 2, 3, 3]])
  # Row 2, col 1: up 1 + left 1 + right 3 + down (reflect-101 -> row 1) 1 - 4*2 = -2 != 0.
  # Row 0, col 0: up/down reflect to row 1 (1, 1), left/right reflect to col 1 (1, 1) -> 0.
  # Row 1, col 2: up 2 + down 3 + left 1 + right 2 - 4*2 = 0 -> no edge; row 1, col 3: right
  # reflects to col 2 (2): 2 + 3 + 2 + 2 - 8 = 1 -> edge.
  expected = np.array([[0, 1, 1, 0],
                       [0, 1, 0, 1],
                       [1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(pascal_context.laplacian_edges(lm), expected)
  # Labels 1,2,3 along a line give a zero Laplacian in the middle: not every change is an edge.
  # (The end columns reflect to 2 on both sides: 2 + 2 + 1 + 1 - 4 = 2, and 2 + 2 + 3 + 3 - 12.)
  np.testing.assert_array_equal(pascal_context.laplacian_edges(np.array([[1, 2, 3]] * 3)),
                                np.array([[1, 0, 1]] * 3, bool))


def test_thin_of_two_pixel_boundary_keeps_one_column():
  strip = np.zeros((H, W), bool)
  strip[:, 9:11] = True
  out = pascal_context.thin(strip)
  assert not out[:, 10].any() and not out[:, :9].any() and not out[:, 11:].any()
  # Guo-Hall subiteration 1 deletes the east column; the west column survives except its top
  # end pixel, whose neighbourhood (E, S, SE set) has one crossing and N = 2.
  np.testing.assert_array_equal(np.flatnonzero(out[:, 9]), np.arange(1, H))


# ----------------------------------------------------------------------------- PASCAL


@pytest.fixture(scope="module")
def pascal_built(tmp_path_factory):
  root = fake.make_pascal(str(tmp_path_factory.mktemp("PASCAL_MT")))
  b = _build(pascal_context.PascalContextMT, root, tmp_path_factory.mktemp("tfds"))
  return root, b


def test_pascal_values(pascal_built):
  root, b = pascal_built
  assert b.info.splits["train"].num_examples == 2 and b.info.splits["val"].num_examples == 1
  all_ids = fake.PASCAL_TRAIN + fake.PASCAL_VAL
  examples = _read_all(b, "train") + _read_all(b, "val")
  lm = fake.pascal_label_map()
  valid = (lm == 72)  # chair has NYU normals; aeroplane (2) and unlabelled (0) do not.
  for k, (image_id, ex) in enumerate(zip(all_ids, examples)):
    assert ex["id"] in (image_id, image_id.encode())
    np.testing.assert_array_equal(
        ex["image"], _decoded_jpeg(os.path.join(root, "JPEGImages", image_id + ".jpg")))
    assert ex["semseg"].dtype == np.uint8
    np.testing.assert_array_equal(ex["semseg"], fake.pascal_semseg(k))
    np.testing.assert_array_equal(ex["human_parts"], fake.pascal_expected_parts(image_id))
    sal = np.zeros((H, W), np.uint8)
    sal[:, 5:15] = 1
    np.testing.assert_array_equal(ex["sal"], sal)
    png = fake.pascal_normals_png(k).astype(np.float64)
    expected_normals = np.where(valid[..., None], png * 2 / 255 - 1, 0.0)
    assert ex["normals"].dtype == np.float32
    np.testing.assert_allclose(ex["normals"], expected_normals, rtol=0, atol=1e-6)
    assert np.all(ex["normals"][~valid] == 0)
    # Edge: LabelMap changes between cols 9|10 (72|2) and around the 0 corner (rows 12-15,
    # cols 0-3). Expected = thinned Laplacian, checked against the hand-derived Laplacian.
    lap = np.zeros((H, W), bool)
    lap[:, 9:11] = True
    lap[11:13, 0:4] = True  # rows 11 | 12 meet across the 72 | 0 boundary
    lap[12:, 3:5] = True    # cols 3 | 4 likewise; rows 13-15 cols 0-2 see only zeros
    np.testing.assert_array_equal(pascal_context.laplacian_edges(lm), lap)
    np.testing.assert_array_equal(ex["edge"], pascal_context.thin(lap).astype(np.uint8))
    assert ex["edge"].dtype == np.uint8 and ex["edge"][:, 10].sum() == 0


def test_pascal_parts_ignore_rules(pascal_built):
  _, b = pascal_built
  train = _read_all(b, "train")
  assert np.all(train[1]["human_parts"] == 255)  # only a cat: no person
  assert np.all(_read_all(b, "val")[0]["human_parts"] == 255)  # person without parts
  assert set(np.unique(train[0]["human_parts"]).tolist()) == {0, 1, 2, 3, 4, 5, 6}


def test_pascal_generation_stats(pascal_built):
  _, b = pascal_built
  stats = b.generation_stats
  assert stats["train"] == {"examples": 2, "semseg": 2, "human_parts": 1, "sal": 2,
                            "normals": 2, "edge": 2}
  assert stats["val"]["human_parts"] == 0
  assert builder_lib.count_from_source(b) == stats


def test_pascal_voc12_semseg_takes_precedence(tmp_path):
  root = fake.make_pascal(str(tmp_path / "P"))
  voc = np.full((H, W), 3, np.uint8)
  fake.save_png(os.path.join(root, "semseg", "VOC12", "2008_000002.png"), voc)
  b = pascal_context.PascalContextMT(manual_dir=root, data_dir=str(tmp_path / "d"))
  refs = b.list_examples(root)["train"]
  np.testing.assert_array_equal(b.load_example(root, refs[1])["semseg"], voc)
  np.testing.assert_array_equal(b.load_example(root, refs[0])["semseg"], fake.pascal_semseg(0))


# ----------------------------------------------------------------------------- NYUD


def test_nyud_values(tmp_path):
  root = fake.make_nyud(str(tmp_path / "NYUD_MT"))
  b = _build(nyud.NyudMT, root, tmp_path / "tfds")
  examples = _read_all(b, "train") + _read_all(b, "val")
  assert len(examples) == 3
  for k, (image_id, ex) in enumerate(zip(fake.NYUD_TRAIN + fake.NYUD_VAL, examples)):
    np.testing.assert_array_equal(
        ex["image"], _decoded_jpeg(os.path.join(root, "images", image_id + ".jpg")))
    seg = np.full((H, W), 255, np.uint8)  # 0 -> ignore
    seg[:, 4:] = 0       # 1 -> 0
    seg[:, 8:] = 39      # 40 -> 39
    seg[:, 12:] = 6 + k  # 7+k -> 6+k
    np.testing.assert_array_equal(ex["semseg"], seg)
    assert ex["depth"].dtype == np.float32
    np.testing.assert_array_equal(ex["depth"], fake.nyud_depth(k))
    np.testing.assert_array_equal(ex["normals"], fake.nyud_normals(k))
    edge = np.zeros((H, W), np.uint8)
    edge[:, 4] = 1
    edge[5, :] = 1
    np.testing.assert_array_equal(ex["edge"], edge)
  assert b.generation_stats["train"] == {"examples": 2, "semseg": 2, "depth": 2,
                                         "normals": 2, "edge": 2}


# ----------------------------------------------------------------------------- Cityscapes


def test_cityscapes_values(tmp_path):
  root = fake.make_cityscapes(str(tmp_path / "cityscapes"))
  b = _build(cityscapes.CityscapesMT, root, tmp_path / "tfds")
  examples = _read_all(b, "train") + _read_all(b, "val")
  stems = [s for items in fake.CITYSCAPES.values() for _, s in items]
  assert [e["id"] for e in examples] in (stems, [s.encode() for s in stems])
  for k, ex in enumerate(examples):
    seg = np.full((H, W), 255, np.uint8)
    seg[:, 2:6] = 0
    seg[:, 6:10] = 13
    seg[:, 10:14] = 18
    seg[0, :] = 10 if k == 0 else 255
    np.testing.assert_array_equal(ex["semseg"], seg)
    depth = np.full((H, W), fake.BASELINE * fake.FX / 10.0)
    depth[:, 10:] = fake.BASELINE * fake.FX / 40.5
    depth[2:4, :] = 0.0  # raw 0 (missing) and raw 1 (zero disparity) are invalid
    assert ex["depth"].dtype == np.float32
    np.testing.assert_allclose(ex["depth"], depth, rtol=1e-6, atol=0)
  assert abs(float(examples[0]["depth"][0, 0]) - 47.35749) < 1e-4  # 0.209313 * 2262.52 / 10


# ----------------------------------------------------------------------------- bad inputs


def _expect_error(builder_cls, root, *needles):
  b = builder_cls(manual_dir=root)
  with pytest.raises(DatasetError) as info:
    b.validate()
  for needle in needles:
    assert needle in str(info.value), str(info.value)
  return str(info.value)


def test_missing_split_file(tmp_path):
  root = fake.make_nyud(str(tmp_path / "n"))
  os.remove(os.path.join(root, "gt_sets", "val.txt"))
  _expect_error(nyud.NyudMT, root, os.path.join("gt_sets", "val.txt"), "missing split file")


def test_missing_label_file(tmp_path):
  root = fake.make_pascal(str(tmp_path / "p"))
  os.remove(os.path.join(root, "human_parts", "2008_000002.mat"))
  os.remove(os.path.join(root, "sal_distill", "2008_000003.png"))
  msg = _expect_error(pascal_context.PascalContextMT, root,
                      "human_parts/2008_000002.mat: missing", "sal_distill/2008_000003.png",
                      "2 file(s) missing")
  assert "Traceback" not in msg


def test_truncated_image(tmp_path):
  root = fake.make_nyud(str(tmp_path / "n"))
  path = os.path.join(root, "images", "0002.jpg")
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  _expect_error(nyud.NyudMT, root, "images/0002.jpg: cannot decode image")


@pytest.mark.parametrize("label,damage,message", [
    ("segmentation/0002.png", "truncate", "segmentation/0002.png: cannot decode image"),
    ("segmentation/0002.png", "text", "segmentation/0002.png: cannot decode image"),
    ("depth/0002.npy", "truncate", "depth/0002.npy: cannot read .npy file"),
    ("normals/0003.npy", "text", "normals/0003.npy: cannot read .npy file")])
def test_corrupt_label_file_is_named_when_building(tmp_path, label, damage, message):
  """A label file cut short or replaced by text fails the build naming it (issue 14)."""
  root = fake.make_nyud(str(tmp_path / "n"))
  path = os.path.join(root, *label.split("/"))
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2] if damage == "truncate" else b"<html>404</html>")
  b = nyud.NyudMT(manual_dir=root, data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DatasetError) as info:
    b.download_and_prepare()
  assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_wrong_shaped_mat(tmp_path):
  root = fake.make_pascal(str(tmp_path / "p"))
  scipy.io.savemat(os.path.join(root, "pascal-context", "trainval", "2008_000003.mat"),
                   {"LabelMap": np.zeros((H, W + 1), np.uint16)})
  _expect_error(pascal_context.PascalContextMT, root,
                "pascal-context/trainval/2008_000003.mat", "shape (16, 21)", "expected (16, 20)")


def test_corrupt_mat_and_missing_key(tmp_path):
  root = fake.make_pascal(str(tmp_path / "p"))
  open(os.path.join(root, "human_parts", "2008_000001.mat"), "wb").write(b"not a mat file")
  _expect_error(pascal_context.PascalContextMT, root, "human_parts/2008_000001.mat",
                "cannot read .mat")
  root2 = fake.make_pascal(str(tmp_path / "p2"))
  scipy.io.savemat(os.path.join(root2, "pascal-context", "trainval", "2008_000001.mat"),
                   {"labels": np.zeros((H, W))})
  _expect_error(pascal_context.PascalContextMT, root2, "expected variable 'LabelMap'")


def test_unknown_part_name(tmp_path):
  root = fake.make_pascal(str(tmp_path / "p"))
  anno = fake.pascal_part_anno([("person", 15, fake.box(0, 4, 0, 4),
                                 [("tail", fake.box(0, 2, 0, 2))])])
  scipy.io.savemat(os.path.join(root, "human_parts", "2008_000002.mat"), {"anno": anno})
  _expect_error(pascal_context.PascalContextMT, root, "human_parts/2008_000002.mat",
                "unknown person part name 'tail'")


def test_wrong_shaped_npy(tmp_path):
  root = fake.make_nyud(str(tmp_path / "n"))
  np.save(os.path.join(root, "normals", "0003.npy"), np.zeros((H, W), np.float32))
  _expect_error(nyud.NyudMT, root, "normals/0003.npy", "shape (16, 20)", "expected (16, 20, 3)")


@pytest.mark.parametrize("which", ["pascal", "nyud", "cityscapes"])
def test_unknown_class_values(tmp_path, which):
  if which == "pascal":
    root = fake.make_pascal(str(tmp_path / "p"))
    bad = fake.pascal_semseg(0)
    bad[3, 3] = 21
    fake.save_png(os.path.join(root, "semseg", "pascal-context", "2008_000001.png"), bad)
    _expect_error(pascal_context.PascalContextMT, root,
                  "semseg/pascal-context/2008_000001.png", "unknown semseg class value(s) 21")
  elif which == "nyud":
    root = fake.make_nyud(str(tmp_path / "n"))
    bad = fake.nyud_seg(0)
    bad[0, 0] = 41
    fake.save_png(os.path.join(root, "segmentation", "0001.png"), bad)
    _expect_error(nyud.NyudMT, root, "segmentation/0001.png", "unknown NYUD class value(s) 41")
  else:
    root = fake.make_cityscapes(str(tmp_path / "c"))
    bad = fake.cityscapes_label_ids(0)
    bad[0, 0] = 34
    stem = fake.CITYSCAPES["train"][0][1]
    fake.save_png(os.path.join(root, "gtFine", "train", "aachen", stem + "_gtFine_labelIds.png"),
                  bad)
    _expect_error(cityscapes.CityscapesMT, root, stem + "_gtFine_labelIds.png",
                  "unknown Cityscapes labelId value(s) 34")


def test_cityscapes_missing_camera(tmp_path):
  root = fake.make_cityscapes(str(tmp_path / "c"))
  stem = fake.CITYSCAPES["val"][0][1]
  os.remove(os.path.join(root, "camera", "val", "lindau", stem + "_camera.json"))
  _expect_error(cityscapes.CityscapesMT, root,
                f"camera/val/lindau/{stem}_camera.json: missing")


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path):
  root = fake.make_nyud(str(tmp_path / "n"))
  # Corrupt the *last* val example so the train split has been fully written when it fails.
  np.save(os.path.join(root, "depth", "0003.npy"), np.full((H, W), np.nan, np.float32))
  data_dir = tmp_path / "tfds"
  b = nyud.NyudMT(manual_dir=root, data_dir=str(data_dir))
  with pytest.raises(DatasetError, match="depth/0003.npy: depth contains NaN"):
    b.download_and_prepare()
  leftovers = [os.path.join(d, f) for d, _, fs in os.walk(data_dir) for f in fs]
  assert not any(f.endswith(("dataset_info.json", ".array_record-00000-of-00001"))
                 for f in leftovers), leftovers
  assert not nyud.NyudMT(manual_dir=root, data_dir=str(data_dir)).is_prepared()


def test_prepare_command_line(tmp_path):
  root = fake.make_nyud(str(tmp_path / "n"))
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
  cmd = [sys.executable, "-m", "freesine_jax.data.prepare", "--dataset=nyud",
         f"--manual_dir={root}", f"--data_dir={tmp_path / 'tfds'}"]
  ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "train: 2 examples" in ok.stdout and "semseg 2/2" in ok.stdout
  assert "val: 1 examples" in ok.stdout
  os.remove(os.path.join(root, "edge", "0001.npy"))
  bad = subprocess.run(cmd[:-1] + [f"--data_dir={tmp_path / 'tfds2'}"], capture_output=True,
                       text=True, env=env, timeout=300)
  assert bad.returncode != 0
  assert "edge/0001.npy: missing" in bad.stderr
  assert "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- metrics


def test_metrics_on_fake_pascal_split(pascal_built):
  """mIoU of a hand-made prediction over the stored split, against a hand computation."""
  from freesine_jax import metrics

  _, b = pascal_built
  examples = _read_all(b, "train") + _read_all(b, "val")
  target_seg = np.stack([e["semseg"] for e in examples]).astype(np.int32)
  target_parts = np.stack([e["human_parts"] for e in examples]).astype(np.int32)

  # semseg targets: cols 0-4 class 0 ([0,0] is 255), cols 5-9 class 15, cols 10+ class 0/3/6.
  pred_seg = np.zeros_like(target_seg)
  pred_seg[:, :, 5:10] = 15
  pred_seg[:, 0, 0] = 15  # on the ignored pixel: must not count as a false positive of 15
  seg = metrics.make_meter("semseg", 21)
  seg.update(pred_seg, target_seg)
  # class 0: tp = 3*79 + 160 = 397, fp = 160 (true 3) + 160 (true 6), fn = 0; class 15: IoU 1;
  # classes 3 and 6: IoU 0; the 17 absent classes count as 0 in the mean over 21.
  expected_seg = 100.0 * (397 / 717 + 1.0) / 21
  assert seg.result()["mIoU"] == pytest.approx(expected_seg, rel=1e-12)

  # human_parts: only the first image has a person; predict its torso (20 px) as head (12 px),
  # everything else right; predictions on the all-255 images must be ignored.
  pred_parts = np.where(target_parts == 255, 2, target_parts)
  pred_parts[pred_parts == 2] = 1
  pred_parts[1:] = 2
  parts = metrics.make_meter("human_parts", 7)
  parts.update(pred_parts, target_parts)
  # IoU: head 12/(12+20), torso 0/20, background and parts 3..6 exact -> (5 + 0.375) / 7.
  result = parts.result()
  assert result["mIoU"] == pytest.approx(100.0 * 5.375 / 7, rel=1e-12)
  assert result["num_images"] == 1
