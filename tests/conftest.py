"""What the whole test session shares, so each expensive thing happens once.

* One persistent XLA compilation cache for the run (a fresh directory), shared by the pytest-xdist
  workers (scripts/test.sh runs two) and handed to the processes the tests start (command lines,
  the notebook's kernel): a program compiled once — the tiny models' train and eval steps — is
  not compiled again. Every program is cached, however fast it compiled (the tests compile
  hundreds of small ones).
* One synthetic data directory (the tiny dataset renders once).
* Under xdist, the session fixtures below are made by whichever worker asks first and reused by
  the other (`shared_dir`), not made once per worker.
* Two trained runs: `tiny_run`, the README's command that trains the small conv model of
  test_train.py on the tiny synthetic set (what the command-line tests evaluate), and
  `free_sinewich_run`, the real model on the same data (what tools.analyze and the notebook
  read).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable

from etils.epath import testing as epath_testing
import jax
import pytest

import freesine_jax  # noqa: F401  (its XLA:CPU option, before any test starts the backend)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FACTORY = "tests.test_train:build_tiny_model"
FREE_SINEWICH_STEPS = 6


CACHE_ENV = "FREESINE_TEST_XLA_CACHE"  # set by the process that made the run's cache


def pytest_configure(config):
  cache = os.environ.get(CACHE_ENV)
  if not cache:  # the controller (or a run without xdist); workers inherit its environment
    cache = tempfile.mkdtemp(prefix="freesine_jax_xla_cache_")
    config.freesine_xla_cache = cache
    os.environ[CACHE_ENV] = cache
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_unconfigure(config):
  cache = getattr(config, "freesine_xla_cache", None)
  if cache:
    shutil.rmtree(cache, ignore_errors=True)
    os.environ.pop(CACHE_ENV, None)


@contextlib.contextmanager
def fake_bucket(root):
  """gs://bucket/... read and written through etils.epath as files under `root` (no network);
  os.path and open() given a gs:// URL find nothing (the working directory has no 'gs:')."""
  def local(path):
    path = os.fspath(path)
    return os.path.join(root, path[len("gs://"):]) if path.startswith("gs://") else path

  def mapped(original, path, *args, **kwargs):
    args = [local(a) if isinstance(a, (str, os.PathLike)) else a for a in args]
    return original(local(path), *args, **kwargs)

  names = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove",
           "rename", "replace", "rmtree", "stat", "walk")
  with epath_testing.mock_epath(**{name: mapped for name in names}):
    yield


def shared_dir(tmp_path_factory, name: str, make: Callable[[str], None]) -> str:
  """The directory `name`, filled once per run by `make(path)`: under pytest-xdist the first
  worker to ask makes it while the other waits for it (a lock file), instead of each worker
  making its own."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the run's base directory, common to the workers
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir()
      make(str(path))
      done.touch()
  return str(path)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the tiny synthetic dataset."""
  from freesine_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return shared_dir(tmp_path_factory, "tfds",
                    lambda data_dir: synthetic.ensure_built(data_dir, config="tiny"))


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


def final_state(workdir: str):
  """(step, saved state) of the workdir's latest checkpoint, read on this process's device and
  checked against the digest saved with it."""
  from freesine_jax import checkpointing  # pylint: disable=g-import-not-at-top
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_directory(workdir),
                                    async_save=False)
  step = ckpt.latest_step()
  state = ckpt.restore_saved_state(step)
  ckpt.close()
  return step, state


def assert_same_state(got, want) -> None:
  """Two saved states hold the same arrays (paths and values, bit for bit), params among them."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  want_leaves = jax.tree_util.tree_leaves_with_path(want)
  assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
  assert any("params" in jax.tree_util.keystr(p) for p, _ in want_leaves)
  for (path, a), (_, b) in zip(got_leaves, want_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cli_env) -> str:
  """The workdir of `python -m freesine_jax.main --config=configs/synthetic.py:tiny
  --workdir=... --config.model.factory=tests.test_train:build_tiny_model` (6 steps)."""

  def make(root):
    proc = run_cli(["-m", "freesine_jax.main", "--config=configs/synthetic.py:tiny",
                    f"--workdir={root}/run", f"--config.model.factory={TINY_FACTORY}"], cli_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
  return os.path.join(shared_dir(tmp_path_factory, "tiny_run", make), "run")


def free_sinewich_config(data_dir: str):
  """configs/synthetic.py:tiny as free_sinewich_run trains it."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config("tiny")
  config.dataset.data_dir = data_dir
  config.train.max_steps = FREE_SINEWICH_STEPS
  config.train.untrained_baseline = False
  config.eval.max_batches = 1
  return config


@pytest.fixture(scope="session")
def free_sinewich_run(tmp_path_factory, synthetic_data_dir):
  """(config, workdir) of Free Sinewich (configs/synthetic.py:tiny) trained in-process for
  FREE_SINEWICH_STEPS steps, checkpoints every 3."""
  from freesine_jax import train  # pylint: disable=g-import-not-at-top
  config = free_sinewich_config(synthetic_data_dir)
  root = shared_dir(tmp_path_factory, "free_sinewich",
                    lambda root: train.train_and_evaluate(config, os.path.join(root, "run")))
  return config, os.path.join(root, "run")
