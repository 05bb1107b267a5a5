"""The task registry (freesine_jax/tasks.py): every reference resolves, and a new task kind is one
registry entry plus its functions — losses, metrics, the input pipeline and the builders handle it
without knowing its name."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic
from freesine_jax import errors
from freesine_jax import losses
from freesine_jax import metrics
from freesine_jax import modeling
from freesine_jax import tasks
from freesine_jax import train
from freesine_jax.data import augment
from freesine_jax.data import builder as builder_lib
from freesine_jax.data import pipeline
from freesine_jax.data import registry


def test_every_kind_reference_resolves():
  for kind in tasks.KINDS.values():
    refs = [kind.loss, kind.loss_totals, kind.postprocess, kind.meter, kind.warp]
    refs += [kind.mirror] if kind.mirror is not None else []
    for ref in refs:
      assert callable(tasks.resolve(ref)), (kind.name, ref)
  assert tasks.resolve("freesine_jax.losses:depth_l1") is losses.depth_l1


def test_bad_references_name_themselves():
  with pytest.raises(ValueError, match="'freesine_jax.losses' is not"):
    tasks.resolve("freesine_jax.losses")
  with pytest.raises(ValueError, match="freesine_jax.losses:no_such_loss"):
    tasks.resolve("freesine_jax.losses:no_such_loss")


def test_one_resolver_names_where_a_bad_reference_came_from():
  """Task registry, config.model.factory and dataset registry share errors.resolve: a bad
  reference is a one-line UserError naming its source and the reference."""
  c = synthetic.get_config("tiny")
  for factory, says in (("tests.test_train", "is not 'package.module:attribute'"),
                        ("no_such_pkg.models:build", "cannot import no_such_pkg.models"),
                        ("tests.test_train:no_such_builder", "has no 'no_such_builder'")):
    c.model.factory = factory
    with pytest.raises(errors.UserError) as e:
      modeling.build_model(c)
    assert str(e.value).startswith("config.model.factory: ") and says in str(e.value)
    assert "\n" not in str(e.value)
  c.model.factory = "tests.test_train:build_tiny_model"
  assert modeling.build_model(c).__class__.__name__ == "TinyModel"
  with pytest.raises(errors.UserError, match="task registry reference: 'freesine_jax.nope:f'"):
    tasks.resolve("freesine_jax.nope:f")
  for name in registry.DATASET_NAMES:
    assert isinstance(registry.builder_class(name), type)


def test_saliency_and_edge_are_separate_kinds_sharing_the_label_layout():
  sal, edge = tasks.get_task("sal").kind, tasks.get_task("edge").kind
  assert sal.name == "saliency" and edge.name == "edge"
  assert sal.label == edge.label == tasks.CLASS_IDS
  assert dict(edge.loss_options) == {"pos_weight": tasks.EDGE_POS_WEIGHT}
  assert dict(sal.loss_options) == {}  # batch-balanced weight
  assert isinstance(metrics.make_meter("edge"), metrics.EdgeMeter)
  assert metrics.make_meter("edge").pos_weight == tasks.EDGE_POS_WEIGHT


def test_class_counts_and_output_channels():
  assert tasks.class_count("semseg") == 21 and tasks.class_count("semseg", 40) == 40
  assert tasks.class_count("depth") is None and tasks.class_count("depth", 5) is None
  assert tasks.output_channels("human_parts", 3) == 3
  assert tasks.output_channels("normals", 5) == 3  # fixed by the kind
  with pytest.raises(ValueError, match="num_classes only applies"):
    metrics.make_meter("depth", 5)
  with pytest.raises(ValueError, match="num_classes must be set"):
    tasks.TaskSpec("broken", tasks.KINDS["classification"], True, "mIoU")


def test_missing_loss_weight_is_a_config_error(tmp_path):
  config = synthetic.get_config("tiny")
  config.tasks = ("semseg", "depth")
  config.loss_weights = {"semseg": 1.0}
  with pytest.raises(ValueError, match=r"config\.loss_weights has no weight for depth;"):
    train.train_and_evaluate(config, str(tmp_path))


# ------------------------------------------------------------------ a seventh task kind

INVALID = -1.0


def heatmap_totals(label):
  return {"valid": jnp.sum(label != INVALID)}


def heatmap_mse(output, label, totals=None):
  """Mean squared error over pixels whose label is not INVALID."""
  totals = heatmap_totals(label) if totals is None else totals
  valid = label != INVALID
  err = jnp.where(valid, jnp.square(output[..., 0] - label), 0.0)
  return jnp.sum(err) / jnp.maximum(totals["valid"], 1)


def heatmap_values(output):
  return np.asarray(output[..., 0], np.float32)


class HeatmapMeter(metrics.Meter):
  """Mean absolute error over valid pixels."""

  def _zero_state(self):
    return {"sum": np.zeros(()), "count": np.zeros((), np.int64)}

  def _accumulate(self, pred, target):
    valid = target != INVALID
    self._state["sum"] += np.abs(pred.astype(np.float64) - target)[valid].sum()
    self._state["count"] += int(valid.sum())

  def result(self):
    return {"mae": float(self._state["sum"] / self._state["count"])}


def warp_heatmap(label, sampler, *, angle_degrees, scale, label_fill):
  del angle_degrees, scale, label_fill
  return sampler.nearest_sample(np.asarray(label, np.float32), INVALID)


def _not_invalid(label):
  return np.asarray(label) != INVALID


@pytest.fixture
def heatmap_task(monkeypatch):
  """Registers kind 'heatmap' and task 'keypoints' for the test only."""
  here = __name__
  kind = tasks.TaskKind(
      "heatmap", tasks.LabelLayout(None, "float32", "float32", INVALID, _not_invalid), 1,
      loss=f"{here}:heatmap_mse", loss_totals=f"{here}:heatmap_totals",
      postprocess=f"{here}:heatmap_values",
      meter=f"{here}:HeatmapMeter", warp=f"{here}:warp_heatmap")
  monkeypatch.setitem(tasks.KINDS, "heatmap", kind)
  monkeypatch.setitem(tasks.TASKS, "keypoints", tasks.TaskSpec("keypoints", kind, False, "mae"))
  return "keypoints"


def test_a_new_kind_is_one_registry_entry(heatmap_task):
  task = heatmap_task
  rng = np.random.default_rng(0)
  label = rng.uniform(0, 1, (2, 4, 5)).astype(np.float32)
  label[0, 0] = INVALID
  output = rng.normal(size=(2, 4, 5, 1)).astype(np.float32)
  assert tasks.output_channels(task) == 1

  # Loss, alone and inside the jitted multi-task sum.
  valid = label != INVALID
  want = float(np.square(output[..., 0] - label)[valid].mean())
  np.testing.assert_allclose(losses.task_loss(task, jnp.asarray(output), jnp.asarray(label)),
                             want, rtol=1e-6)
  total, _ = jax.jit(lambda o, b: losses.multitask_loss(o, b, (task,), {task: 2.0}))(
      {task: output}, {task: label})
  np.testing.assert_allclose(total, 2.0 * want, rtol=1e-6)

  # Post-processing, meter and Δm.
  meter = metrics.make_meter(task)
  meter.update(metrics.postprocess(task, output), label)
  mae = np.abs(output[..., 0].astype(np.float64) - label)[valid].mean()
  assert meter.result()["mae"] == pytest.approx(mae, rel=1e-12)
  assert metrics.delta_m({task: {"mae": 1.0}}, {task: {"mae": 2.0}}) == pytest.approx(50.0)
  with pytest.raises(ValueError, match="channel"):
    metrics.postprocess(task, np.zeros((1, 2, 2, 3)))

  # Input pipeline: augmentation, batch dtype, padding.
  example = {"image": rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), task: label[1]}
  warped = augment.warp(example, (8, 10), angle_degrees=45.0)
  assert warped[task].shape == (8, 10) and warped[task][0, 0] == INVALID  # outside the source
  np.testing.assert_array_equal(augment.hflip(example)[task], label[1][:, ::-1])
  assert augment.to_model_inputs(example, (task,))[task].dtype == np.float32
  pad = pipeline.padding_example((task,), (3, 4))
  assert pad[task].dtype == np.float32 and np.all(pad[task] == INVALID)

  # Builders: stored feature and the usable-label count.
  feature = builder_lib.task_feature(task)
  assert feature.shape == (None, None) and feature.np_dtype == np.float32
  assert builder_lib.has_valid_label(task, label[1]) and not builder_lib.has_valid_label(
      task, np.full((2, 2), INVALID, np.float32))
