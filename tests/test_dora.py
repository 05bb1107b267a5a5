"""FAAR's DoRA form of the LoRA update (models/dora.py, model.lora.form = 'dora'): the weight
against FAAR's formula written out in PyTorch's (out, in) layout, the frozen model's output at
initialisation, the magnitude regulariser in closed form, merged inference, and the counts."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from configs import synthetic
from freesine_jax import modeling
from freesine_jax import models
from freesine_jax.models import adapters
from freesine_jax.models import dora
from freesine_jax.models import lora as lora_lib
from tests import test_baselines

C_IN, C_OUT, RANK, SCALE = 96, 384, 16, 4.0


def faar_reference(w_torch, a_torch, b_torch, theta, scale):
  """FAAR's lora8.py MTLoRALinear, float64: W (out, in), A (r, in), B (out, r), theta = the
  stored log magnitude (init log ||W row||); returns W_dora - W (out, in)."""
  base_norm = np.linalg.norm(w_torch, axis=1)
  v0 = w_torch / np.maximum(base_norm, 1e-6)[:, None]
  v = v0 + scale * (b_torch @ a_torch)
  v_hat = v / np.maximum(np.linalg.norm(v, axis=1), 1e-6)[:, None]
  m = base_norm * np.exp(0.1 * (theta - np.log(base_norm)))
  return m[:, None] * v_hat - w_torch


def swin_magnitudes(rng):
  """W0 as Swin's trunc-normal(0.02) linear, A kaiming-uniform, B and log m as after training."""
  w0 = np.clip(0.02 * rng.standard_normal((C_IN, C_OUT)), -0.04, 0.04)
  a = rng.uniform(-1, 1, (C_IN, RANK)) / math.sqrt(C_IN)
  b = 2e-3 * rng.standard_normal((RANK, C_OUT))
  log_m = 0.05 * rng.standard_normal(C_OUT)
  return w0, a, b, log_m


def test_weight_delta_is_faars_formula():
  rng = np.random.default_rng(0)
  w0, a, b, log_m = swin_magnitudes(rng)
  theta = np.log(np.linalg.norm(w0, axis=0)) + log_m  # FAAR's stored parameter
  want = faar_reference(w0.T, a.T, b.T, theta, SCALE).T
  got = dora.weight_delta(*(jnp.asarray(x, jnp.float32) for x in (w0, a, b)), SCALE,
                          jnp.asarray(log_m, jnp.float32))
  # The update is ~5 % of W0 here; float32 error ~1e-7 of W0.
  assert np.abs(want).max() > 1e-2 * np.abs(w0).max()
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6 * np.abs(w0).max())
  # Per task (a leading axis on A, B, log m): each task its own weight.
  stacked = dora.weight_delta(jnp.asarray(w0, jnp.float32),
                              jnp.stack([jnp.asarray(a, jnp.float32)] * 2),
                              jnp.stack([jnp.asarray(b, jnp.float32), jnp.zeros((RANK, C_OUT))]),
                              SCALE, jnp.zeros((2, C_OUT)))
  np.testing.assert_allclose(np.asarray(stacked[0]), faar_reference(
      w0.T, a.T, b.T, np.log(np.linalg.norm(w0, axis=0)), SCALE).T,
                             atol=1e-6 * np.abs(w0).max())


def test_untrained_dora_leaves_the_frozen_layer_unchanged():
  """B = 0 and log m = 0: m V^ = ||W0|| colnorm(colnorm(W0)) = W0 up to float rounding."""
  rng = np.random.default_rng(1)
  w0, a, _, _ = swin_magnitudes(rng)
  delta = dora.weight_delta(jnp.asarray(w0, jnp.float32), jnp.asarray(a, jnp.float32),
                            jnp.zeros((RANK, C_OUT)), SCALE, jnp.zeros(C_OUT))
  assert float(jnp.abs(delta).max()) <= 1e-6 * np.abs(w0).max()
  layer = adapters.AdaptedDense(C_OUT, adapters.LoraSpec(RANK, SCALE, 0.0, form="dora"),
                                lora_lib.TaskLoraSpec(RANK, SCALE, "dora"), 3)
  x = jnp.asarray(rng.standard_normal((2, 7, 7, C_IN)), jnp.float32)
  streams = jnp.stack([x, 2 * x, -x])
  variables = layer.init(jax.random.key(0), x, (x, streams))
  assert variables["params"]["lora_log_m"].shape == (C_OUT,)
  assert variables["params"]["task_lora"]["log_m"].shape == (3, C_OUT)
  shared, tasks = layer.apply(variables, x, (x, streams))
  kernel, bias = variables["backbone"]["kernel"], variables["backbone"]["bias"]
  frozen = jnp.dot(x, kernel) + bias
  scale = float(jnp.abs(frozen).max())
  np.testing.assert_allclose(np.asarray(shared), np.asarray(frozen), atol=1e-6 * scale)
  for t in range(3):  # the task outputs read the shared frozen output plus their own update
    np.testing.assert_allclose(np.asarray(tasks[t]), np.asarray(frozen), atol=1e-6 * scale)


