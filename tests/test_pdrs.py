"""FAAR's rank selection (freesine_jax/pdrs.py): the score against a hand computation, the shrink
on crafted scores, masked ranks silent in both directions, the optimizer wrapper keeping dropped
ranks at zero, and a run resumed mid-shrink equal to an uninterrupted one, bit for bit.

The model of the step tests is one AdaptedDense with a shared LoRA and MTLoRA's task LoRA (the
two kinds of pair FAAR trains), so it compiles in seconds; `faar` on the Swin is covered by its
trainable count (test_baselines) and configs.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import synthetic
from freesine_jax import checkpointing
from freesine_jax import errors
from freesine_jax import modeling
from freesine_jax import optimizer
from freesine_jax import pdrs
from freesine_jax import train
from freesine_jax.models import adapters
from freesine_jax.models import lora
from freesine_jax.tools import analyze
from freesine_jax.tools import count_params
from tests import test_train

RANK = 8
TASKS = ("semseg", "sal", "normals", "depth")
SPEC = pdrs.PdrsSpec(rho=0.8, margin=1, floor=2, shrink_every=3)


class LoraModel(nn.Module):
  """Frozen 3 -> 16 linear with a shared LoRA (shared stream) and a task LoRA per task, then a
  trained head per task: the parameter layout of a Swin layer under 'mtlora' / 'faar'."""
  outputs: tuple = (("semseg", test_train.NUM_CLASSES), ("sal", 1), ("normals", 3),
                    ("depth", 1))

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    t = len(self.outputs)
    layer = adapters.AdaptedDense(16, adapters.LoraSpec(RANK, dropout=0.0),
                                  lora.TaskLoraSpec(RANK, 4.0), t, name="fc")
    streams = jnp.broadcast_to(images, (t, *images.shape))
    shared, tasks = layer(images, (images, streams), None, deterministic=not train)
    return {name: nn.Dense(c, name=f"head_{name}")(nn.gelu(tasks[i] + shared))
            for i, (name, c) in enumerate(self.outputs)}


def build_lora_model(config):
  del config
  return LoraModel()


def faar_config(**pdrs_overrides):
  c = test_train.tiny_config()
  c.model.factory = "tests.test_pdrs:build_lora_model"
  c.train.pdrs.enabled = True
  c.train.pdrs.update({"rho": 0.8, "shrink_every_steps": 3, **pdrs_overrides})
  return c


# ----------------------------------------------------------------------------- pure functions


def test_rank_score_against_a_hand_computation():
  """s_i = ½(|Σ_c A[c,i] gA[c,i]| + |Σ_o B[i,o] gB[i,o]|), clipped at 100x the lower median,
  at a LoRA's magnitudes (A ~ U(±1/√C_in), B ~ 1e-3, gradients ~1e-4)."""
  rng = np.random.default_rng(0)
  c_in, c_out = 96, 384
  a = rng.uniform(-1, 1, (c_in, RANK)) / math.sqrt(c_in)
  b = 1e-3 * rng.standard_normal((RANK, c_out))
  g_a = 1e-4 * rng.standard_normal((c_in, RANK))
  g_b = 1e-4 * rng.standard_normal((RANK, c_out))
  g_b[5] *= 1e5  # one rank far above the others: clipped
  want = np.empty(RANK)
  for i in range(RANK):
    want[i] = 0.5 * (abs(sum(a[c, i] * g_a[c, i] for c in range(c_in)))
                     + abs(sum(b[i, o] * g_b[i, o] for o in range(c_out))))
  bound = sorted(want)[(RANK - 1) // 2] * 100.0 + 1e-12
  assert want[5] > bound  # the crafted rank is clipped, the others are not
  want = np.minimum(want, bound)
  got = pdrs.rank_scores(*(jnp.asarray(x, jnp.float32) for x in (a, g_a, b, g_b)), 100.0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
  # A set per task (leading axis) is scored on its own.
  stacked = pdrs.rank_scores(*(jnp.stack([jnp.asarray(x, jnp.float32), 2 * jnp.asarray(
      x, jnp.float32)]) for x in (a, g_a, b, g_b)), 100.0)
  np.testing.assert_allclose(np.asarray(stacked[0]), want, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(stacked[1]), 4 * want, rtol=1e-4)
  nan = pdrs.rank_scores(jnp.full((4, 2), jnp.nan), jnp.ones((4, 2)), jnp.ones((2, 3)),
                         jnp.ones((2, 3)), 100.0)
  assert np.all(np.isfinite(np.asarray(nan)))


def _set(score, cap=None, position=None):
  score = jnp.asarray(score, jnp.float32)
  r = score.shape[-1]
  position = jnp.broadcast_to(jnp.arange(r), score.shape) if position is None else position
  cap = jnp.full(score.shape[:-1], r) if cap is None else cap
  return pdrs.RankSet(score, jnp.asarray(position, jnp.int32), jnp.asarray(cap, jnp.int32))


def test_shrink_on_crafted_scores():
  # Sorted: 3.0 (slot 2), 1.0 (slot 4), 0.5 (slot 0), 0.1, 0.05, 0, 0, 0; total 4.65.
  # Shares 0.645, 0.860 >= 0.8: K = 2, kept max(2, min(8, 2 + 1)) = 3.
  rs = pdrs.shrink(_set([0.5, 0.1, 3.0, 0.05, 1.0, 0.0, 0.0, 0.0]), SPEC)
  assert int(rs.cap) == 3
  np.testing.assert_array_equal(np.asarray(rs.position), [2, 3, 0, 4, 1, 5, 6, 7])
  # The floor: one dominant rank gives K = 1, K + 1 = 2 = the floor; a floor of 4 keeps 4.
  one = _set([0.0, 9.0, 0.01, 0.0, 0.0, 0.0, 0.0, 0.0])
  assert int(pdrs.shrink(one, SPEC).cap) == 2
  assert int(pdrs.shrink(one, pdrs.PdrsSpec(rho=0.8, floor=4)).cap) == 4
  # Never above the current cap; a rank dropped before stays dropped whatever its score.
  dropped = _set([5.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], cap=3,
                 position=[7, 0, 1, 2, 3, 4, 5, 6])
  again = pdrs.shrink(dropped, pdrs.PdrsSpec(rho=1.0, margin=4))
  assert int(again.cap) == 3
  assert int(again.position[0]) >= 3
  # Zero scores (no gradient yet): the set is left as it is.
  idle = pdrs.shrink(_set(np.zeros(RANK)), SPEC)
  assert int(idle.cap) == RANK
  np.testing.assert_array_equal(np.asarray(idle.position), np.arange(RANK))
  # Per-task sets shrink independently.
  two = pdrs.shrink(_set([[0.5, 0.1, 3.0, 0.05, 1.0, 0, 0, 0], [1.0] * 8]), SPEC)
  np.testing.assert_array_equal(np.asarray(two.cap), [3, 8])


def test_nested_masks_are_prefixes_of_the_order_with_uniform_length():
  position = jnp.asarray([3, 0, 5, 1, 2, 4, 6, 7], jnp.int32)
  ranks = {"fc": {"lora_a": _set(np.zeros(RANK), cap=5, position=position)}}
  lengths = []
  for i in range(400):
    m = np.asarray(pdrs.nested_masks(ranks, jax.random.key(i), 0.0)[("fc", "lora_a")])
    b = int(m.sum())
    np.testing.assert_array_equal(m, (np.asarray(position) < b).astype(np.float32))
    lengths.append(b)
  counts = np.bincount(lengths, minlength=6)
  assert counts[0] == 0 and set(lengths) == {1, 2, 3, 4, 5}
  assert counts[1:].min() > 50  # ~80 each for U{1..5}
  explored = {int(np.asarray(pdrs.nested_masks(ranks, jax.random.key(i), 1.0)[
      ("fc", "lora_a")]).sum()) for i in range(200)}
  assert max(explored) > 5  # explore draws from all R ranks


def test_masked_ranks_give_zero_output_and_zero_gradient():
  model = LoraModel()
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  variables = model.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape),
                        variables["params"])  # B != 0, so every rank matters
  ranks = pdrs.init_ranks(params)
  keep = np.zeros(RANK, np.float32)
  keep[[1, 4, 6]] = 1.0
  masks = {p: jnp.broadcast_to(jnp.asarray(keep), m.shape)
           for p, m in pdrs.kept_masks(ranks).items()}
  out = lambda p: model.apply({**variables, "params": p}, x)
  # Output: as if the other ranks were not there (factors sliced to the kept ranks).
  sliced = jax.tree.map(lambda p: p, params)
  fc = sliced["fc"]
  idx = np.flatnonzero(keep)
  fc["lora_a"], fc["lora_b"] = fc["lora_a"][:, idx], fc["lora_b"][idx]
  fc["task_lora"]["a"] = fc["task_lora"]["a"][..., idx]
  fc["task_lora"]["b"] = fc["task_lora"]["b"][:, idx]
  got = out(pdrs.masked(params, masks))
  y0 = jnp.dot(x, variables["backbone"]["fc"]["kernel"]) + variables["backbone"]["fc"]["bias"]
  shared = y0 + 4.0 * (x @ fc["lora_a"]) @ fc["lora_b"]
  for i, (name, _) in enumerate(LoraModel.outputs):
    task = y0 + 4.0 * (x @ fc["task_lora"]["a"][i]) @ fc["task_lora"]["b"][i]
    head = params[f"head_{name}"]
    want = nn.gelu(task + shared) @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want), rtol=2e-5, atol=2e-6)
  # Gradient: zero on the masked ranks' A columns and B rows, non-zero on the kept ones.
  loss = lambda p: sum(jnp.sum(v ** 2) for v in out(pdrs.masked(p, masks)).values())
  g = jax.grad(loss)(params)["fc"]
  off = np.flatnonzero(keep == 0)
  for a, b in ((g["lora_a"], g["lora_b"]), (g["task_lora"]["a"], g["task_lora"]["b"])):
    assert np.all(np.asarray(a)[..., off] == 0) and np.all(np.asarray(b)[..., off, :] == 0)
    assert np.all(np.abs(np.asarray(a)[..., idx]).sum(axis=-2) > 0)


