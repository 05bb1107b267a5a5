"""SIGKILL mid-run (after a checkpoint, at random times, during an asynchronous save), restart:
no checkpoint on disk restores to garbage and the final state equals an uninterrupted run's, bit
for bit.

Runs the real CLI (python -m freesine_jax.main) on the tiny synthetic dataset and the real grain
pipeline (so the data-iterator state is restored too), with the small conv model of
test_train.py (config.model.factory) so that each process compiles in seconds. The
processes share the session's data and persistent XLA compilation cache (conftest.cli_env).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, assert_same_state, final_state
from freesine_jax import checkpointing

TOTAL_STEPS = 45  # 24 train examples / batch 8 = 3 steps per epoch, 15 epochs
CKPT_EVERY = 5

CONFIG = textwrap.dedent("""\
    from configs import synthetic

    def get_config():
      c = synthetic.get_config("tiny")
      c.tasks = ("semseg", "human_parts", "sal", "normals", "edge", "depth")
      c.model.factory = "tests.test_train:build_tiny_model"
      c.train.num_epochs = 15
      c.train.warmup_epochs = 2
      c.train.log_every_steps = 5
      c.train.checkpoint_every_steps = {ckpt}
      c.train.max_checkpoints_to_keep = 2
      c.train.untrained_baseline = False
      c.train.image_every_steps = 0
      return c
    """).format(ckpt=CKPT_EVERY)


@pytest.fixture(scope="module")
def env(tmp_path_factory, cli_env):
  """(root, config path, environment): the session's data and compilation cache."""
  root = tmp_path_factory.mktemp("resume")
  config_path = root / "tiny_resume_config.py"
  config_path.write_text(CONFIG)
  return root, str(config_path), cli_env


def _cli(config_path, workdir):
  return [sys.executable, "-m", "freesine_jax.main", f"--config={config_path}",
          f"--workdir={workdir}"]


