"""A run saved by earlier code still evaluates and resumes: tests/fixtures/saved_run_v1; and the
config versions that make it read (config_checks.upgrade, renamed keys refused).

The fixture was written by tests/fixtures/make_saved_run.py at commit ce19caa, before the
refactor of the task path and of evaluation (issue 38): Free Sinewich on the tiny synthetic
dataset, two tasks, two steps with a checkpoint after each, and the metrics that code measured
on step 2. Today's code must give the same metrics from step 2, and resuming from step 1 must
give step 2's saved state bit for bit (what the earlier code trained without stopping).
"""
import json
import os
import shutil

import pytest

from configs import synthetic
from freesine_jax import cli
from freesine_jax import config_checks
from freesine_jax import errors
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


@pytest.mark.default_codegen  # the fixture's metrics and state were computed at that level
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


@pytest.mark.default_codegen
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


def test_upgrade_moves_renamed_keys_of_a_version_1_config():
  saved = {"tasks": ["semseg"], "model": {"task_path": "sine_awb",
                                          "sine_awb": {"modules": ["fc1"], "omega_0": 3.0}}}
  got = config_checks.upgrade(saved)
  assert got == {"tasks": ["semseg"], "version": 2,
                 "model": {"task_path": "sine_awb", "task_path_modules": ["fc1"],
                           "sine_awb": {"omega_0": 3.0}}}
  assert saved["model"]["sine_awb"]["modules"] == ["fc1"]  # the input is left as it was
  assert config_checks.upgrade(got) == got  # a current config passes unchanged
  with pytest.raises(errors.UserError, match="version 3 is newer"):
    config_checks.upgrade(dict(got, version=3))


def test_the_fixtures_saved_config_upgrades_to_todays_model_section(synthetic_data_dir):
  with open(os.path.join(FIXTURE, "checkpoints", str(STEPS), "metadata", "metadata")) as f:
    saved = json.loads(json.load(f)["config"])
  assert "version" not in saved and "modules" in saved["model"]["sine_awb"]  # version 1
  today = json.loads(fixture_config(synthetic_data_dir).to_json_best_effort())
  assert config_checks.upgrade(saved)["model"] == today["model"]


def test_a_renamed_key_on_the_command_line_names_its_new_key():
  declared = synthetic.get_config("tiny")
  with pytest.raises(errors.UserError) as raised:
    cli.check_key(declared, "model.sine_awb.modules")
  message = str(raised.value)
  assert "\n" not in message and "--config.model.task_path_modules=" in message
  cli.check_key(declared, "model.task_path_modules")  # the new key is declared


def test_training_refuses_a_config_of_another_version(tmp_path, synthetic_data_dir):
  config = fixture_config(synthetic_data_dir)
  config.version = 1  # a config file written for the code before the rename
  with pytest.raises(errors.UserError, match=r"config.version=1: this code reads config version 2"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
