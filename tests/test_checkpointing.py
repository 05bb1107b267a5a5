"""Resume guards: a checkpoint from another model/task setup or backbone fails clearly."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from freesine_jax import checkpointing


def _config(rank):
  return ml_collections.ConfigDict(dict(tasks=("semseg", "depth"), num_classes={"semseg": 5},
                                        model=dict(lora=dict(rank=rank), backbone_weights="/a"),
                                        train=dict(num_epochs=3)))


def test_check_compatible_names_the_differing_fields():
  saved = {"config": _config(8).to_json_best_effort()}
  checkpointing.check_compatible(saved, _config(8), "/w/checkpoints", 5)  # same: no error
  moved = _config(8)
  moved.model.backbone_weights = "/b"  # weights moved: their content is checked by the hash
  moved.train.num_epochs = 10          # training length is not part of the model
  checkpointing.check_compatible(saved, moved, "/w/checkpoints", 5)
  with pytest.raises(ValueError, match=r"(?s)/w/checkpoints step 5.*model\.lora: checkpoint "
                     r"\{'rank': 8\} vs config \{'rank': 16\}"):
    checkpointing.check_compatible(saved, _config(16), "/w/checkpoints", 5)
  other_tasks = _config(8)
  other_tasks.tasks = ("semseg",)
  with pytest.raises(ValueError, match="tasks: checkpoint"):
    checkpointing.check_compatible(saved, other_tasks, "/w/checkpoints", 5)


def test_tree_hash_is_the_converter_hash_of_the_same_weights():
  tree = {"layers_0": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "norm": {"scale": jnp.ones(3)}}
  flat = {"layers_0/kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3),
          "norm/scale": np.ones(3, np.float32)}
  assert checkpointing.tree_hash(tree) == checkpointing.backbone_hash(flat)
  changed = {**tree, "norm": {"scale": jnp.full(3, 2.0)}}
  assert checkpointing.tree_hash(changed) != checkpointing.tree_hash(tree)
  with pytest.raises(ValueError, match="trained with frozen backbone weights of hash"):
    checkpointing.check_backbone({"backbone_hash": checkpointing.tree_hash(changed)},
                                 checkpointing.tree_hash(tree), 3)
