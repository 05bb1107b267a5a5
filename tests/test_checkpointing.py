"""Resume guards: a checkpoint from another model/task setup or backbone fails clearly."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from freesine_jax import checkpointing
from freesine_jax import errors

from conftest import fake_bucket


def _config(rank):
  config = base.get_config()
  config.tasks = ("semseg", "depth")
  config.num_classes.semseg = 5
  config.model.lora.rank = rank
  config.model.backbone_weights = "/a"
  config.train.num_epochs = 3
  return config


def test_check_compatible_names_the_differing_fields():
  saved = {"config": _config(8).to_json_best_effort()}
  checkpointing.check_compatible(saved, _config(8), "/w", 5, "resume")  # same: no error
  moved = _config(8)
  moved.model.backbone_weights = "/b"  # weights moved: their content is checked by the hash
  moved.train.num_epochs = 10          # training length is not part of the model
  moved.model.compute.task_conv = "conv"  # how the same function is computed
  checkpointing.check_compatible(saved, moved, "/w", 5, "resume")
  with pytest.raises(ValueError) as error:
    checkpointing.check_compatible(saved, _config(16), "/w", 5, "resume")
  assert str(error.value) == (
      "/w step 5 was trained with another config: model.lora.rank is 8 there, 16 here; to "
      "resume, use the run's config (e.g. --config.model.lora.rank=8) or a fresh --workdir")
  other_tasks = _config(8)
  other_tasks.tasks = ("semseg",)
  with pytest.raises(ValueError) as error:
    checkpointing.check_compatible(saved, other_tasks, "/w", 5, "evaluate it")
  assert str(error.value) == (
      "/w step 5 was trained with another config: tasks is ('semseg', 'depth') there, "
      "('semseg',) here; to evaluate it, use the run's config (e.g. "
      "--config.tasks=\"('semseg', 'depth')\")")


def test_tree_hash_is_the_converter_hash_of_the_same_weights():
  tree = {"layers_0": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "norm": {"scale": jnp.ones(3)}}
  flat = {"layers_0/kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3),
          "norm/scale": np.ones(3, np.float32)}
  assert checkpointing.tree_hash(tree) == checkpointing.backbone_hash(flat)
  changed = {**tree, "norm": {"scale": jnp.full(3, 2.0)}}
  assert checkpointing.tree_hash(changed) != checkpointing.tree_hash(tree)
  with pytest.raises(ValueError, match="trained with frozen backbone weights of hash") as raised:
    checkpointing.check_backbone({"backbone_hash": checkpointing.tree_hash(changed)},
                                 checkpointing.tree_hash(tree), 3)
  assert "another jaxlib" not in str(raised.value)  # no config recorded: no guess about why
  for weights, says_random in (("", True), ("/weights/swin_tiny.pth", False)):
    metadata = {"backbone_hash": checkpointing.tree_hash(changed),
                "config": json.dumps({"model": {"backbone_weights": weights}})}
    with pytest.raises(errors.UserError) as raised:
      checkpointing.check_backbone(metadata, checkpointing.tree_hash(tree), 3)
    message = str(raised.value)
    assert "\n" not in message and ("another jaxlib, XLA_FLAGS or CPU" in message) == says_random
  checkpointing.check_backbone({"backbone_hash": checkpointing.tree_hash(tree)},
                               checkpointing.tree_hash(tree), 3)  # the same weights pass


def _tree(root) -> dict[str, bytes]:
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize("url", [False, True], ids=["local", "gs"])
def test_move_tree_moves_every_file_locally_and_on_gs(tmp_path, monkeypatch, url):
  """A damaged step is moved aside with its files intact; on gs:// (no directory rename) file
  by file through etils.epath, never through os.path (which would make a local 'gs:' folder)."""
  store = tmp_path / "store"
  step = store / "bucket" / "run" / "checkpoints" / "12"
  for rel, data in {"state/manifest.ocdbt": b"m" * 100, "state/d/0": b"\x00\x01",
                    "metadata/metadata": b"{}", "_CHECKPOINT_METADATA": b"{1}"}.items():
    (step / rel).parent.mkdir(parents=True, exist_ok=True)
    (step / rel).write_bytes(data)
  want = _tree(step)
  target = store / "bucket" / "run" / "damaged_checkpoints" / "12-20261204"
  monkeypatch.chdir(tmp_path)
  if url:
    with fake_bucket(str(store)):
      checkpointing.move_tree("gs://bucket/run/checkpoints/12",
                              "gs://bucket/run/damaged_checkpoints/12-20261204")
  else:
    checkpointing.move_tree(str(step), str(target))
  assert _tree(target) == want
  assert not step.exists()
  assert not os.path.exists(tmp_path / "gs:")


def test_a_relative_checkpoint_directory_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.zeros((), jnp.int32)}
  ckpt = checkpointing.Checkpointer(os.path.join("run", "checkpoints"), async_save=False)
  ckpt.save(1, state, force=True)
  assert ckpt.all_steps() == [1]
  assert str(ckpt.directory) == str(tmp_path / "run" / "checkpoints")
  restored = ckpt.restore_saved_state(1)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
  assert int(restored["step"]) == 0
