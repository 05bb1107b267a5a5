"""Damaged dataset folders, out-of-range config values and unwritable workdirs are one-line
UserErrors naming the file, key or path; metrics.jsonl reads as one run after a resume.

Every damaged dataset is a copy of the tiny synthetic set (conftest.synthetic_data_dir), never
the shared one. The command-line forms (exit code 2, one stderr line) are in test_cli_errors.py.
"""
import errno
import json
import os
import shutil

import grain.python as grain
import numpy as np
import pytest

from configs import base
from configs import synthetic as synthetic_config
from freesine_jax import checkpointing
from freesine_jax import config_checks
from freesine_jax import errors
from freesine_jax import writers
from freesine_jax.data import pipeline

VERSION = os.path.join("synthetic_multitask", "tiny", "1.0.0")
TRAIN_SHARD = "synthetic_multitask-train.array_record-00000-of-00001"


@pytest.fixture
def data_copy(synthetic_data_dir, tmp_path):
  """(config, folder): the tiny config reading a private copy of the tiny dataset."""
  shutil.copytree(os.path.join(synthetic_data_dir, VERSION), tmp_path / VERSION)
  config = synthetic_config.get_config("tiny")
  config.dataset.data_dir = str(tmp_path)
  return config, str(tmp_path / VERSION)


def _scribble(path, where=1 / 3, size=4096):
  with open(path, "r+b") as f:
    f.seek(int(os.path.getsize(path) * where))
    f.write(np.random.default_rng(0).bytes(size))