def test_trained_dora_layer_adds_x_times_the_weight_delta():
  rng = np.random.default_rng(2)
  w0, a, b, log_m = swin_magnitudes(rng)
  layer = adapters.AdaptedDense(C_OUT, adapters.LoraSpec(RANK, SCALE, 0.0, form="dora"))
  x = jnp.asarray(rng.standard_normal((2, 5, 5, C_IN)), jnp.float32)
  variables = layer.init(jax.random.key(0), x)
  variables = {"backbone": {"kernel": jnp.asarray(w0, jnp.float32),
                            "bias": variables["backbone"]["bias"]},
               "params": {"lora_a": jnp.asarray(a, jnp.float32),
                          "lora_b": jnp.asarray(b, jnp.float32),
                          "lora_log_m": jnp.asarray(log_m, jnp.float32)}}
  got, _ = layer.apply(variables, x)
  theta = np.log(np.linalg.norm(w0, axis=0)) + log_m
  want = np.asarray(x, np.float64) @ (w0 + faar_reference(w0.T, a.T, b.T, theta, SCALE).T)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_magnitude_penalty_closed_form():
  v1, v2 = np.array([0.3, -0.2, 0.0]), np.array([1.0, 2.0])
  params = {"a": {"lora_log_m": jnp.asarray(v1)}, "b": {"fc": {"lora_log_m": jnp.asarray(v2)}},
            "c": {"task_lora": {"log_m": jnp.ones((2, 3))}}}  # task magnitudes: not penalised
  want = 1e-4 * (np.mean((np.exp(0.1 * v1) - 1) ** 2) + np.mean((np.exp(0.1 * v2) - 1) ** 2))
  np.testing.assert_allclose(float(dora.magnitude_penalty(params, 1e-4)), want, rtol=1e-6)
  assert float(dora.magnitude_penalty({"x": jnp.ones(2)}, 1e-4)) == 0.0


def test_faar_merged_inference_is_the_same_model():
  config = synthetic.get_config("tiny,faar")
  config.tasks = ("semseg", "sal")
  model = modeling.build_model(config)
  variables = modeling.init_variables(model, config)
  # As after training: every LoRA factor and magnitude moved away from its initial value.
  leaves = jax.tree_util.tree_leaves_with_path(variables["params"])
  keys = jax.random.split(jax.random.key(3), len(leaves))
  moved = {jax.tree_util.keystr(p): x + 0.05 * jax.random.normal(k, x.shape)
           for (p, x), k in zip(leaves, keys)}
  params = jax.tree_util.tree_map_with_path(lambda p, x: moved[jax.tree_util.keystr(p)],
                                            variables["params"])
  variables = {**variables, "params": params}
  images = jax.random.normal(jax.random.key(4), (2, *config.dataset.image_size, 3))
  forward = jax.jit(lambda v: model.apply(v, images))
  want = forward(variables)
  merged = jax.jit(lambda v: models.merge_for_inference(model, v, images.shape))(variables)
  got = forward(merged)
  for task in config.tasks:
    scale = float(jnp.abs(want[task]).max())
    np.testing.assert_allclose(np.asarray(got[task]), np.asarray(want[task]),
                               atol=2e-5 * scale)


def test_faar_counts_the_dora_magnitudes():
  """faar = mtlora_plus with rank-r task LoRAs, plus one magnitude per output unit of every
  shared-LoRA layer (qkv 3C, proj C, fc1 4C, fc2 C per block; the reductions' 2C) and, per task,
  of each task-LoRA layer (proj C, fc1 4C, fc2 C), plus the TS-PD heads."""
  r = 16
  magnitudes = (sum(9 * c for c in test_baselines.BLOCK_DIMS)
                + sum(2 * c for c in test_baselines.MERGE_DIMS)
                + test_baselines.T * sum(o for _, o in test_baselines.task_path_layers()))
  assert magnitudes == 75_648
  got = test_baselines.trainable(f"faar,r{r}")[0]
  tspd_heads = test_baselines.T * 4_880  # its TS-PD heads (tests/test_tspd.py)
  assert got == test_baselines.trainable(f"mtlora_plus,r{r}")[0] + test_baselines.T * sum(
      (r - 4) * (i + o) for i, o in test_baselines.task_path_layers()) + magnitudes + tspd_heads
