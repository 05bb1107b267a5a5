"""Optimizer, schedule, train step, evaluation and the loop, on a tiny model and fake data.

`build_tiny_model` is also the config.model.factory of the tests that run the command lines on
a model that compiles in seconds (TINY_FACTORY).
"""
import json
import math
import os
import re
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import synthetic
from freesine_jax import errors
from freesine_jax import evaluate
from freesine_jax import metrics as metrics_lib
from freesine_jax import modeling
from freesine_jax import nonfinite
from freesine_jax import optimizer
from freesine_jax import sharding as sharding_lib
from freesine_jax import tasks as tasks_lib
from freesine_jax import train

TASKS = ("semseg", "sal", "normals", "depth")
NUM_CLASSES = 3
TINY_FACTORY = "tests.test_train:build_tiny_model"


class TinyModel(nn.Module):
  """Follows the model contract: frozen 'backbone' stem, trainable 'params', BN stats, dropout,
  computation in `dtype` (config.model.dtype) with float32 parameters.

  The simplest honest fixture for loop mechanics: it compiles in seconds, unlike the Swin model.
  Without BatchNorm and dropout (batch_norm=False, dropout=0) nothing depends on which rows
  share a batch, which gradient accumulation's exactness needs.
  """
  outputs: tuple = (("semseg", NUM_CLASSES), ("sal", 1), ("normals", 3), ("depth", 1))
  batch_norm: bool = True
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    stem = self.variable("backbone", "stem", lambda: 0.5 * jax.random.normal(
        self.make_rng("params"), (3, 3, 3, 8)))
    images = images.astype(self.dtype)
    x = jax.lax.conv_general_dilated(images, stem.value.astype(self.dtype), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jnp.concatenate([x, images], axis=-1)
    # Without BN the conv keeps its bias (a bias before BN has ~0 gradient).
    x = nn.Conv(16, (3, 3), use_bias=not self.batch_norm, dtype=self.dtype)(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
    x = nn.relu(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return {t: nn.Conv(c, (1, 1), dtype=self.dtype, name=f"head_{t}")(x)
            for t, c in self.outputs}


def build_tiny_model(config) -> TinyModel:
  """config.model.factory target ('tests.test_train:build_tiny_model')."""
  return TinyModel(tuple((t, tasks_lib.output_channels(
      t, config.num_classes[t] if t in config.num_classes else None)) for t in config.tasks),
                   dtype=jnp.dtype(config.model.dtype))


def make_example(rng: np.random.Generator, size: int) -> dict:
  """Labels are simple functions of the image, so a small conv net can learn them."""
  image = rng.uniform(-1, 1, size=(size, size, 3)).astype(np.float32)
  semseg = np.argmax(image, axis=-1).astype(np.int32)
  semseg[:2, :2] = 255
  sal = (image[..., 0] > 0.2).astype(np.int32)
  normals = image / np.linalg.norm(image, axis=-1, keepdims=True)
  normals[-1] = 0.0  # an invalid row
  depth = (1.5 + image[..., 1]).astype(np.float32)
  return {"image": image, "semseg": semseg, "sal": sal, "normals": normals.astype(np.float32),
          "depth": depth}


def _stack(examples):
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class FakeTrainIterator:
  """Infinite deterministic iterator with grain-style get_state/set_state."""

  def __init__(self, seed, batch_size, size):
    self.seed, self.batch_size, self.size, self.index = seed, batch_size, size, 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    return _stack([make_example(rng, self.size) for _ in range(self.batch_size)])

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


class FakeTrainLoader:
  num_examples = 32

  def __init__(self, config):
    self.config = config

  def __iter__(self):
    return FakeTrainIterator(self.config.seed, self.config.input.batch_size,
                             self.config.dataset.image_size[0])


def eval_batches(config, num_examples=6, pad_garbage=False):
  """Eval batches of eval_batch_size with a 'valid' mask; the last batch is padded."""
  rng = np.random.default_rng(1234)
  examples = [make_example(rng, config.dataset.image_size[0]) for _ in range(num_examples)]
  bs = config.input.eval_batch_size
  batches = []
  for start in range(0, num_examples, bs):
    chunk = examples[start:start + bs]
    valid = [True] * len(chunk)
    while len(chunk) < bs:
      pad = make_example(rng, config.dataset.image_size[0])
      if not pad_garbage:
        pad = {k: np.zeros_like(v) for k, v in pad.items()}
      chunk.append(pad)
      valid.append(False)
    batch = _stack(chunk)
    batch["valid"] = np.asarray(valid)
    batches.append(batch)
  return batches


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
  """configs/synthetic.py:tiny with the tiny model, 8x8 fake data and a fast recipe."""
  c = synthetic.get_config("tiny")
  c.tasks = TASKS
  c.num_classes.semseg = NUM_CLASSES
  c.loss_weights.update({"semseg": 1.0, "sal": 1.0, "normals": 1.0, "depth": 1.0})
  c.dataset.image_size = (8, 8)
  c.input.batch_size = 4
  c.input.eval_batch_size = 4
  c.model.factory = TINY_FACTORY
  c.optim.scale_lr_with_batch = False
  c.optim.lr_base = 2e-2
  c.optim.warmup_lr_base = 2e-3
  c.optim.min_lr_base = 1e-3
  c.train.num_epochs = 8
  c.train.warmup_epochs = 1
  c.train.log_every_steps = 4
  c.train.image_every_steps = 0
  c.train.checkpoint_every_steps = 16
  c.train.update(train_overrides)
  return c


def _setup(config, model=None):
  """(model, variables, state, backbone, step_fn, mesh): state and backbone on the mesh."""
  model = model or TinyModel()
  variables = modeling.init_variables(model, config)
  schedule = optimizer.make_schedule(1e-2, 1e-3, 1e-4, 2, 20)
  setup = train.build_train_step(config, model, variables, schedule)
  return model, variables, setup.state, setup.backbone, setup.train_step, setup.mesh


# ------------------------------------------------------------------------------------------


def test_schedule_closed_form():
  peak, warm, low, w, total = 1e-3, 1e-5, 1e-4, 10, 110
  s = optimizer.make_schedule(peak, warm, low, w, total)
  np.testing.assert_allclose(s(0), warm, rtol=1e-6)
  np.testing.assert_allclose(s(5), warm + 0.5 * (peak - warm), rtol=1e-6)
  np.testing.assert_allclose(s(10), peak, rtol=1e-6)
  np.testing.assert_allclose(s(60), low + 0.5 * (peak - low), rtol=1e-5)  # half-way: cos=0
  np.testing.assert_allclose(s(110), low, rtol=1e-6)
  np.testing.assert_allclose(s(500), low, rtol=1e-6)


def test_learning_rates_scale_with_batch():
  c = tiny_config()
  c.optim.scale_lr_with_batch = True
  c.optim.lr_base, c.optim.warmup_lr_base, c.optim.min_lr_base = 5e-4, 5e-7, 5e-6
  peak, warm, low = optimizer.scaled_learning_rates(c, 32)
  np.testing.assert_allclose((peak, warm, low), (3.125e-5, 3.125e-8, 3.125e-7))


def test_weight_decay_only_on_ndim_ge_2():
  params = {"kernel": jnp.ones((2, 3)), "conv": jnp.ones((1, 1, 2, 2)), "bias": jnp.ones((3,)),
            "scale": jnp.ones(()), "norm": {"scale": jnp.ones((4,))}}
  mask = optimizer.weight_decay_mask(params)
  assert mask == {"kernel": True, "conv": True, "bias": False, "scale": False,
                  "norm": {"scale": False}}
  # Behaviour: with zero gradients AdamW only decays the masked leaves, by lr*wd*p.
  c = tiny_config()
  c.optim.weight_decay = 0.5
  tx = optimizer.make_optimizer(c, lambda step: 0.1)
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["kernel"], 1.0 - 0.1 * 0.5)
  np.testing.assert_allclose(new["conv"], 1.0 - 0.1 * 0.5)
  for leaf in (new["bias"], new["scale"], new["norm"]["scale"]):
    np.testing.assert_array_equal(leaf, 1.0)


def test_gradient_clipping_at_global_norm():
  """make_optimizer clips the global gradient norm at optim.grad_clip before AdamW.

  With a large eps Adam's first step, -lr * g / (|g| + eps) (bias-corrected moments are g and
  g**2), depends on the gradient's scale, so the clipping is visible in the update.
  """
  lr, eps, clip = 0.1, 1.0, 5.0
  c = tiny_config()
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = clip
  c.optim.eps = eps
  tx = optimizer.make_optimizer(c, lambda step: lr)
  params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((3,))}
  direction = {"w": np.array([[3.0, -1.0], [0.5, 2.0]]), "b": np.array([-4.0, 1.5, 0.25])}
  norm = math.sqrt(sum(float(np.sum(v ** 2)) for v in direction.values()))

  def scaled(target_norm):
    return {k: v * (target_norm / norm) for k, v in direction.items()}

  def first_update(transform, g):
    updates, _ = transform.update(jax.tree_util.tree_map(jnp.asarray, g),
                                  transform.init(params), params)
    return {k: np.asarray(v) for k, v in updates.items()}

  def hand_adam(g):  # Adam's first step on the gradient that reaches it
    return {k: -lr * v / (np.abs(v) + eps) for k, v in g.items()}

  big, huge, small = scaled(20.0), scaled(2000.0), scaled(2.0)
  clipped = {k: v * (clip / 20.0) for k, v in big.items()}  # g * 5 / ||g||
  np.testing.assert_allclose(
      math.sqrt(sum(float(np.sum(v ** 2)) for v in clipped.values())), clip, rtol=1e-12)
  reference = optax.chain(optax.clip_by_global_norm(clip),
                          optax.adamw(lr, b1=c.optim.b1, b2=c.optim.b2, eps=eps,
                                      weight_decay=0.0))
  for g, seen_by_adam in ((big, clipped), (huge, clipped), (small, small)):
    got = first_update(tx, g)
    want = hand_adam(seen_by_adam)
    ref = first_update(reference, g)
    for k in params:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-8, err_msg=k)
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-9, err_msg=k)
  # Above the threshold the update no longer depends on the gradient's scale...
  for k in params:
    np.testing.assert_allclose(first_update(tx, big)[k], first_update(tx, huge)[k], rtol=1e-6)
  # ...while without clipping (grad_clip <= 0 disables it) it does.
  c.optim.grad_clip = 0.0
  unclipped = first_update(optimizer.make_optimizer(c, lambda step: lr), big)
  want = hand_adam(big)
  for k in params:
    np.testing.assert_allclose(unclipped[k], want[k], rtol=1e-5, atol=1e-8, err_msg=k)
    assert not np.allclose(unclipped[k], first_update(tx, big)[k], rtol=1e-3)


