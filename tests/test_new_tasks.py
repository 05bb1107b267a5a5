"""Adding a task to a trained model (config.train.new_tasks): from a trained 2-task run, a few
steps of training 'depth' leave every old weight bitwise as trained and the old tasks' outputs
as they were, lower depth's loss, and the result evaluates and exports; mistakes are one-line
errors."""
import dataclasses
import functools
import json
import os

import chex
import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import synthetic
from freesine_jax import checkpointing
from freesine_jax import errors
from freesine_jax import evaluate
from freesine_jax import modeling
from freesine_jax import models
from freesine_jax import new_tasks
from freesine_jax import sharding
from freesine_jax import train
from freesine_jax.tools import export

OLD, NEW = ("semseg", "normals"), ("depth",)
# One evaluation batch (configs/synthetic.py:tiny's eval_batch_size): the runs' evaluations
# compiled the merge and forward programs for this shape, which eval_outputs reuses.
IMAGES = jax.random.normal(jax.random.key(7), (8, 32, 32, 3))


def tiny_config(data_dir, tasks=OLD, steps=4):
  """configs/synthetic.py:tiny with two Swin stages instead of four. Adding a task is
  bookkeeping per leaf and per stacked task row, which two stages exercise as four do (shared
  and task blocks, patch merging, prompts, Clock Net, the shared decoder) at about half the
  program size (its lowered gradient: 11.6k lines of HLO instead of 21.8k), so about half the
  compile time."""
  config = synthetic.get_config("tiny")
  config.model.depths, config.model.num_heads = (2, 2), (1, 2)
  config.model.decoder.proj_channels = (18, 36)
  config.tasks = tasks
  config.dataset.data_dir = data_dir
  config.train.max_steps = steps
  config.train.untrained_baseline = False
  config.train.image_every_steps = 0
  config.train.log_every_steps = 1
  config.eval.max_batches = 1
  return config


def added_config(data_dir, init_from, steps=6):
  config = tiny_config(data_dir, OLD + NEW, steps)
  config.train.new_tasks = ",".join(NEW)
  config.train.init_from = init_from
  return config


def eval_outputs(config, model, variables, images):
  """{task: output} of `images` as evaluation computes them (evaluate.evaluate: the weights
  replicated on the mesh and merged for inference, the batch split over the mesh), so the
  merge and forward programs are the ones the run's evaluation compiled."""
  mesh = sharding.make_mesh(config)
  variables = evaluate.model_variables(variables, mesh)
  merged = evaluate.make_inference_merge(model)(variables, image_shape=(1, *images.shape[1:]))
  batch = sharding.shard_batch({"image": np.asarray(images)}, mesh)["image"]
  return evaluate.make_eval_forward(model)(merged, batch)


def restored(config, workdir):
  """(model, its variables at the run's latest checkpoint, forward(variables, images) as the
  run's evaluation computes it)."""
  model = modeling.build_model(config)
  step, metadata = checkpointing.find_checkpoint(config, workdir, None)
  variables = checkpointing.restore_checkpoint(workdir, step, metadata,
                                               modeling.init_variables(model, config))
  return model, variables, functools.partial(eval_outputs, config, model)


@pytest.fixture(scope="module")
def runs(synthetic_data_dir, tmp_path_factory):
  """(old config, old workdir, new config, new workdir): 2 tasks trained 4 steps, then depth
  added and trained 6 steps."""
  root = tmp_path_factory.mktemp("new_tasks")
  old_config, old_dir = tiny_config(synthetic_data_dir), str(root / "old")
  train.train_and_evaluate(old_config, old_dir)
  new_config, new_dir = added_config(synthetic_data_dir, old_dir), str(root / "new")
  new_config.train.untrained_baseline = True  # the step-0 model: old tasks + untrained depth
  train.train_and_evaluate(new_config, new_dir)
  return old_config, old_dir, new_config, new_dir


@pytest.fixture(scope="module")
def models_of(runs):
  """{'old': restored(old run), 'new': restored(new run)}."""
  old_config, old_dir, new_config, new_dir = runs
  return {"old": restored(old_config, old_dir), "new": restored(new_config, new_dir)}


def test_old_weights_stay_bitwise_and_only_the_new_tasks_own_values_move(runs, models_of):
  _, _, new_config, _ = runs
  old, new = models_of["old"][1], models_of["new"][1]
  init_model = modeling.build_model(new_config)
  fresh, trainable = new_tasks.start_from_trained(
      new_config, init_model, modeling.init_variables(init_model, new_config))
  n_old = len(OLD)
  moved = 0
  for name in ("params", "batch_stats"):
    old_flat = traverse_util.flatten_dict(old[name])
    new_flat = traverse_util.flatten_dict(new[name])
    start_flat = traverse_util.flatten_dict(fresh[name])
    for path, value in new_flat.items():
      value = np.asarray(value)
      if path not in old_flat:  # depth's own leaf (its projections, head, BN statistics)
        assert any("depth" in part for part in path), path
        moved += not np.array_equal(value, start_flat[path])
        continue
      saved = np.asarray(old_flat[path])
      if saved.shape == value.shape:
        assert value.tobytes() == saved.tobytes(), f"{name}/{'/'.join(path)} changed"
      else:  # stacked per task: the old tasks' rows are bitwise the trained ones
        chex.assert_shape(value, (len(OLD + NEW), *saved.shape[1:]))
        assert value[:n_old].tobytes() == saved.tobytes(), f"{name}/{'/'.join(path)} changed"
        moved += not np.array_equal(value[n_old:], np.asarray(start_flat[path])[n_old:])
  assert moved >= 5  # depth's token, projections, head and statistics trained
  # The mask marks exactly the new values: the token's new row, depth's leaves, nothing else.
  params_mask = traverse_util.flatten_dict(trainable["params"])
  np.testing.assert_array_equal(params_mask[("task_tokens",)][:, 0], [False, False, True])
  trained = {path for path, m in params_mask.items() if np.any(m)}
  assert trained - {("task_tokens",)} == {p for p in params_mask if any("depth" in s for s in p)}