def test_optimizer_shrinks_on_schedule_and_holds_dropped_ranks_at_zero():
  rng = np.random.default_rng(0)
  params = {"fc": {"lora_a": jnp.asarray(rng.standard_normal((6, RANK)), jnp.float32),
                   "lora_b": jnp.asarray(rng.standard_normal((RANK, 5)), jnp.float32),
                   "task_lora": {"a": jnp.asarray(rng.standard_normal((3, 6, RANK)),
                                                  jnp.float32),
                                 "b": jnp.asarray(rng.standard_normal((3, RANK, 5)),
                                                  jnp.float32)}},
            "head": jnp.ones((5,))}
  # Gradients concentrated on ranks 0 and 3 of every set: those two are kept.
  weight = np.full(RANK, 1e-4, np.float32)
  weight[[0, 3]] = 1.0
  grads = {"fc": {"lora_a": params["fc"]["lora_a"] * weight,
                  "lora_b": params["fc"]["lora_b"] * weight[:, None],
                  "task_lora": {"a": params["fc"]["task_lora"]["a"] * weight,
                                "b": params["fc"]["task_lora"]["b"] * weight[:, None]}},
           "head": jnp.ones((5,))}
  tx = pdrs.transformation(pdrs.PdrsSpec(rho=0.9, margin=0, floor=2, shrink_every=3),
                           optax.adamw(1e-2, weight_decay=0.1))
  state = tx.init(params)
  caps = []
  for step in range(1, 10):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    sets = pdrs.kept_ranks(state.ranks)
    caps.append(sets["fc/lora_a"])
    if step < 3:
      assert sets["fc/lora_a"] == RANK and sets["fc/task_lora/a"] == [RANK] * 3
  assert caps[2:] == [2] * 7  # shrunk at step 3 to the two ranks, then kept
  assert pdrs.kept_ranks(state.ranks)["fc/task_lora/a"] == [2, 2, 2]
  fc = params["fc"]
  dropped = np.setdiff1d(np.arange(RANK), [0, 3])
  # Dropped exactly to zero, and held there through AdamW's momentum and weight decay.
  for a, b in ((fc["lora_a"], fc["lora_b"]), (fc["task_lora"]["a"], fc["task_lora"]["b"])):
    assert np.all(np.asarray(a)[..., dropped] == 0) and np.all(np.asarray(b)[..., dropped, :] == 0)
    assert np.all(np.asarray(a)[..., [0, 3]] != 0)
  # The best ranks come first in the order.
  position = np.asarray(state.ranks["fc"]["lora_a"].position)
  assert sorted(position[[0, 3]]) == [0, 1]
  assert pdrs.trained_count(params, state.ranks) == ((6 + 5) * RANK * 4, (6 + 5) * 2 * 4)