def test_intact_copy_reads(data_copy):
  config, _ = data_copy
  source = pipeline.get_data_source(config, "train")
  assert len(source) == 24
  assert set(source[23]) >= {"image", "semseg"}


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty", "missing"])
def test_damaged_shard_is_named_before_training(data_copy, damage):
  config, folder = data_copy
  shard = os.path.join(folder, TRAIN_SHARD)
  if damage == "truncated":
    os.truncate(shard, os.path.getsize(shard) // 2)
  elif damage == "random bytes":
    _scribble(shard)
  elif damage == "empty":
    os.truncate(shard, 0)
  else:
    os.remove(shard)
  with pytest.raises(errors.UserError) as e:
    pipeline.get_data_source(config, "train")
  message = str(e.value)
  assert f"shard {TRAIN_SHARD} of split 'train'" in message
  assert f"the folder {folder} is damaged: delete it (rm -r {folder}) and rerun" in message
  expected = {"truncated": "cannot be read", "random bytes": "hash mismatch",
              "empty": "is empty", "missing": "is missing"}[damage]
  assert expected in message
  pipeline.get_data_source(config, "val")  # the intact split still reads


def test_damage_found_while_reading_names_the_shard(data_copy, monkeypatch):
  """A split too large to read whole up front (FULL_CHECK_BYTES) checks its shards' ends only;
  a damaged block inside is reported when a record in it is read, also through grain."""
  config, folder = data_copy
  _scribble(os.path.join(folder, TRAIN_SHARD))
  monkeypatch.setattr(pipeline, "FULL_CHECK_BYTES", 0)
  source = pipeline.get_data_source(config, "train")  # the ends read fine
  failed = []
  for i in range(len(source)):
    try:
      source[i]
    except errors.UserError as e:
      failed.append((i, str(e)))
  assert failed, "the scribbled block was never read"
  index, message = failed[0]
  assert message.startswith(f"dataset 'synthetic': reading record {index} of split 'train' "
                            f"failed in shard {TRAIN_SHARD} (Corrupted Riegeli/records file")
  assert f"the folder {folder} is damaged: delete it" in message
  loader = grain.DataLoader(
      data_source=source, sampler=grain.IndexSampler(len(source), shuffle=False, num_epochs=1,
                                                     seed=0),
      operations=[grain.Batch(4)], worker_count=0)
  with pytest.raises(errors.UserError, match="failed in shard"):
    for _ in loader:
      pass


def test_shard_record_count_must_match_dataset_info(data_copy):
  config, folder = data_copy
  info_path = os.path.join(folder, "dataset_info.json")
  info = json.loads(open(info_path, encoding="utf-8").read())
  for split in info["splits"]:
    if split["name"] == "train":
      split["shardLengths"] = [str(int(split["shardLengths"][0]) + 1)]
  with open(info_path, "w", encoding="utf-8") as f:
    json.dump(info, f)
  with pytest.raises(errors.UserError, match="holds 24 records where dataset_info.json says 25"):
    pipeline.get_data_source(config, "train")


def test_missing_dataset_info_says_incomplete(data_copy):
  config, folder = data_copy
  os.remove(os.path.join(folder, "dataset_info.json"))
  with pytest.raises(errors.UserError) as e:
    pipeline.get_data_source(config, "train")
  assert str(e.value) == (
      f"dataset 'synthetic': {folder} is incomplete (it has no dataset_info.json, which TFDS "
      f"writes last); delete it (rm -r {folder}) and rerun: the synthetic set is rendered again "
      "on first use")
  assert not os.path.exists(os.path.join(folder, "dataset_info.json"))  # nothing rewritten


def test_prepared_dataset_without_dataset_info_says_incomplete(tmp_path):
  """A real (prepared) dataset's folder with shards but no dataset_info.json: the advice is to
  prepare it again, not 'not prepared'."""
  config = base.get_config()
  config.dataset.data_dir = str(tmp_path)
  folder = tmp_path / "pascal_context_mt" / "1.0.0"
  folder.mkdir(parents=True)
  (folder / "pascal_context_mt-train.array_record-00000-of-00001").write_bytes(b"x")
  with pytest.raises(errors.UserError) as e:
    pipeline.get_data_source(config, "train")
  assert f"{folder} is incomplete" in str(e.value)
  assert "python -m freesine_jax.data.prepare --dataset=pascal_context" in str(e.value)


# ----------------------------------------------------------------------------- config values


def test_every_range_names_a_declared_key():
  declared = base.get_config()
  for key in list(config_checks.RANGES) + list(config_checks.POSITIVE_TUPLES):
    node = declared
    for part in key.split("."):
      assert part in node, key
      node = node[part]
  assert config_checks.EXCLUSIVE_LOW <= set(config_checks.RANGES)
  assert config_checks.EXCLUSIVE_HIGH <= set(config_checks.RANGES)


@pytest.mark.parametrize("module,arg", [
    ("base", None), ("pascal_context", None), ("pascal_context", "mtlora,r64"),
    ("pascal_context", "full_ft"), ("nyud", None), ("cityscapes", None), ("synthetic", None),
    ("synthetic", "tiny")])
def test_shipped_configs_are_in_range(module, arg):
  import importlib  # pylint: disable=g-import-not-at-top
  get_config = importlib.import_module(f"configs.{module}").get_config
  config_checks.check_values(get_config(arg) if arg else get_config())


@pytest.mark.parametrize("key,value,fragment", [
    ("input.batch_size", -8, "config.input.batch_size=-8: expected a positive global batch"),
    ("input.batch_size", 0, "config.input.batch_size=0:"),
    ("input.num_workers", -1, "config.input.num_workers=-1:"),
    ("model.lora.dropout", 1.0, "config.model.lora.dropout=1.0: expected a dropout rate in [0, 1)"),
    ("optim.eps", 0.0, "config.optim.eps=0.0: expected a positive epsilon"),
    ("optim.lr_base", float("nan"), "config.optim.lr_base=nan:"),
    ("optim.b2", 1.0, "config.optim.b2=1.0:"),
    ("train.checkpoint_every_steps", 0, "config.train.checkpoint_every_steps=0:"),
    ("train.max_steps", -1, "config.train.max_steps=-1:"),
    ("dataset.image_size", (64, 0), "config.dataset.image_size=(64, 0): expected a tuple of "
     "positive integers"),
])
def test_out_of_range_value_names_its_key(key, value, fragment):
  config = synthetic_config.get_config("tiny")
  section, name = key.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  with config.unlocked():
    node[name] = value
  with pytest.raises(errors.UserError) as e:
    config_checks.check_values(config)
  assert str(e.value).startswith(fragment), str(e.value)


def test_boundary_values_pass():
  config = synthetic_config.get_config("tiny")
  config.input.num_workers = 0
  config.model.lora.dropout = 0.0
  config.train.max_steps = 0
  config.optim.lr_base = 0.0
  config_checks.check_values(config)


# ----------------------------------------------------------------------------- workdir


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(errors.UserError, match=f"--workdir={path} is a file, not a directory"):
    checkpointing.ensure_workdir(str(path))


def test_workdir_under_a_file(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.UserError, match="cannot write there \\(Not a directory\\)"):
    checkpointing.ensure_workdir(str(tmp_path / "file" / "run"))


def test_read_only_workdir(tmp_path, monkeypatch):
  """A read-only file system (faked: this test may run as root, whom permissions do not stop)."""
  real_open = open

  def read_only(path, mode="r", *args, **kwargs):
    if str(path).startswith(str(tmp_path)) and any(c in mode for c in "wax+"):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return real_open(path, mode, *args, **kwargs)
  monkeypatch.setattr("builtins.open", read_only)
  with pytest.raises(errors.UserError) as e:
    checkpointing.ensure_workdir(str(tmp_path / "run"))
  assert str(e.value) == (f"--workdir={tmp_path / 'run'}: cannot write there (Read-only file "
                          "system); name a writable directory")


def test_writable_workdir_is_created_and_left_clean(tmp_path):
  checkpointing.ensure_workdir(str(tmp_path / "a" / "run"))
  assert os.listdir(tmp_path / "a" / "run") == []


# ----------------------------------------------------------------------------- metrics.jsonl


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": float(s)} for s in (0, 2, 4, 6)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')  # cut short
  lines = writers.JsonLines(str(path), rewrite=False)
  assert lines.drop_after(4) == 2
  lines.write({"step": 6, "loss": -6.0})
  lines.close()
  got = [json.loads(line) for line in path.read_text().splitlines()]
  assert got == rows[:3] + [{"step": 6, "loss": -6.0}]
  assert not os.path.exists(str(path) + ".partial")


@pytest.mark.parametrize("rewrite", [False, True])
def test_metrics_file_of_one_run_is_left_alone(tmp_path, rewrite):
  path = tmp_path / "metrics.jsonl"
  text = "".join(json.dumps({"step": s}) + "\n" for s in (0, 5, 10))
  path.write_text(text)
  lines = writers.JsonLines(str(path), rewrite=rewrite)
  assert lines.drop_after(10) == 0
  assert lines.drop_after(5) == 1
  lines.write({"step": 7})
  lines.close()
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [0, 5, 7]
