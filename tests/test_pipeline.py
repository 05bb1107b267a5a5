"""Tests for the grain input pipeline (freesine_jax/data/pipeline.py) on the tiny synthetic set."""
import hashlib
import sys

import numpy as np
import pytest

from configs import synthetic
from freesine_jax.data import augment
from freesine_jax.data import pipeline

ALL = ("semseg", "human_parts", "sal", "normals", "edge", "depth")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, tasks=ALL, augment_on=True, seed=0, batch=4, eval_batch=4):
  c = synthetic.get_config("tiny")
  c.seed = seed
  c.tasks = tasks
  c.dataset.data_dir = data_dir
  c.dataset.image_size = (24, 32)
  c.dataset.augment.flip = augment_on
  c.dataset.augment.rotate_degrees = 20.0 if augment_on else 0.0
  c.dataset.augment.scale_range = (0.75, 1.25) if augment_on else None
  c.input.batch_size = batch
  c.input.eval_batch_size = eval_batch
  return c


def _digest(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _expected_images(config, split):
  """Resized, normalised images of every stored example (independent of the loaders)."""
  source = pipeline.get_data_source(config, split)
  size = tuple(config.dataset.image_size)
  return [augment.normalize_image(augment.resize({"image": source[i]["image"]}, size)["image"])
          for i in range(len(source))]


@pytest.mark.parametrize("tasks", [ALL, ("semseg", "normals"), ("depth",)])
def test_train_batch_shapes_and_dtypes(data_dir, tasks):
  config = _config(data_dir, tasks)
  batch = next(iter(pipeline.create_train_loader(config, shard_index=0, shard_count=1)))
  assert set(batch) == {"image", *tasks}
  assert batch["image"].shape == (4, 24, 32, 3) and batch["image"].dtype == np.float32
  for task in tasks:
    if task == "normals":
      assert batch[task].shape == (4, 24, 32, 3) and batch[task].dtype == np.float32
      norm = np.linalg.norm(batch[task], axis=-1)
      np.testing.assert_allclose(norm[norm > 0], 1.0, atol=1e-5)
    elif task == "depth":
      assert batch[task].shape == (4, 24, 32) and batch[task].dtype == np.float32
      assert batch[task].min() >= 0
    else:
      assert batch[task].shape == (4, 24, 32) and batch[task].dtype == np.int32
  assert "tensorflow" not in sys.modules


def test_train_iterator_state_restores_the_same_batches(data_dir):
  loader = pipeline.create_train_loader(_config(data_dir), shard_index=0, shard_count=1)
  it = iter(loader)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # crosses the epoch boundary (24 examples / 4)
  restored = iter(pipeline.create_train_loader(_config(data_dir), shard_index=0, shard_count=1))
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_train_is_seeded(data_dir):
  a = next(iter(pipeline.create_train_loader(_config(data_dir), shard_index=0, shard_count=1)))
  b = next(iter(pipeline.create_train_loader(_config(data_dir), shard_index=0, shard_count=1)))
  c = next(iter(pipeline.create_train_loader(_config(data_dir, seed=1), shard_index=0,
                                             shard_count=1)))
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])


def test_train_augmentation_is_applied(data_dir):
  """With augmentation off each row is a resized stored image; with it on most rows are not."""
  expected = {_digest(im) for im in _expected_images(_config(data_dir), "train")}
  plain = next(iter(pipeline.create_train_loader(_config(data_dir, augment_on=False),
                                                 shard_index=0, shard_count=1)))
  assert all(_digest(im) in expected for im in plain["image"])
  aug = pipeline.create_train_loader(_config(data_dir), shard_index=0, shard_count=1)
  rows = [im for b, _ in zip(aug, range(3)) for im in b["image"]]
  assert sum(_digest(im) in expected for im in rows) < len(rows) // 2


