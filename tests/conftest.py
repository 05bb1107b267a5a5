"""What the whole test session shares, so each expensive thing happens once.

* One persistent XLA compilation cache for the run (a fresh directory), shared by the pytest-xdist
  workers (scripts/test.sh runs two) and handed to the processes the tests start (command lines,
  the notebook's kernel): a program compiled once — the tiny models' train and eval steps — is
  not compiled again. Every program is cached, however fast it compiled (the tests compile
  hundreds of small ones).
* XLA's LLVM back end at optimisation level 0 (XLA_FLAGS, set before the backend starts and
  inherited by the processes the tests start): the suite compiles hundreds of programs and runs
  each a step or two, so compiling is its time. Measured on the tiny Free Sinewich model (2
  cores): its jitted gradient compiles in 24 s instead of 44 s, init in 9 s instead of 13 s;
  compiled programs run ~2x slower. XLA's HLO passes are unchanged, but the machine code is not
  the same: the random initialisation and every sum can round differently. A test marked
  `default_codegen` compares bits or a rounding-sized tolerance with what the default level
  gives (a saved run, an error bound measured there); it runs in a child pytest at the default
  level (`pytest_pyfunc_call` below). FREESINE_TEST_XLA_CODEGEN=default runs everything there
  (benchmarks/device_check.sh does, for the accelerator).
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
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Callable

from etils.epath import testing as epath_testing
import jax
import pytest

import freesine_jax  # its XLA:CPU option, before any test starts the backend

CODEGEN_ENV = "FREESINE_TEST_XLA_CODEGEN"  # "default": XLA's own optimisation level
FAST_CODEGEN_FLAG = "--xla_backend_optimization_level=0"
FAST_CODEGEN = os.environ.get(CODEGEN_ENV) != "default"
if FAST_CODEGEN:
  freesine_jax.add_xla_flag(FAST_CODEGEN_FLAG)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FACTORY = "tests.test_train:build_tiny_model"
FREE_SINEWICH_STEPS = 6


CACHE_ENV = "FREESINE_TEST_XLA_CACHE"  # set by the process that made the run's cache
SHARED_ROOT_ENV = "FREESINE_TEST_SHARED_ROOT"  # a child pytest reuses its parent's shared_dir


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


# The files that take longest (worker-seconds in a full run, 2026-12-07), started first: the two
# workers take files in collection order (scripts/test.sh passes --no-loadscope-reorder, else
# pytest-xdist orders them by their number of tests), so a long file is not left to run alone
# at the end. Files not listed follow in their usual order.
SLOW_FILES_FIRST = (
    "test_export.py", "test_lowering.py", "test_pretrain.py", "test_saved_run.py", "test_model.py",
    "test_baselines.py", "test_new_tasks.py", "test_readme.py", "test_distributed.py",
    "test_sine_regime.py", "test_notebook.py", "test_checkpoint_resume.py", "test_cli_errors.py",
    "test_tspd.py", "test_dora.py", "test_convert_swin.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def default_codegen_env(config) -> dict[str, str]:
  """This process's environment for a child at XLA's default optimisation level, sharing the
  run's compilation cache and session directories."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  env = dict(os.environ, XLA_FLAGS=" ".join(f for f in flags if f != FAST_CODEGEN_FLAG))
  env[CODEGEN_ENV] = "default"
  env.pop("PYTEST_XDIST_WORKER", None)
  env[SHARED_ROOT_ENV] = str(shared_root(config._tmp_path_factory))  # pylint: disable=protected-access
  return env


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """A `default_codegen` test, here at optimisation level 0, runs as a child pytest at the
  default level; its result is the child's."""
  if not FAST_CODEGEN or pyfuncitem.get_closest_marker("default_codegen") is None:
    return None
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
       pyfuncitem.nodeid], cwd=pyfuncitem.config.rootpath,
      env=default_codegen_env(pyfuncitem.config), capture_output=True, text=True, timeout=1200)
  if proc.returncode != 0:
    pytest.fail(f"at XLA's default optimisation level (child pytest, exit {proc.returncode}):\n"
                f"{proc.stdout[-6000:]}{proc.stderr[-2000:]}", pytrace=False)
  return True


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


def shared_root(tmp_path_factory):
  """Where the run's shared directories live: the base directory common to the xdist workers,
  or the parent pytest's (SHARED_ROOT_ENV) in a child."""
  if SHARED_ROOT_ENV in os.environ:
    return pathlib.Path(os.environ[SHARED_ROOT_ENV])
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def shared_dir(tmp_path_factory, name: str, make: Callable[[str], None]) -> str:
  """The directory `name`, filled once per run by `make(path)`: under pytest-xdist the first
  worker to ask makes it while the other waits for it (a lock file), instead of each worker
  making its own."""
  root = shared_root(tmp_path_factory)
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