@pytest.mark.accelerator
def test_train_step_leaves_backbone_unchanged_and_updates_params():
  config = tiny_config()
  model, variables, state, backbone, step_fn, mesh = _setup(config)
  # Host copies taken before anything runs (np.array copies; nothing can alias them).
  copy = lambda tree: jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)
  backbone_before = copy(variables["backbone"])
  params_before, stats_before = copy(state.params), copy(state.batch_stats)
  rng_before = np.array(jax.random.key_data(state.rng) if jnp.issubdtype(
      state.rng.dtype, jax.dtypes.prng_key) else state.rng, copy=True)
  stem_shape = np.shape(backbone_before["stem"])
  assert len(jax.tree_util.tree_leaves(backbone_before)) == 1

  batch = sharding_lib.shard_batch(next(iter(FakeTrainLoader(config))), mesh)
  new_state, m = step_fn(state, batch, backbone)
  new_state, m = jax.block_until_ready((new_state, m))

  # The backbone passed in is neither donated nor modified: bitwise equal to the copy taken
  # before the step, and still usable for another step (which again leaves it unchanged).
  def assert_backbone_intact():
    leaves = jax.tree_util.tree_leaves(backbone)
    assert not any(leaf.is_deleted() for leaf in leaves)
    assert (jax.tree_util.tree_structure(backbone)
            == jax.tree_util.tree_structure(backbone_before))
    for got, want in zip(leaves, jax.tree_util.tree_leaves(backbone_before), strict=True):
      np.testing.assert_array_equal(np.asarray(jax.device_get(got)), want)
    np.testing.assert_array_equal(np.asarray(variables["backbone"]["stem"]),
                                  backbone_before["stem"])

  assert_backbone_intact()
  second, _ = step_fn(new_state, batch, backbone)
  jax.block_until_ready(second)
  assert_backbone_intact()
  assert int(second.step) == 2

  # The state holds no backbone leaves: nothing at a 'stem'/'backbone' path or of the stem's
  # shape, in params, optimizer state or BN statistics.
  for tree in (new_state, second):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      p = jax.tree_util.keystr(path)
      assert "stem" not in p and "backbone" not in p, p
      assert np.shape(leaf) != stem_shape, p
  # The gradients are taken w.r.t. params only: Adam's moments have exactly the params' tree,
  # and the reported gradient norm (over the whole gradient tree) is the norm of the params'
  # gradients, recovered from the first moment mu = (1 - b1) * clipped grads.
  mu = optax.tree_utils.tree_get(new_state.opt_state, "mu")
  nu = optax.tree_utils.tree_get(new_state.opt_state, "nu")
  params_def = jax.tree_util.tree_structure(new_state.params)
  assert jax.tree_util.tree_structure(mu) == params_def
  assert jax.tree_util.tree_structure(nu) == params_def
  grad_norm = float(m["grad_norm"])
  mu_norm = float(optax.tree.norm(mu)) / (1.0 - config.optim.b1)
  np.testing.assert_allclose(mu_norm, min(grad_norm, config.optim.grad_clip), rtol=1e-4)

  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(params_before), jax.tree_util.tree_leaves(new_state.params),
      strict=True)]
  assert changed and all(changed)
  assert int(new_state.step) == 1
  # BN running stats moved (train=True mutates them); rng advanced.
  assert not np.array_equal(jax.tree_util.tree_leaves(stats_before)[0],
                            jax.tree_util.tree_leaves(new_state.batch_stats)[0])
  new_rng = (jax.random.key_data(new_state.rng) if jnp.issubdtype(
      new_state.rng.dtype, jax.dtypes.prng_key) else new_state.rng)
  assert not np.array_equal(rng_before, np.asarray(new_rng))
  np.testing.assert_allclose(m["lr"], 1e-3, rtol=1e-6)  # schedule(0) = warmup lr
  total = sum(float(m[f"loss/{t}"]) for t in TASKS)  # all weights are 1
  np.testing.assert_allclose(float(m["loss"]), total, rtol=1e-5)