def test_train_shards_are_disjoint_and_cover_the_epoch(data_dir):
  config = _config(data_dir, augment_on=False)
  expected = {_digest(im) for im in _expected_images(config, "train")}
  seen = []
  for shard in (0, 1):
    it = iter(pipeline.create_train_loader(config, shard_index=shard, shard_count=2))
    # 24 examples -> 12 per shard; local batch 4 // 2 = 2 -> one epoch is 6 batches.
    digests = [_digest(im) for _ in range(6) for im in next(it)["image"]]
    assert len(set(digests)) == 12
    seen.append(set(digests))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == expected


def test_eval_covers_every_example_once_with_padding(data_dir):
  config = _config(data_dir)
  loader = pipeline.create_eval_loader(config, shard_index=0, shard_count=1)
  batches = list(loader)
  assert len(batches) == len(loader) == 3  # 10 examples, batch 4
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(valid, [True] * 10 + [False] * 2)
  images = [im for b in batches for im, v in zip(b["image"], b["valid"]) if v]
  expected = _expected_images(config, "val")
  for got, want in zip(images, expected, strict=True):  # in source order, each exactly once
    np.testing.assert_array_equal(got, want)
  last = batches[-1]
  assert last["image"].shape == (4, 24, 32, 3)
  for key in ("semseg", "human_parts", "sal", "edge"):
    assert last[key].dtype == np.int32 and np.all(last[key][2:] == 255)
  assert np.all(last["normals"][2:] == 0) and np.all(last["depth"][2:] == 0)


@pytest.mark.parametrize("count", [2, 4])
def test_eval_shards_partition_the_split(data_dir, count):
  config = _config(data_dir, eval_batch=4)
  expected = [_digest(im) for im in _expected_images(config, "val")]
  seen, lengths = [], set()
  for shard in range(count):
    batches = list(pipeline.create_eval_loader(config, shard_index=shard, shard_count=count))
    lengths.add(len(batches))
    for b in batches:
      assert b["image"].shape[0] == 4 // count
      seen += [_digest(im) for im, v in zip(b["image"], b["valid"]) if v]
  assert len(lengths) == 1  # every process runs the same number of eval steps
  assert sorted(seen) == sorted(expected)


def test_errors_are_clear(data_dir):
  config = _config(data_dir, batch=3)
  with pytest.raises(ValueError, match="batch_size=3"):
    pipeline.create_train_loader(config, shard_index=0, shard_count=2)
  config = _config(data_dir)
  config.dataset.name = "imagenet"
  with pytest.raises(ValueError, match="imagenet"):
    pipeline.get_data_source(config, "train")
  config = _config(data_dir)
  with pytest.raises(ValueError, match="'test'"):
    pipeline.get_data_source(config, "test")
  source = [{"image": np.zeros((8, 8, 3), np.uint8), "semseg": np.zeros((8, 8), np.uint8)}] * 4
  config = _config(data_dir, tasks=("semseg", "depth"))
  loader = pipeline.create_eval_loader(config, shard_index=0, shard_count=1, data_source=source)
  with pytest.raises(KeyError, match=r"'depth'.*not stored in this dataset"):
    list(loader)


def test_unprepared_real_dataset_raises(tmp_path):
  from freesine_jax.data import registry  # pylint: disable=g-import-not-at-top
  assert registry.builder_class("pascal_context") is not None  # always registered
  config = _config(str(tmp_path))
  config.dataset.name = "pascal_context"
  config.dataset.builder_config = ""
  with pytest.raises(ValueError, match="not prepared.*freesine_jax.data.prepare"):
    pipeline.get_data_source(config, "train")


def test_augment_options_come_from_the_config_and_bad_values_are_rejected(data_dir):
  config = _config(data_dir)
  assert pipeline.augment_options(config) == dict(
      flip=True, rotate_degrees=20.0, scale_range=(0.75, 1.25), scales=None, image_order=1,
      label_fill="zero")
  config.dataset.augment.label_fill = "black"
  with pytest.raises(ValueError, match="label_fill='black'"):
    pipeline.augment_options(config)