def _finished_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _data_iter_state(workdir, step):
  """The raw 'data_iter' item (every process's grain iterator state) of a checkpoint."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "data_iter", "metadata"))
  restored = mngr.restore(step, args=ocp.args.Composite(data_iter=ocp.args.JsonRestore()))
  mngr.close()
  return restored["data_iter"]


@pytest.fixture(scope="module")
def reference(env):
  """The uninterrupted run's workdir (also builds the dataset and fills the compile cache)."""
  root, config_path, e = env
  ref_dir = str(root / "reference")
  subprocess.run(_cli(config_path, ref_dir), cwd=REPO, env=e, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
  assert os.path.exists(os.path.join(ref_dir, "results.json"))
  return ref_dir


def _metrics_rows(workdir):
  """(step, sorted keys) of every metrics.jsonl row."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [(row["step"], sorted(row)) for row in map(json.loads, f)]


def _assert_same_final_state(ref_dir, run_dir):
  ref_step, ref_state = final_state(ref_dir)
  got_step, got_state = final_state(run_dir)
  assert ref_step == got_step == TOTAL_STEPS
  assert _data_iter_state(run_dir, got_step) == _data_iter_state(ref_dir, ref_step)
  assert_same_state(got_state, ref_state)
  # metrics.jsonl reads as one run: the rows an interrupted run logged past the step it
  # resumed from were dropped, no step repeats or goes back.
  assert _metrics_rows(run_dir) == _metrics_rows(ref_dir)
  assert not os.path.exists(os.path.join(run_dir, "checkpoints", checkpointing.TRASH_DIR))


def test_sigkill_then_resume_matches_uninterrupted_run(env, reference):
  root, config_path, e = env
  # 1) The uninterrupted reference run: the `reference` fixture.
  ref_dir = reference

  # 2) Same run, killed with SIGKILL as soon as its first checkpoint is complete.
  run_dir = str(root / "interrupted")
  proc = subprocess.Popen(_cli(config_path, run_dir), cwd=REPO, env=e,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  try:
    while not _finished_steps(run_dir) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.02)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  steps_at_kill = _finished_steps(run_dir)
  assert steps_at_kill and max(steps_at_kill) < TOTAL_STEPS, steps_at_kill
  assert not os.path.exists(os.path.join(run_dir, "results.json"))

  # 3) Restart in the same workdir: it must resume, not start over.
  out = subprocess.run(_cli(config_path, run_dir), cwd=REPO, env=e, check=True,
                       capture_output=True, text=True, timeout=600)
  assert "resumed from" in out.stdout, out.stdout[-2000:]
  print(f"killed with checkpoints {steps_at_kill}; restart said:",
        [l for l in out.stdout.splitlines() if "resumed" in l])

  _assert_same_final_state(ref_dir, run_dir)


def _tmp_saves(workdir):
  """Orbax's in-progress save directories (<step>.orbax-checkpoint-tmp-<time>)."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n) if os.path.isdir(d) \
      else []


def _metrics_text(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return ""
  with open(path, encoding="utf-8") as f:
    return f.read()


def _kill_when(proc, ready, deadline_s=600):
  """SIGKILLs `proc` as soon as `ready()` holds (polled every millisecond); returns whether the
  kill came before the process ended on its own."""
  deadline = time.time() + deadline_s
  try:
    while proc.poll() is None and not ready() and time.time() < deadline:
      time.sleep(0.001)
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
    proc.wait()
  return proc.returncode == -signal.SIGKILL


def _assert_every_checkpoint_intact(workdir):
  """Each step on disk restores, its arrays match the digest saved with them, and its saved
  step counter is the directory's step: no checkpoint restores to garbage."""
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  steps = ckpt.all_steps()
  for step in steps:
    state = ckpt.restore_saved_state(step)  # raises CheckpointDamaged on a digest mismatch
    assert ckpt.read_metadata(step)[checkpointing.STATE_DIGEST] == \
        checkpointing.state_digest(state)
    assert int(np.asarray(state["step"])) == step
  ckpt.close()
  return steps


def test_sigkill_at_random_points_and_during_async_saves_then_resume(env, reference):
  """Three SIGKILLs of one run: during an asynchronous checkpoint save (the moment Orbax's
  temporary save directory appears), and twice a random time (seeded) after training started.
  After each, every checkpoint left on disk is intact; the final restart ends bit-identical to
  the uninterrupted run."""
  root, config_path, e = env
  run_dir = str(root / "killed_at_random")
  rng = np.random.default_rng(14)
  events = []
  # A kill lands after Orbax finished the save in a rare race: then the save is retried (twice).
  for trigger in ("random", "during save", "during save", "during save", "random"):
    if trigger == "during save" and any(t == trigger and left for t, _, left in events):
      continue
    text_before = _metrics_text(run_dir)
    proc = subprocess.Popen(_cli(config_path, run_dir), cwd=REPO, env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    delay = rng.uniform(0.0, 1.5) if trigger == "random" else None
    started = []

    def ready():
      # Training has started once this process changed metrics.jsonl (dropping the rows of
      # the killed run past its checkpoint, or logging): it has removed the unfinished saves of
      # earlier kills by then, so a temporary save directory is one of its own saves.
      if not started and _metrics_text(run_dir) != text_before:
        started.append(time.time())
      if not started:
        return False
      if delay is None:
        return bool(_tmp_saves(run_dir))
      return time.time() - started[0] >= delay
    killed = _kill_when(proc, ready)
    assert killed, f"the run ended before the {trigger} kill"
    in_flight = _tmp_saves(run_dir)
    steps = _assert_every_checkpoint_intact(run_dir)
    assert max(steps, default=0) < TOTAL_STEPS
    events.append((trigger, steps, in_flight))
  print("kills (trigger, intact steps on disk, unfinished saves left):", events)
  assert any(t == "during save" and left for t, _, left in events), \
      "no 'during save' kill left an unfinished save behind"

  out = subprocess.run(_cli(config_path, run_dir), cwd=REPO, env=e, check=True,
                       capture_output=True, text=True, timeout=600)
  assert "resumed from" in out.stdout, out.stdout[-2000:]
  assert not _tmp_saves(run_dir)  # Orbax cleaned up the killed saves
  assert _finished_steps(run_dir) == [TOTAL_STEPS - CKPT_EVERY, TOTAL_STEPS]  # max_to_keep 2
  _assert_every_checkpoint_intact(run_dir)
  _assert_same_final_state(reference, run_dir)