def test_old_tasks_predictions_are_unchanged_and_the_prompt_mask_is_what_keeps_them(models_of):
  (_, old, old_forward), (new_model, new, new_forward) = models_of["old"], models_of["new"]
  before = old_forward(old, IMAGES)
  after = new_forward(new, IMAGES)
  for task in OLD:
    chex.assert_equal_shape((before[task], after[task]))
    # Not bitwise: each softmax and attention contraction has the new prompt's exact-zero
    # term added, which can change float32 summation order (a few ulps of the outputs).
    scale = float(np.max(np.abs(before[task])))
    np.testing.assert_allclose(after[task], before[task], rtol=0, atol=1e-5 * scale,
                               err_msg=task)
  # Without the mask (the new prompt a key for every token) the same weights change them.
  unmasked = new_model.clone(adapter=dataclasses.replace(new_model.adapter,
                                                         prompt_generations=()))
  leaked = evaluate.make_eval_forward(unmasked)(new, IMAGES)
  worst = max(float(np.max(np.abs(leaked[t] - before[t]) / np.max(np.abs(before[t]))))
              for t in OLD)
  assert worst > 1e-3, worst


def test_the_new_tasks_loss_goes_down(runs):
  _, _, new_config, new_dir = runs
  with open(os.path.join(new_dir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if "train/loss/depth" in line]
  losses = [r["train/loss/depth"] for r in rows]
  assert len(losses) == new_config.train.max_steps
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  with open(os.path.join(new_dir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  assert results["beats_untrained"]["depth"], results  # the eval split's metric improved too
  # Only the added task is judged against an untrained start; the old ones are checked unchanged.
  assert set(results["beats_untrained"]) == set(NEW)
  assert results["old_tasks_unchanged"] == {t: True for t in OLD}
  # The old tasks evaluate exactly as at step 0: their outputs never changed.
  for task in OLD:
    for key, value in results["untrained"][task].items():
      assert results["final"][task][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, key)


def test_the_result_evaluates_and_exports(runs, models_of, tmp_path):
  _, _, new_config, new_dir = runs
  report = evaluate.evaluate_run(new_config, new_dir, out=str(tmp_path / "eval"))
  assert set(report["results"]) == set(OLD + NEW)
  out = export.export_run(new_config, new_dir, str(tmp_path / "export"))
  loaded = export.load(out)
  _, variables, forward = models_of["new"]
  reference = forward(variables, IMAGES)
  served = loaded.serve(IMAGES)
  for task in OLD + NEW:
    np.testing.assert_allclose(served[task], reference[task], rtol=1e-4, atol=1e-5,
                               err_msg=task)
  # Evaluating with the task list but without train.new_tasks would build another model.
  config = tiny_config(new_config.dataset.data_dir, OLD + NEW)
  with pytest.raises(errors.UserError, match="train.new_tasks"):
    checkpointing.find_checkpoint(config, new_dir, None)


def test_mistakes_are_one_line_errors(runs, synthetic_data_dir, tmp_path):
  _, old_dir, _, _ = runs

  def start(config):
    new_tasks.start_from_trained(config, models.builtin_model(config), None)

  config = added_config(synthetic_data_dir, old_dir)
  config.tasks, config.train.new_tasks = OLD, "normals"
  with pytest.raises(errors.UserError, match="normals is already a task of the run"):
    start(config)
  config = added_config(synthetic_data_dir, old_dir)
  config.tasks, config.train.new_tasks = OLD + ("dpeth",), "dpeth"
  with pytest.raises(errors.UserError, match="unknown task 'dpeth' \\(did you mean 'depth'"):
    start(config)
  config = added_config(synthetic_data_dir, str(tmp_path / "nothing"))
  with pytest.raises(errors.UserError, match="config.train.init_from=.* does not exist"):
    start(config)
  config = added_config(synthetic_data_dir, old_dir)
  config.model.lora.rank = 8  # another model than the trained run's
  with pytest.raises(errors.UserError, match="model.lora.rank is 4 there, 8 here"):
    start(config)
  config = added_config(synthetic_data_dir, "")
  with pytest.raises(errors.UserError, match="needs config.train.init_from"):
    start(config)
  config = added_config(synthetic_data_dir, old_dir)
  config.tasks = ("depth",) + OLD
  with pytest.raises(errors.UserError, match="config.tasks must end with the new tasks"):
    start(config)