def test_optimizer_without_pdrs_keeps_its_state_layout():
  """Runs without PDRS keep the optimizer state they had (their checkpoints stay readable)."""
  c = test_train.tiny_config()
  params = {"w": jnp.ones((2, 2))}
  state = optimizer.make_optimizer(c, lambda s: 1e-3).init(params)
  assert pdrs.find_state(state) is None
  assert jax.tree.structure(state) == jax.tree.structure(optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(lambda s: 1e-3, mask=optimizer.weight_decay_mask)).init(params))
  assert pdrs.spec_from_config(c, 10) is None
  assert pdrs.spec_from_config(faar_config(shrink_every_steps=0), 10).shrink_every == 10
  with pytest.raises(errors.UserError, match="shrink_every_steps"):
    pdrs.spec_from_config(faar_config(shrink_every_steps=0), None)


# ----------------------------------------------------------------------------- the train step


def _steps(config, state, setup, batches):
  for batch in batches:
    state, metrics = setup.train_step(state, batch, setup.backbone)
  return state, metrics


def test_train_step_resumed_mid_shrink_equals_uninterrupted(tmp_path):
  config = faar_config()
  model = build_lora_model(config)
  variables = modeling.init_variables(model, config)
  schedule = optimizer.make_schedule(1e-2, 1e-3, 1e-4, 2, 20)
  it = iter(test_train.FakeTrainIterator(0, config.input.batch_size, 8))
  batches = [next(it) for _ in range(8)]

  setup = train.build_train_step(config, model, variables, schedule)
  state, metrics = _steps(config, setup.state, setup, batches)
  assert int(pdrs.find_state(state.opt_state).count) == 8
  caps = pdrs.kept_ranks(pdrs.find_state(state.opt_state).ranks)
  assert caps["fc/lora_a"] < RANK  # shrunk at steps 3 and 6

  # Interrupted after step 4 (one shrink done, the next not), checkpointed, restored onto a
  # freshly built state, continued.
  first = train.build_train_step(config, model, variables, schedule)
  half, _ = _steps(config, first.state, first, batches[:4])
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_directory(str(tmp_path)),
                                    async_save=False)
  ckpt.save(4, half, data_iter_state={"index": 4}, metadata={"config": config.to_json()})
  ckpt.wait_until_finished()
  # What the offline tools read back from it: the count with the kept ranks, per pair.
  saved_config, saved, step = checkpointing.load_saved_run(str(tmp_path))
  ranks = pdrs.find_state(half.opt_state).ranks
  built, kept = pdrs.trained_count(half.params, ranks)
  assert kept < built
  lines = count_params.report(saved_config, saved, step).splitlines()
  total = modeling.count_parameters(half.params)
  assert lines[-2:] == [f"trainable_params_kept={total - built + kept}",
                        f"trainable_params={total}"]
  assert analyze.rank_selection(saved["params"], saved["opt_state"]) == {
      "kept_ranks": pdrs.kept_ranks(ranks), "lora_params_built": built,
      "lora_params_kept": kept}
  second = train.build_train_step(config, model, variables, schedule)
  restored, _, _ = ckpt.restore(4, second.state)
  ckpt.close()
  resumed, _ = _steps(config, restored, second, batches[4:])
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(resumed),
                               jax.tree_util.tree_leaves_with_path(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))


def test_faar_config_arg():
  c = synthetic.get_config("tiny,faar")
  assert c.train.pdrs.enabled and c.model.task_path == "task_lora"
  assert c.model.task_lora.rank == c.model.lora.rank
  assert "reduction" in c.model.lora.modules
