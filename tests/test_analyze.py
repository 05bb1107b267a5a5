"""tools.analyze on a short real training run, checked against an independent numpy recomputation.

The run is the real Free Sinewich model on the tiny synthetic dataset (6 tasks, r = 4), trained
for a few steps in-process (conftest.free_sinewich_run, shared with the README and notebook
tests); the CLI then reads its checkpoint and metrics.jsonl in a subprocess.
"""
import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from PIL import Image

from freesine_jax.models import adapters

from conftest import FREE_SINEWICH_STEPS as STEPS
from conftest import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory, free_sinewich_run):
  config, workdir = free_sinewich_run  # tests/conftest.py: STEPS steps, checkpoints every 3
  out = str(tmp_path_factory.mktemp("analyze") / "analysis")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "freesine_jax.tools.analyze", f"--workdir={workdir}",
                         f"--out={out}"], capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "analysis.json"), encoding="utf-8") as f:
    result = json.load(f)
  return config, workdir, out, result, proc.stdout


def saved_params(workdir):
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                              item_names=("state", "data_iter", "metadata"))
  state = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  mgr.close()
  return traverse_util.flatten_dict(state["params"], sep="/")


def numpy_kernels(a, w, b, omegas, sine, modulation):
  """K_t from the formula in docs/method.md, in float64 numpy, matrix low-pass by a 2-D loop."""
  m = np.einsum("il,uvlj,jo->uvio", a, w, b)
  rho = np.sqrt(np.mean(m ** 2, axis=(2, 3), keepdims=True) + 1e-30)  # per tap
  x = np.arange(sine.lowpass_size) - (sine.lowpass_size - 1) / 2
  g = np.exp(-0.5 * (x / sine.lowpass_sigma) ** 2)
  g2 = np.outer(g, g) / np.outer(g, g).sum()
  half = sine.lowpass_size // 2
  out = []
  for om in omegas:
    arg = sine.omega_0 * om * m / rho
    k = rho / sine.omega_0 * (np.sin(arg) if modulation == "sine" else arg)
    kp = np.pad(k, ((0, 0), (0, 0), (half, half), (half, half)))
    windows = np.lib.stride_tricks.sliding_window_view(kp, g2.shape, axis=(2, 3))
    out.append(np.einsum("uvijab,ab->uvij", windows, g2))  # 2-D (non-separable) 'same' blur
  return np.stack(out)


def test_json_schema_and_plots(run):
  config, _, out, result, stdout = run
  tasks = list(config.tasks)
  assert result["step"] == STEPS
  assert list(result["frequencies"]) == tasks
  assert all(isinstance(v, float) for v in result["frequencies"].values())
  kinds = [layer["kind"] for layer in result["layers"]]
  assert kinds.count("encoder") == 4 * 3 and kinds.count("decoder") == 1  # 4 stages x proj/fc1/fc2
  for layer in result["layers"]:
    assert isinstance(layer["name"], str) and layer["name"]
    assert isinstance(layer["nonlinearity"], float)
    assert isinstance(layer["rank_base"], int)
    assert set(layer["rank_task"]) == set(tasks)
    assert all(isinstance(r, int) for r in layer["rank_task"].values())
    assert isinstance(layer["task_correlation"], float)
    assert isinstance(layer["task_correlation_linear"], float)
  for name in ("spectra.png", "correlations.png", "frequencies.png"):
    with Image.open(os.path.join(out, name)) as image:
      image.load()
      assert image.size[0] > 200 and image.size[1] > 150
  assert "median encoder layer" in stdout


def test_values_match_an_independent_recomputation(run):
  config, workdir, _, result, _ = run
  tasks = list(config.tasks)
  p = saved_params(workdir)
  # Frequencies: the Clock Net formula on the saved tokens.
  tokens = np.asarray(p["task_tokens"], np.float64)
  q = np.maximum(tokens, 0) @ np.asarray(p["clock/w_q/kernel"], np.float64)[:, 0] + \
      float(p["clock/w_q/bias"][0])
  phi = np.arctanh(config.model.clock_spread * np.linspace(-1, 1, len(tasks)))
  omegas = float(p["clock/s"]) * (np.tanh(q + phi) + float(p["clock/c"]))
  np.testing.assert_allclose([result["frequencies"][t] for t in tasks], omegas, rtol=1e-5)
  # ... equal to what the training log wrote at the checkpoint's step.
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line) for line in f if '"train/frequency/' in line]
  assert logged[-1]["step"] == STEPS
  np.testing.assert_allclose([logged[-1][f"train/frequency/{t}"] for t in tasks], omegas,
                             rtol=1e-5)

  # One encoder layer, recomputed from the formula (stage 2's fc1).
  layer = next(e for e in result["layers"] if e["name"] == "backbone/layers_1_blocks_1/mlp/fc1")
  prefix = "backbone/layers_1_blocks_1/mlp/fc1/"
  a, b = (np.asarray(p[prefix + n], np.float64) for n in ("lora_a", "lora_b"))
  w = np.asarray(p[prefix + "sine_awb/w"], np.float64)
  sine = adapters.SineSpec(omega_0=config.model.sine_awb.omega_0)
  kernels = numpy_kernels(a, w, b, omegas, sine, "sine")
  linear = numpy_kernels(a, w, b, omegas, sine, "linear")
  ratios = [np.linalg.norm(k - l) / np.linalg.norm(l) for k, l in zip(kernels, linear)]
  np.testing.assert_allclose(layer["nonlinearity"], np.median(ratios), rtol=1e-3)
  rank = lambda m: int(np.sum((s := np.linalg.svd(m, compute_uv=False)) >= 1e-3 * s[0]))
  m = np.einsum("il,uvlj,jo->uvio", a, w, b)
  assert layer["rank_base"] == rank(m[1, 1])
  assert layer["rank_task"] == {t: rank(k[1, 1]) for t, k in zip(tasks, kernels)}
  corr = np.corrcoef(kernels.reshape(len(tasks), -1))
  np.fill_diagonal(corr, 0)
  np.testing.assert_allclose(layer["task_correlation"], np.abs(corr).max(), atol=1e-4)


def test_a_few_steps_already_put_the_sine_in_its_regime(run):
  """B is ~lr x steps here (tiny), yet the kernels are non-linear, of raised rank, decorrelated."""
  _, _, _, result, _ = run
  encoder = result["summary"]["encoder"]
  assert encoder["nonlinearity"] >= 0.1
  assert encoder["rank_gain_layers"] == encoder["layers"]
  assert encoder["task_correlation"] <= 0.95
  assert encoder["task_correlation_linear"] > 1 - 1e-5
  for layer in result["layers"]:
    if layer["kind"] == "encoder":
      assert layer["base_rms"] < 0.05  # the magnitude the literal sine would leave linear


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "freesine_jax.tools.analyze",
                         f"--workdir={tmp_path / 'nothing'}"], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "no checkpoints" in lines[0], proc.stderr


def test_cli_refuses_a_model_without_sine_awb_in_one_line(tiny_run, cli_env):
  proc = run_cli(["-m", "freesine_jax.tools.analyze", f"--workdir={tiny_run}"], cli_env)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "config.model.factory" in lines[0], proc.stderr
