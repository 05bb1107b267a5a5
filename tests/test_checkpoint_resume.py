"""SIGKILL mid-run, restart: the final state equals an uninterrupted run's, bit for bit.

Runs the real CLI (python -m freesine_jax.main) on the tiny synthetic dataset and the real grain
pipeline (so the data-iterator state is restored too), with the small conv model of
test_train.py (config.model.factory) so that each process compiles in seconds. The three
processes share a persistent XLA compilation cache.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  config_path = root / "tiny_resume_config.py"
  config_path.write_text(CONFIG)
  e = dict(os.environ)
  e.update(FREESINE_DATA_DIR=str(root / "data"),
           JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
           JAX_PLATFORMS="cpu",
           PYTHONPATH=REPO + os.pathsep + e.get("PYTHONPATH", ""))
  return root, str(config_path), e


def _cli(config_path, workdir):
  return [sys.executable, "-m", "freesine_jax.main", f"--config={config_path}",
          f"--workdir={workdir}"]


def _finished_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _final_state(workdir):
  """The raw arrays of the last checkpoint's 'state' item (no target needed)."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "data_iter", "metadata"))
  step = mngr.latest_step()
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data_iter=ocp.args.JsonRestore()))
  mngr.close()
  return step, restored["state"], restored["data_iter"]


def test_sigkill_then_resume_matches_uninterrupted_run(env):
  root, config_path, e = env
  # 1) Uninterrupted reference run (also builds the dataset and fills the compile cache).
  ref_dir = str(root / "reference")
  subprocess.run(_cli(config_path, ref_dir), cwd=REPO, env=e, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
  assert os.path.exists(os.path.join(ref_dir, "results.json"))

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

  ref_step, ref_state, ref_iter = _final_state(ref_dir)
  got_step, got_state, got_iter = _final_state(run_dir)
  assert ref_step == got_step == TOTAL_STEPS
  assert ref_iter == got_iter
  ref_leaves = jax.tree_util.tree_leaves_with_path(ref_state)
  got_leaves = jax.tree_util.tree_leaves_with_path(got_state)
  assert [p for p, _ in ref_leaves] == [p for p, _ in got_leaves]
  assert any("params" in jax.tree_util.keystr(p) for p, _ in ref_leaves)
  for (path, a), (_, b) in zip(ref_leaves, got_leaves):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a),
                                  err_msg=jax.tree_util.keystr(path))