def test_tiny_training_loss_decreases():
  config = tiny_config()
  model, variables, state, backbone, step_fn, mesh = _setup(config)
  it = iter(FakeTrainLoader(config))
  losses = []
  for _ in range(40):
    state, m = step_fn(state, sharding_lib.shard_batch(next(it), mesh), backbone)
    losses.append(float(m["loss"]))
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < 0.7 * first, (first, last)


def test_evaluate_ignores_padding_rows_and_matches_meters():
  config = tiny_config()
  model = TinyModel()
  variables = modeling.init_variables(model, config)
  forward, mesh = evaluate.make_eval_forward(model), sharding_lib.make_mesh(config)
  clean = eval_batches(config, num_examples=6, pad_garbage=False)
  garbage = eval_batches(config, num_examples=6, pad_garbage=True)
  res_clean, delta = evaluate.evaluate(forward, variables, clean, config, mesh)
  res_garbage, _ = evaluate.evaluate(forward, variables, garbage, config, mesh)
  assert delta is None
  assert json.dumps(res_clean, sort_keys=True) == json.dumps(res_garbage, sort_keys=True)
  # Independent computation: one un-padded batch of the 6 real examples, plain model.apply.
  real = _stack([{k: b[k][i] for k in b if k != "valid"} for b in clean
                 for i in range(len(b["valid"])) if b["valid"][i]])
  out = model.apply(variables, jnp.asarray(real["image"]), train=False)
  for t in TASKS:
    meter = metrics_lib.make_meter(t, NUM_CLASSES if t == "semseg" else None)
    meter.update(metrics_lib.postprocess(t, out[t]), real[t])
    expected = meter.result()
    assert res_clean[t]["num_images" if "num_images" in expected else "num_pixels"] == \
        expected["num_images" if "num_images" in expected else "num_pixels"]
    for k, v in expected.items():
      if isinstance(v, float):
        np.testing.assert_allclose(res_clean[t][k], v, rtol=1e-5, err_msg=f"{t}/{k}")


