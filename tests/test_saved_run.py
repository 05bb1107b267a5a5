"""A run saved by earlier code still evaluates and resumes: tests/fixtures/saved_run_v1.

The fixture was written by tests/fixtures/make_saved_run.py at commit ce19caa, before the
refactor of the task path and of evaluation (issue 38): Free Sinewich on the tiny synthetic
dataset, two tasks, two steps with a checkpoint after each, and the metrics that code measured
on step 2. Today's code must give the same metrics from step 2, and resuming from step 1 must
give step 2's saved state bit for bit (what the earlier code trained without stopping).
"""
import json
import os
import shutil

from configs import synthetic
from freesine_jax import evaluate
from freesine_jax import train

from conftest import assert_same_state, final_state

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "saved_run_v1")
STEPS = 2


def fixture_config(data_dir):
  """The config make_saved_run.py trained with (only data_dir differs)."""
  c = synthetic.get_config("tiny")
  c.tasks = ("semseg", "normals")
  c.model.decoder.proj_channels = (8, 8, 8, 8)
  c.model.decoder.head_channels = 16
  c.dataset.data_dir = data_dir
  c.train.max_steps = STEPS
  c.train.checkpoint_every_steps = 1
  c.train.untrained_baseline = False
  c.train.image_every_steps = 0
  c.eval.max_batches = 1
  c.eval.qualitative_examples = 0
  return c


def copy_of_fixture(tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(FIXTURE, workdir)
  return workdir


def test_saved_run_evaluates_as_it_did(tmp_path, synthetic_data_dir):
  workdir = copy_of_fixture(tmp_path)
  with open(os.path.join(FIXTURE, "metrics.json")) as f:
    want = json.load(f)
  got = evaluate.evaluate_run(fixture_config(synthetic_data_dir), workdir, step=STEPS,
                              out=str(tmp_path / "eval"))
  assert got["step"] == want["step"] == STEPS
  assert set(got["results"]) == set(want["results"]) == {"semseg", "normals"}
  for task, metrics in want["results"].items():
    assert set(got["results"][task]) == set(metrics), task
    for key, value in metrics.items():
      assert got["results"][task][key] == value, (task, key)


def test_saved_run_resumes_to_the_state_it_saved(tmp_path, synthetic_data_dir, capsys):
  workdir = copy_of_fixture(tmp_path)
  want_step, want = final_state(FIXTURE)
  assert want_step == STEPS
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  train.train_and_evaluate(fixture_config(synthetic_data_dir), workdir)
  assert f"step {STEPS - 1}" in capsys.readouterr().out.split("resumed from", 1)[1]
  got_step, got = final_state(workdir)
  assert got_step == STEPS
  assert_same_state(got, want)
