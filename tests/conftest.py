"""What the whole test session shares, so each expensive thing happens once.

* One persistent XLA compilation cache for the session (a fresh directory), also handed to the
  processes the tests start (command lines, the notebook's kernel): a program compiled once —
  the tiny models' train and eval steps — is not compiled again.
* One synthetic data directory (the tiny dataset renders once).
* Two trained runs: `tiny_run`, the README's command that trains the small conv model of
  test_train.py on the tiny synthetic set (what the command-line tests evaluate), and
  `free_sinewich_run`, the real model on the same data (what tools.analyze and the notebook
  read).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FACTORY = "tests.test_train:build_tiny_model"
FREE_SINEWICH_STEPS = 6


def pytest_configure(config):
  cache = tempfile.mkdtemp(prefix="freesine_jax_xla_cache_")
  config.freesine_xla_cache = cache
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  jax.config.update("jax_compilation_cache_dir", cache)


def pytest_unconfigure(config):
  shutil.rmtree(getattr(config, "freesine_xla_cache", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the tiny synthetic dataset."""
  from freesine_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  synthetic.ensure_built(data_dir, config="tiny")
  return data_dir


@pytest.fixture(scope="session")
def cli_env(synthetic_data_dir) -> dict[str, str]:
  """Environment of the command lines the tests run: this checkout, CPU, the shared data."""
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              FREESINE_DATA_DIR=synthetic_data_dir)


def run_cli(args, env, timeout=600, **kwargs) -> subprocess.CompletedProcess:
  """`python <args>` from the repository root, output captured as text."""
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout, **kwargs)


def run_clis_in_pairs(commands, env, timeout=300) -> dict:
  """{name: (exit code, stderr)} of `python <args>` for every name -> args in `commands`, run
  two at a time from the repository root (the machine has two cores)."""
  results, todo = {}, list(commands.items())
  while todo:
    batch, todo = todo[:2], todo[2:]
    procs = {name: subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in batch}
    for name, proc in procs.items():
      _, err = proc.communicate(timeout=timeout)
      results[name] = (proc.returncode, err)
  return results


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cli_env) -> str:
  """The workdir of `python -m freesine_jax.main --config=configs/synthetic.py:tiny
  --workdir=... --config.model.factory=tests.test_train:build_tiny_model` (6 steps)."""
  workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
  proc = run_cli(["-m", "freesine_jax.main", "--config=configs/synthetic.py:tiny",
                  f"--workdir={workdir}", f"--config.model.factory={TINY_FACTORY}"], cli_env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="session")
def free_sinewich_run(tmp_path_factory, synthetic_data_dir):
  """(config, workdir) of Free Sinewich (configs/synthetic.py:tiny) trained in-process for
  FREE_SINEWICH_STEPS steps, checkpoints every 3."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from freesine_jax import train  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config("tiny")
  config.dataset.data_dir = synthetic_data_dir
  config.train.max_steps = FREE_SINEWICH_STEPS
  config.train.untrained_baseline = False
  config.eval.max_batches = 1
  workdir = str(tmp_path_factory.mktemp("free_sinewich") / "run")
  train.train_and_evaluate(config, workdir)
  return config, workdir