def test_evaluate_delta_m_against_reference():
  config = tiny_config()
  model = TinyModel(outputs=(("semseg", NUM_CLASSES),))
  config.tasks = ("semseg",)
  variables = modeling.init_variables(model, config)
  forward, mesh = evaluate.make_eval_forward(model), sharding_lib.make_mesh(config)
  res, _ = evaluate.evaluate(forward, variables, eval_batches(config), config, mesh)
  config.eval.reference = {"semseg": {"mIoU": res["semseg"]["mIoU"] / 2}}
  _, delta = evaluate.evaluate(forward, variables, eval_batches(config), config, mesh)
  np.testing.assert_allclose(delta, 100.0, rtol=1e-6)


def test_beats_untrained_respects_metric_direction():
  final = {"semseg": {"mIoU": 30.0}, "normals": {"mean": 20.0}, "depth": {"rmse": 2.0}}
  untrained = {"semseg": {"mIoU": 10.0}, "normals": {"mean": 40.0}, "depth": {"rmse": 1.0}}
  assert evaluate.beats_untrained(final, untrained) == {
      "semseg": True, "normals": True, "depth": False}


def test_eta_leaves_the_compiled_first_step_out():
  # A 60 s compile in the first step, then 0.5 s steps: after 1 + 20 steps of 300 the ETA is
  # 279 steps at 2 steps/s, not at the 21 steps / 70 s that include the compile.
  assert train.estimated_seconds_left(279, 20, 10.0, 21 / 70.0) == pytest.approx(139.5)
  # Only the compiled step so far: the window's rate is all there is.
  assert train.estimated_seconds_left(299, 0, 0.0, 1 / 60.0) == pytest.approx(299 * 60.0)
  assert train.estimated_seconds_left(5, 0, 0.0, 0.0) == math.inf


