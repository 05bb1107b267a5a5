"""A non-finite loss or gradient stops training with one line naming the step and task(s), and
every checkpoint left on disk is from before it; config.train.on_nonfinite='skip' skips the step
instead, leaving parameters, optimizer and BatchNorm state as they were (issue 14).

The poison is an Inf depth label in one batch (depth's L1 over target > 0 then is Inf, every
other task stays finite), or a NaN image (every task), on the tiny model and fake data of
test_train.py.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from freesine_jax import errors
from freesine_jax import nonfinite
from freesine_jax import train
from test_train import FakeTrainIterator, _setup, eval_batches, tiny_config

BAD_STEP = 7  # the 7th step (1-based, as the loop counts) gets the poisoned batch


def _poison(batch: dict, what: str) -> dict:
  batch = dict(batch)
  if what == "depth":
    depth = np.array(batch["depth"])
    depth[0, 0, 0] = np.inf
    batch["depth"] = depth
  else:
    image = np.array(batch["image"])
    image[1, 2, 3, 0] = np.nan
    batch["image"] = image
  return batch


class PoisonedLoader:
  """FakeTrainLoader whose batch for step BAD_STEP is poisoned (same states as FakeTrainLoader)."""
  num_examples = 32
  what = "depth"

  def __init__(self, config):
    self.config = config

  def __iter__(self):
    loader = self

    class It(FakeTrainIterator):
      def __next__(self):
        bad = self.index == BAD_STEP - 1
        batch = super().__next__()
        return _poison(batch, loader.what) if bad else batch

    return It(self.config.seed, self.config.input.batch_size, self.config.dataset.image_size[0])


def _config(**overrides):
  return tiny_config(checkpoint_every_steps=2, max_checkpoints_to_keep=10, log_every_steps=4,
                     untrained_baseline=False, max_steps=12, **overrides)


def _saved_params(workdir, step):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "data_iter", "metadata"))
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return state["params"]


@pytest.mark.parametrize("what,named", [("depth", "task(s) depth (inf)"),
                                        ("image", "task(s) semseg (nan), sal (nan), normals "
                                                  "(nan), depth (nan)")])
def test_stop_names_step_and_tasks_and_keeps_only_good_checkpoints(tmp_path, what, named):
  config = _config()
  workdir = str(tmp_path / "run")
  loader = type("Loader", (PoisonedLoader,), {"what": what})
  with pytest.raises(nonfinite.NonFiniteError) as e:
    train.train_and_evaluate(config, workdir, create_train_loader=loader,
                             create_eval_loader=eval_batches)
  message = str(e.value)
  assert isinstance(e.value, errors.UserError) and "\n" not in message
  assert message.startswith(f"step {BAD_STEP}: non-finite loss or loss gradient of {named}; "
                            "training stopped, the last good checkpoint is step 6 in "), message
  assert "--config.train.on_nonfinite=skip" in message
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert steps == [2, 4, 6]  # the step-8 save comes after the check that stopped the run
  for step in steps:
    leaves = jax.tree_util.tree_leaves(_saved_params(workdir, step))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
  assert not os.path.exists(os.path.join(workdir, "results.json"))


def test_skip_leaves_the_state_unchanged_and_the_run_finishes(tmp_path, capsys):
  config = _config(on_nonfinite="skip")
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir, create_train_loader=PoisonedLoader,
                                     create_eval_loader=eval_batches)
  out = capsys.readouterr().out
  assert (f"step {BAD_STEP}: non-finite loss or loss gradient of task(s) depth (inf); step "
          "skipped") in out
  assert results["step"] == 12
  assert all(np.isfinite(results["final"][t][k]) for t in results["final"]
             for k in results["final"][t] if isinstance(results["final"][t][k], float))


def test_skipped_step_changes_nothing_but_the_counter_and_key():
  """The step function itself: on a poisoned batch params, optimizer and BatchNorm state are
  bit-identical to before; on a clean batch they change."""
  config = tiny_config(on_nonfinite="skip")
  _, _, state, backbone, step_fn, _ = _setup(config)
  it = FakeTrainIterator(config.seed, config.input.batch_size, config.dataset.image_size[0])
  clean = next(it)
  state, _ = step_fn(state, clean, backbone)
  for what in ("depth", "image"):
    skipped, metrics = step_fn(state, _poison(clean, what), backbone)
    for name in ("params", "opt_state", "batch_stats"):
      jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(skipped, name),
                             getattr(state, name))
    assert int(skipped.step) == int(state.step) + 1
    assert not np.array_equal(np.asarray(skipped.rng), np.asarray(state.rng))
    assert bool(metrics["nonfinite/depth"])
    assert bool(metrics["nonfinite/semseg"]) == (what == "image")
  moved, metrics = step_fn(state, clean, backbone)
  assert not any(bool(v) for k, v in metrics.items() if k.startswith("nonfinite/"))
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(moved.params), jax.tree_util.tree_leaves(state.params)))


def test_describe_a_shared_gradient_and_an_unknown_mode():
  flags = {"nonfinite/semseg": False, "nonfinite/depth": False, nonfinite.GRADIENT: True}
  assert nonfinite.describe(3, flags, {"loss/semseg": 0.5}, ("semseg", "depth")) == (
      "step 3: non-finite parameter gradient (every task's loss and task-specific parameter "
      "gradients are finite: the shared network)")
  config = tiny_config(on_nonfinite="skipp")
  with pytest.raises(errors.UserError, match=r"on_nonfinite='skipp' \(did you mean 'skip'\?\)"):
    nonfinite.check_mode(config)


def test_all_ignored_batch_gives_finite_losses_gradients_and_metrics():
  """Every label at its kind's padding value (all invalid): each task's loss is exactly 0 with
  a zero, finite gradient; a train step on such a batch reports nothing non-finite; the eval
  meters then report what they report without the batch (tests/test_properties.py)."""
  from freesine_jax import losses  # pylint: disable=g-import-not-at-top
  from freesine_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for task in tasks_lib.TASKS:
    layout = tasks_lib.get_task(task).kind.label
    label = np.full((2,) + layout.shape(5, 6), layout.padding_value, layout.batch_dtype)
    output = jnp.asarray(rng.normal(size=(2, 5, 6, tasks_lib.output_channels(task))),
                         jnp.float32)
    loss, grad = jax.value_and_grad(lambda o, t=task, y=label: losses.task_loss(t, o, y))(output)
    assert float(loss) == 0.0, task
    assert np.all(np.asarray(grad) == 0.0), task

  config = tiny_config()
  _, _, state, backbone, step_fn, _ = _setup(config)
  batch = next(FakeTrainIterator(config.seed, config.input.batch_size,
                                 config.dataset.image_size[0]))
  for task in config.tasks:
    layout = tasks_lib.get_task(task).kind.label
    batch[task] = np.full_like(batch[task], layout.padding_value)
  new_state, metrics = step_fn(state, batch, backbone)
  assert all(float(metrics[f"loss/{t}"]) == 0.0 for t in config.tasks)
  assert np.isfinite(float(metrics["grad_norm"]))
  assert not any(bool(v) for k, v in metrics.items() if k.startswith(nonfinite.PREFIX))
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree_util.tree_leaves((new_state.params, new_state.batch_stats)))


def _own_leaf_names(model, variables, image_size):
  """{task: sorted parameter paths task_parameter_leaves gives that task alone}."""
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(variables["params"])]
  images = jax.ShapeDtypeStruct((2, *image_size, 3), np.float32)
  forward = lambda params, rest, x: model.apply(
      {**rest, "params": params}, x, train=True, mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(0), "drop_path": jax.random.key(1)})[0]
  rest = {k: v for k, v in variables.items() if k != "params"}
  closed, outputs = jax.make_jaxpr(forward, return_shape=True)(variables["params"], rest, images)
  own = nonfinite.task_parameter_leaves(closed, outputs, len(paths))
  return {task: sorted(paths[i] for i in leaves) for task, leaves in own.items()}


def test_task_parameter_leaves_are_the_heads_of_the_tiny_model():
  """Each task owns exactly its head's kernel and bias; the shared conv and BatchNorm belong to
  no task (they feed every output)."""
  from test_train import TinyModel  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  model = TinyModel()
  variables = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0)}, np.zeros((1, 8, 8, 3), np.float32)))
  own = _own_leaf_names(model, variables, (8, 8))
  assert own == {t: [f"['head_{t}']['bias']", f"['head_{t}']['kernel']"]
                 for t in config.tasks}


def test_task_parameter_leaves_of_free_sinewich_are_its_decoder_heads():
  """On the real model (configs/synthetic.py:tiny, traced, not compiled) the dataflow goes
  through the Swin encoder's calls: every leaf a task owns is in that task's decoder modules
  ('<task>_...'), every task owns some, and the encoder's adapters, prompts and Clock Net
  (which feed all tasks) are owned by none."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from freesine_jax import modeling  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config("tiny")
  model = modeling.build_model(config)
  size = tuple(config.dataset.image_size)
  variables = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1),
       "drop_path": jax.random.key(2)}, np.zeros((1, *size, 3), np.float32)))
  own = _own_leaf_names(model, variables, size)
  assert set(own) == set(config.tasks)
  for task, names in own.items():
    assert names, task
    assert all(f"'{task}_" in n for n in names), (task, names)
  owned = {n for names in own.values() for n in names}
  all_paths = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_leaves_with_path(variables["params"])]
  task_named = {n for n in all_paths if any(f"'{t}_" in n for t in config.tasks)}
  assert owned == task_named


