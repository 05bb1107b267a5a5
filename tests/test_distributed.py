"""Several processes, preemption and the launchers.

* When a process joins a job (distributed.initialize_args), from flags and the environment.
* SIGTERM during training: a checkpoint, exit code 0, and the restart ends bit-for-bit where an
  uninterrupted run ends.
* A 2-process job started by launch/local_multiprocess.sh on 127.0.0.1 (one CPU device per
  process) trains, saves, is restarted, restores and finishes where one process with the same
  two devices does.
The command lines run the small conv model of test_train.py (config.model.factory) on the tiny
synthetic dataset, so each process compiles in seconds.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TINY_FACTORY, assert_same_state, final_state
from freesine_jax import distributed
from freesine_jax import errors

LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")


def test_when_a_process_joins_a_job():
  args = lambda environ=None, **flags: distributed.initialize_args(
      **{"coordinator_address": None, "num_processes": None, "process_id": None,
         "multihost": False, **flags}, environ=environ or {})
  assert args() is None
  assert args(environ={"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}) is None
  assert args(environ={"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "n[1-2]"}) == {}
  assert args(environ={"TPU_WORKER_HOSTNAMES": "w0,w1"}) == {}
  assert args(environ={"TPU_WORKER_HOSTNAMES": "w0"}) is None
  assert args(multihost=True) == {}
  assert args(coordinator_address="127.0.0.1:1", num_processes=2, process_id=1) == {
      "coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 1}
  with pytest.raises(errors.UserError, match="^--coordinator_address without --num_processes "
                     "and --process_id: a process joins a job with all three"):
    args(coordinator_address="127.0.0.1:1")
  with pytest.raises(errors.UserError, match=r"^--process_id=2 is not in 0..1"):
    args(coordinator_address="h:1", num_processes=2, process_id=2)
  with pytest.raises(errors.UserError, match="pass one or the other"):
    args(coordinator_address="h:1", num_processes=2, process_id=0, multihost=True)


def train_args(workdir, *overrides):
  """`python -m freesine_jax.main` arguments: the tiny synthetic config (10 eval examples,
  evaluated whole) and the conv model."""
  return ["--config=configs/synthetic.py:tiny", f"--workdir={workdir}",
          f"--config.model.factory={TINY_FACTORY}", "--config.train.untrained_baseline=False",
          "--config.train.image_every_steps=0", *overrides]


def flat_numbers(tree, prefix=""):
  """{'a/b/0': number} of a nested JSON value."""
  if isinstance(tree, (dict, list)):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    return {k: v for key, sub in items for k, v in flat_numbers(sub, f"{prefix}/{key}").items()}
  return {prefix: tree}


def logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["step"] for line in f if '"train/loss"' in line]


SIGTERM_STEPS = 30  # 24 examples / batch 8: 3 steps per epoch


def test_sigterm_saves_exits_0_and_resumes_to_the_uninterrupted_run(tmp_path, cli_env):
  """Checkpoints every 100 steps, so the one the interrupted run leaves is SIGTERM's."""
  args = lambda workdir: [sys.executable, "-m", "freesine_jax.main", *train_args(
      workdir, "--config.train.num_epochs=10", "--config.train.log_every_steps=1",
      "--config.train.checkpoint_every_steps=100")]
  reference = str(tmp_path / "reference")
  subprocess.run(args(reference), cwd=REPO, env=cli_env, check=True, capture_output=True,
                 timeout=600)

  interrupted = str(tmp_path / "interrupted")
  proc = subprocess.Popen(args(interrupted), cwd=REPO, env=cli_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not logged_steps(interrupted) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  step, _ = final_state(interrupted)
  assert 1 <= step < SIGTERM_STEPS, step
  assert f"stopped at step {step} (SIGTERM): checkpoint saved" in out, out[-2000:]
  assert not os.path.exists(os.path.join(interrupted, "results.json"))

  restarted = subprocess.run(args(interrupted), cwd=REPO, env=cli_env, capture_output=True,
                             text=True, timeout=600)
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert f"resumed from {os.path.join(interrupted, 'checkpoints')} step {step}" in \
      restarted.stdout, restarted.stdout[-2000:]
  ref_step, ref_state = final_state(reference)
  got_step, got_state = final_state(interrupted)
  assert ref_step == got_step == SIGTERM_STEPS
  assert_same_state(got_state, ref_state)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_127_0_0_1_match_one_process(tmp_path, cli_env):
  """2 processes x 1 CPU device through the launcher, parameters and Adam moments FSDP-sharded
  across them: 2 steps, then a restart to step 4 that restores the collective checkpoint; one
  process holding both devices runs 4 steps straight. Same program on the same mesh, so the
  same numbers."""
  env = dict(cli_env, PYTHON=sys.executable)
  # An fsdp axis across the two hosts: each process stores half of every kernel and saves it.
  fsdp = ["--config.mesh.fsdp=2", "--config.mesh.min_shard_size=1"]
  job = str(tmp_path / "two_processes")
  for max_steps in (2, 4):
    proc = subprocess.run(
        [LAUNCHER, "--num_processes=2", f"--port={free_port()}", "--cpu_devices=1",
         *train_args(job, f"--config.train.max_steps={max_steps}", *fsdp)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[0] tasks" in proc.stdout
    assert "2 device(s), 2 process(es), mesh data=1 x fsdp=2" in proc.stdout
    assert "[1] tasks" not in proc.stdout  # only process 0 prints and writes logs
    if max_steps == 4:
      assert f"[0] resumed from {os.path.join(job, 'checkpoints')} step 2" in proc.stdout

  single = str(tmp_path / "one_process")
  # The job's XLA flags (tests/conftest.py's among them) and two devices: the same machine code.
  env_single = dict(cli_env, XLA_FLAGS=f"{cli_env.get('XLA_FLAGS', '')} "
                    "--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-m", "freesine_jax.main",
                         *train_args(single, "--config.train.max_steps=4", *fsdp)],
                        cwd=REPO, env=env_single, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 device(s), 1 process(es), mesh data=1 x fsdp=2" in proc.stdout

  job_step, job_state = final_state(job)
  single_step, single_state = final_state(single)
  assert job_step == single_step == 4
  assert_same_state(job_state, single_state)
  with open(os.path.join(job, "results.json"), encoding="utf-8") as f:
    job_results = json.load(f)
  with open(os.path.join(single, "results.json"), encoding="utf-8") as f:
    single_results = json.load(f)
  # The whole eval split either way (each host its half): the same metrics, up to the order
  # of float sums.
  job_final, single_final = flat_numbers(job_results["final"]), flat_numbers(
      single_results["final"])
  assert job_final.keys() == single_final.keys()
  for key, want in single_final.items():
    np.testing.assert_allclose(job_final[key], want, rtol=1e-6, err_msg=key)