def test_train_and_evaluate_writes_outputs(tmp_path):
  """End to end with injected model/data (resume is covered by test_checkpoint_resume.py)."""
  config = tiny_config(max_steps=24, checkpoint_every_steps=8, eval_every_steps=12)
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir, create_train_loader=FakeTrainLoader,
                                     create_eval_loader=lambda c: eval_batches(c))
  assert results["step"] == 24
  # The run learns: every task beats the untrained (step-0) model on this easy data.
  assert results["beats_untrained"] == {t: True for t in TASKS}
  assert results["all_beat_untrained"] is True
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["final"]["semseg"]["mIoU"] == results["final"]["semseg"]["mIoU"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  train_lines = [l for l in lines if "train/loss" in l]
  assert [l["step"] for l in train_lines] == [4, 8, 12, 16, 20, 24]
  assert all(f"train/loss/{t}" in l for l in train_lines for t in TASKS)
  assert any("eval/semseg/mIoU" in l and l["step"] == 12 for l in lines)
  assert any("untrained/semseg/mIoU" in l and l["step"] == 0 for l in lines)
  assert os.listdir(os.path.join(workdir, "tb"))
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert steps == [8, 16, 24]


@pytest.mark.accelerator
@pytest.mark.default_codegen  # the rounding bound below is the default code's (at -O0 the
# sums run as one sequential chain: loss/depth came out 9 ulps apart, 1.06e-6 relative)
def test_gradient_accumulation_2_x_b_equals_one_step_of_2b():
  """One step on a batch of 8 in 2 micro-batches of 4 = one step on the whole batch: same loss,
  per-task losses, gradient norm and updated parameters. The model has no batch statistics and
  no dropout (the documented condition); the labels make the micro-batches differ in their
  valid-pixel counts and saliency balance, which the whole-batch normalisation absorbs."""
  results = {}
  for accum in (1, 2):
    config = tiny_config()
    config.input.batch_size = 8
    config.train.grad_accum_steps = accum
    model = TinyModel(batch_norm=False, dropout=0.0)
    _, _, state, backbone, step_fn, mesh = _setup(config, model)
    batch = next(iter(FakeTrainLoader(config)))
    batch["semseg"][:3, :4] = 255  # micro-batch k holds rows k, k + 2, ...: 2 rows vs 1
    batch["sal"][::2] = 1 - batch["sal"][::2]
    new_state, m = step_fn(state, sharding_lib.shard_batch(batch, mesh), backbone)
    results[accum] = (jax.device_get(m), jax.device_get(new_state.params))
  (m1, p1), (m2, p2) = results[1], results[2]
  # float32 sums regrouped into two halves: rounding ~1e-7 relative; Adam's first update
  # lr * g / (|g| + eps) keeps that relative size.
  for key in ["loss", "grad_norm"] + [f"loss/{t}" for t in TASKS]:
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-6, err_msg=key)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1),
                          jax.tree_util.tree_leaves(p2), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.accelerator