def test_step_flags_attribute_a_head_gradient_to_its_task_and_a_shared_one_to_nobody():
  """Finite losses: a NaN in one task's own leaf flags that task (and the gradient); a NaN in a
  shared leaf flags only the gradient, which describe() puts on the shared network."""
  grads = {"head_depth": np.ones(3, np.float32), "head_sal": np.ones(2, np.float32),
           "shared": np.ones(4, np.float32)}
  leaves = {"depth": (0,), "sal": (1,)}  # tree_leaves order: head_depth, head_sal, shared
  losses = {"sal": np.float32(0.5), "depth": np.float32(0.25)}
  clean = nonfinite.step_flags(losses, grads, leaves)
  assert not any(bool(v) for v in clean.values())
  for leaf, named in (("head_depth", ["depth"]), ("head_sal", ["sal"]), ("shared", [])):
    bad = dict(grads, **{leaf: np.array([1.0, np.nan] + [1.0] * (grads[leaf].size - 2),
                                        np.float32)})
    flags = nonfinite.step_flags(losses, bad, leaves)
    assert [t for t in ("sal", "depth") if bool(flags[f"nonfinite/{t}"])] == named, leaf
    assert bool(flags[nonfinite.GRADIENT])
  assert bool(nonfinite.step_flags(dict(losses, sal=np.float32(np.inf)), grads,
                                   leaves)["nonfinite/sal"])