def test_bfloat16_compute_trains_with_float32_state():
  """config.model.dtype='bfloat16': the loss decreases, parameters, optimizer state and
  BatchNorm statistics stay float32, and the first loss differs from float32's by bfloat16
  rounding (so the computation really ran in bfloat16)."""
  first_losses = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config()
    config.model.dtype = dtype
    _, _, state, backbone, step_fn, mesh = _setup(config, build_tiny_model(config))
    it = iter(FakeTrainLoader(config))
    losses = []
    for _ in range(40 if dtype == "bfloat16" else 1):
      state, m = step_fn(state, sharding_lib.shard_batch(next(it), mesh), backbone)
      losses.append(float(m["loss"]))
    first_losses[dtype] = losses[0]
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      (state.params, state.opt_state, state.batch_stats)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, jax.tree_util.keystr(path)
  difference = abs(first_losses["bfloat16"] - first_losses["float32"])
  # bfloat16 keeps 8 significant bits: ~0.4% per rounding, averaged over many pixels.
  assert 0 < difference < 0.02 * first_losses["float32"], first_losses


def test_window_speed_leaves_the_compiled_step_out():
  # 5 steps in the window, the first one compiled: 4 timed steps in 2 s -> 2 steps/s.
  pending = [{"loss": float(i)} for i in range(5)]
  summary = train.window_summary(pending, 2.0, global_batch=8, timed_steps=4)
  assert summary["loss"] == pytest.approx(2.0)  # the loss still averages all five
  assert summary["steps_per_sec"] == pytest.approx(2.0)
  assert summary["examples_per_sec"] == pytest.approx(16.0)
  assert summary["step_time_sec"] == pytest.approx(0.5)
  assert train.window_summary(pending, 2.0, global_batch=8)["steps_per_sec"] == pytest.approx(2.5)


def test_console_says_when_it_compiles(tmp_path, capsys):
  """One line before the train step's compile and one after it with its time; one for the
  eval step's first batch; all before the first progress line."""
  config = tiny_config(max_steps=4)
  train.train_and_evaluate(config, str(tmp_path / "run"), create_train_loader=FakeTrainLoader,
                           create_eval_loader=lambda c: eval_batches(c))
  lines = capsys.readouterr().out.splitlines()

  def index(prefix):
    found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(found) == 1, (prefix, lines)
    return found[0]

  first_progress = min(i for i, line in enumerate(lines) if line.startswith("step "))
  eval_compiled = index("eval step compiled and run on its first batch in ")
  compiling = index("compiling the train step")
  compiled = index("train step compiled and run once in ")
  assert eval_compiled < compiling < compiled < first_progress
  assert re.search(r"in \d+ s \(left out of the steps/s and the ETA\)$", lines[compiled])


def test_dropout_rng_reproducible_per_impl_and_checkpoint_key_unchanged():
  """config.train.dropout_rng: two runs with the same seed and impl are bitwise equal after 3
  steps (dropout on); the impls draw different masks (different parameters); the state's key is
  the threefry key whatever the impl (checkpoints keep their format); an unknown name is one
  UserError naming the key and the choices."""
  loader = iter(FakeTrainLoader(tiny_config()))
  batches = [next(loader) for _ in range(3)]

  def three_steps(impl):
    config = tiny_config(dropout_rng=impl)
    _, _, state, backbone, step_fn, mesh = _setup(config)
    assert state.rng.dtype == jnp.uint32 and state.rng.shape == (2,)
    for batch in batches:
      state, _ = step_fn(state, sharding_lib.shard_batch(batch, mesh), backbone)
    return jax.tree_util.tree_map(np.asarray, jax.device_get(state.params))

  leaves = lambda tree: jax.tree_util.tree_leaves(tree)
  runs = {impl: three_steps(impl) for impl in ("threefry", "rbg", "unsafe_rbg")}
  for impl in ("rbg", "unsafe_rbg"):
    for a, b in zip(leaves(runs[impl]), leaves(three_steps(impl)), strict=True):
      np.testing.assert_array_equal(a, b)
  for a, b in (("threefry", "rbg"), ("threefry", "unsafe_rbg"), ("rbg", "unsafe_rbg")):
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(runs[a]), leaves(runs[b]))), (
        a, b)
  with pytest.raises(errors.UserError, match=r"config.train.dropout_rng='rgb'.*'rbg'"):
    _setup(tiny_config(dropout_rng="rgb"))


APPLIES = []  # CountingTinyModel's training applies, as traced


class CountingTinyModel(TinyModel):
  """TinyModel that records each training-mode `apply` (one per trace of its modules)."""

  def apply(self, *args, **kwargs):
    if kwargs.get("train"):
      APPLIES.append(args[1].shape)
    return super().apply(*args, **kwargs)


def test_a_step_traces_the_modules_once_and_its_forward_is_the_modules():
  """Building the step and running it trace the model's modules once (train.traced_forward:
  the task leaves and the gradient read one trace), and evaluating that trace gives the
  modules' own outputs bitwise; at another batch size the forward traces the modules anew."""
  config = tiny_config()
  APPLIES.clear()
  _, _, state, backbone, step_fn, mesh = _setup(config, CountingTinyModel())
  batch = sharding_lib.shard_batch(next(iter(FakeTrainLoader(config))), mesh)
  step_fn(state, batch, backbone)
  rows = config.input.batch_size
  assert APPLIES == [(rows, *config.dataset.image_size, 3)]

  traced = train.traced_forward(CountingTinyModel(), config, mesh, state, backbone)
  direct = train._training_forward(CountingTinyModel(), mesh)  # pylint: disable=protected-access
  k_path = jax.random.fold_in(state.rng, 7)
  closed, outputs = jax.make_jaxpr(lambda *a: direct(*a)[0], return_shape=True)(
      state.params, state.batch_stats, backbone, batch["image"], state.rng, k_path)
  assert traced.task_leaves == nonfinite.task_parameter_leaves(
      closed, outputs, len(jax.tree_util.tree_leaves(state.params)))
  assert all(len(leaves) == 2 for leaves in traced.task_leaves.values())  # each head's own
  for images in (batch["image"], batch["image"][:2]):
    args = (state.params, state.batch_stats, backbone, images, state.rng, k_path)
    APPLIES.clear()
    got = jax.jit(traced.forward)(*args)
    assert APPLIES == ([] if len(images) == rows else [images.shape])
    want = jax.jit(direct)(*args)
    chex.assert_trees_all_equal(got, want)
