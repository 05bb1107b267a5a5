"""Training: the state, the step and the loop (docs/design.md §3, §6).

Read `train_and_evaluate` top to bottom: build data, model and state, resume from the latest
checkpoint, train with periodic async checkpoints, log scalars and example pictures, evaluate,
write results. The step is a pure function of its arguments:

  train_step(state, batch, backbone) -> (state, metrics)

differentiates only 'params'; the frozen 'backbone' collection is a separate argument with no
optimizer state; 'batch_stats' is threaded through the state. State and backbone live on the
device mesh where config.mesh's rules put them (sharding.py: replicated, or FSDP-sharded and
gathered for the forward pass); batches are split over the mesh, and optionally into
micro-batches whose gradients add up to the whole batch's (config.train.grad_accum_steps). On
SIGTERM the loop saves and returns after the current step (`stop_requested`, distributed.py).
The optimizer and schedule are in optimizer.py, evaluation in evaluate.py, the model and its
initial variables in modeling.py.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from etils import epath
import flax
import flax.linen as nn
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from freesine_jax import checkpointing
from freesine_jax import config_checks
from freesine_jax import distributed
from freesine_jax import errors
from freesine_jax import evaluate as evaluate_lib
from freesine_jax import losses
from freesine_jax import modeling
from freesine_jax import new_tasks as new_tasks_lib
from freesine_jax import nonfinite
from freesine_jax import optimizer as optimizer_lib
from freesine_jax import pdrs
from freesine_jax import sharding as sharding_lib
from freesine_jax import tasks as tasks_lib
from freesine_jax import writers
from freesine_jax.data import registry
from freesine_jax.models import dora

PyTree = Any
FREQUENCY_PREFIX = "frequency/"
# fold_in of the step's dropout key that draws FAAR's nested rank masks (pdrs.nested_masks); a
# micro-batch's dropout key folds in its index, 0..K-1, so this stays clear of them.
PDRS_KEY = 2**31 - 1


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed)."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  batch_stats: PyTree
  rng: jax.Array


def create_train_state(variables: Mapping[str, PyTree], tx: optax.GradientTransformation,
                       seed: int) -> TrainState:
  params = variables["params"]
  # A key distinct from the init keys (fold_in), used for dropout / drop-path per step.
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    batch_stats=variables["batch_stats"], rng=rng)


def init_train_state(variables: Mapping[str, PyTree], tx: optax.GradientTransformation,
                     config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh) -> tuple[TrainState, PyTree]:
  """(train state, frozen backbone) on the mesh where config.mesh's rules put them.

  The optimizer state is created on its shards (jit with out_shardings), so no device ever
  holds a whole copy of it; `variables` are host arrays or arrays on one local device,
  identical on every host (modeling.init_variables).
  """
  trained = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  create = lambda v: create_train_state(v, tx, config.seed)
  state_sharding = sharding_lib.tree_shardings(jax.eval_shape(create, trained), mesh, config)
  trained = sharding_lib.place(trained, {"params": state_sharding.params,
                                         "batch_stats": state_sharding.batch_stats})
  state = jax.jit(create, out_shardings=state_sharding)(trained)
  backbone = sharding_lib.place(
      variables["backbone"], sharding_lib.tree_shardings(variables["backbone"], mesh, config))
  return state, backbone


def loss_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  """{task: weight} from config.loss_weights for every task of config.tasks."""
  missing = [t for t in config.tasks if t not in config.loss_weights]
  if missing:
    raise errors.UserError(f"config.loss_weights has no weight for {', '.join(missing)}; "
                           f"declare one in configs/base.py (the weights: "
                           f"{', '.join(config.loss_weights)})")
  return {t: float(config.loss_weights[t]) for t in config.tasks}


def task_frequencies(model: nn.Module, params: PyTree) -> dict[str, jax.Array]:
  """{'frequency/<task>': omega_t} of a Free Sinewich model ({} for models without a Clock Net
  or per-task frequencies, e.g. a custom config.model.factory model)."""
  if not hasattr(model, "frequencies"):
    return {}
  omegas = model.apply({"params": params}, method=model.frequencies)
  if omegas is None:  # a baseline without task frequencies
    return {}
  return {f"{FREQUENCY_PREFIX}{t}": omegas[i] for i, t in enumerate(model.tasks)}


def split_microbatches(batch: Mapping[str, jax.Array], count: int,
                       mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """(B, ...) -> (count, B / count, ...): micro-batch k holds rows k, k + count, k + 2 count...

  Strided rather than contiguous, so each device's slice of the batch splits into its own
  slices of every micro-batch: no data moves between devices.
  """
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      None, sharding_lib.BATCH_AXES))

  def split(x):
    x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, sharding)

  return {k: split(v) for k, v in batch.items()}


# PRNG implementations for the dropout and drop-path masks (config.train.dropout_rng).
DROPOUT_RNGS = ("threefry", "rbg", "unsafe_rbg")


def dropout_rng(config: ml_collections.ConfigDict) -> str:
  """config.train.dropout_rng, checked."""
  impl = config.train.dropout_rng
  if impl not in DROPOUT_RNGS:
    raise errors.UserError(f"config.train.dropout_rng={impl!r}"
                           f"{errors.did_you_mean(str(impl), DROPOUT_RNGS)}"
                           f" (one of {', '.join(DROPOUT_RNGS)})")
  return impl


def mask_key(key: jax.Array, impl: str) -> jax.Array:
  """The key the dropout / drop-path masks are drawn from: `key` itself ('threefry'), or a key
  of PRNG implementation `impl` seeded with 128 bits drawn from `key`.

  The state's key stays a threefry key whatever impl is (checkpoints keep their format, and a
  run's parameter initialisation does not depend on impl); only the mask bits, the bulk of the
  step's random numbers, come from `impl`. Deterministic: the same state key gives the same
  masks, so a resumed run stays bit-identical to an uninterrupted one.
  """
  if impl == "threefry":
    return key
  return jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=impl)


def _training_forward(model: nn.Module, mesh: jax.sharding.Mesh,
                      impl: str = "threefry") -> Callable:
  """forward(params, batch_stats, backbone, images, k_dropout, k_path) -> ({task: output},
  mutated variables): the training forward pass, parameters and backbone gathered (FSDP), the
  random masks drawn with PRNG implementation `impl` (mask_key)."""

  def forward(params, batch_stats, backbone, images, k_dropout, k_path):
    gathered = sharding_lib.gathered({"backbone": backbone, "params": params}, mesh)
    return model.apply({**gathered, "batch_stats": batch_stats}, images, train=True,
                       rngs={"dropout": mask_key(k_dropout, impl),
                             "drop_path": mask_key(k_path, impl)},
                       mutable=["batch_stats"])

  return forward


class TracedForward(NamedTuple):
  """The training forward traced once when a step is built (traced_forward)."""
  forward: Callable  # same signature and values as _training_forward's
  task_leaves: dict[str, tuple[int, ...]]  # nonfinite.task_parameter_leaves of it


def traced_forward(model: nn.Module, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   state: TrainState, backbone: PyTree) -> TracedForward:
  """The training forward pass traced abstractly, once, at the shapes of `state`, `backbone`
  and one micro-batch of config's images; which parameter leaves belong to one task only (its
  head, for naming the task behind a NaN/Inf) read off that trace's dataflow; and a forward
  that evaluates the trace instead of tracing the Flax modules again.

  Tracing the modules is most of what building a step costs before XLA (tiny Free Sinewich,
  2 cores: ~5 s of the ~6 s) and the step needs them traced twice, once here for the task
  leaves and once for its gradient; evaluating the trace binds the same operations in the same
  order, so the step's program is the same. Called with other shapes (a caller's own batch
  size), the forward traces the modules as before.
  """
  tasks = tuple(config.tasks)
  forward = _training_forward(model, mesh, dropout_rng(config))
  rows = int(config.input.batch_size) // int(config.train.grad_accum_steps)
  images = jax.ShapeDtypeStruct((rows, *config.dataset.image_size, 3), np.float32)
  abstract = lambda tree: jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  args = abstract((state.params, state.batch_stats, backbone)) + (images,) + abstract(
      (state.rng, state.rng))
  closed, out_shape = jax.make_jaxpr(forward, return_shape=True)(*args)
  traced_as = [(a.shape, a.dtype) for a in closed.in_avals]
  out_tree = jax.tree_util.tree_structure(out_shape)
  evaluate = jex_core.jaxpr_as_fun(closed)

  def traced(*call_args):
    leaves = jax.tree_util.tree_leaves(call_args)
    if [(x.shape, x.dtype) for x in leaves] != traced_as:
      return forward(*call_args)
    return jax.tree_util.tree_unflatten(out_tree, evaluate(*leaves))

  num_params = len(jax.tree_util.tree_leaves(state.params))
  own = nonfinite.task_parameter_leaves(closed, out_shape, num_params,
                                         select=lambda out: {t: out[0][t] for t in tasks})
  return TracedForward(traced, own)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, schedule: optax.Schedule,
                    mesh: jax.sharding.Mesh, state: TrainState, backbone: PyTree, *,
                    donate_state: bool = False, trainable: PyTree | None = None) -> Callable:
  """The jitted `train_step(state, batch, backbone) -> (state, metrics)` for `state` and
  `backbone` as init_train_state returns them (build_train_step does both).

  The step takes and returns arrays with the shardings of `state` and `backbone` (read here);
  the forward pass sees the parameters and the backbone gathered (FSDP). The forward is traced
  here, once (traced_forward), which also finds the parameters that are one task's own.

  With config.train.grad_accum_steps = K > 1 the global batch is split into K micro-batches
  (split_microbatches) run one after another; every loss is normalised by the counts of the
  whole batch (losses.label_totals), so the summed gradient, the loss and the update equal the
  whole batch's for a model without batch statistics. Dropout keys differ per micro-batch, and
  BatchNorm normalises each micro-batch by its own statistics; its running averages take the
  mean of the micro-batches' updates.

  donate_state: the input state's buffers are reused for the new state (params, optimizer
  moments: no second copy in memory), and the state passed in is deleted; the training loop
  donates. An asynchronous checkpoint save of that state is unaffected: Orbax copies the arrays
  to host memory before `save` returns.

  trainable: {'params': ..., 'batch_stats': ...} boolean trees (new_tasks.start_from_trained)
  when config.train.new_tasks trains some values only: the other gradients are zeroed and the
  other parameters and statistics keep their values bitwise.
  """
  state_sharding = sharding_lib.shardings_of(state)
  backbone_sharding = sharding_lib.shardings_of(backbone)
  forward, own_leaves = traced_forward(model, config, mesh, state, backbone)
  tasks = tuple(config.tasks)
  weights = loss_weights(config)
  microbatches = int(config.train.grad_accum_steps)
  skip_nonfinite = nonfinite.check_mode(config) == "skip"
  with_pdrs = pdrs.find_state(state.opt_state) is not None
  magnitude_reg = (float(config.model.lora.dora_magnitude_reg)
                   if config.model.lora.form == "dora" else 0.0)

  def gradients(params, batch_stats, backbone, batch, totals, k_dropout, k_path, rank_masks):
    """(loss, per-task losses, updated batch_stats, grads) of one (micro-)batch."""

    def loss_fn(params):
      if rank_masks is not None:  # FAAR's nested rank dropout (pdrs.py)
        params = pdrs.masked(params, rank_masks)
      outputs, mutated = forward(params, batch_stats, backbone, batch["image"], k_dropout,
                                 k_path)
      total, per_task = losses.multitask_loss(outputs, batch, tasks, weights, totals)
      if magnitude_reg:  # FAAR's DoRA magnitude regulariser (models/dora.py)
        total = total + dora.magnitude_penalty(params, magnitude_reg) / microbatches
      return total, (per_task, mutated.get("batch_stats", batch_stats))

    (total, (per_task, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return total, per_task, new_stats, grads

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], backbone: PyTree):
    rng, k_dropout, k_path = jax.random.split(state.rng, 3)
    totals = losses.label_totals(batch, tasks)  # of the whole global batch
    rank_masks = None
    if with_pdrs:  # one draw per step, all micro-batches alike; its key is dropout's, folded
      rank_masks = pdrs.nested_masks(pdrs.find_state(state.opt_state).ranks,
                                     jax.random.fold_in(k_dropout, PDRS_KEY),
                                     float(config.train.pdrs.explore))
    if microbatches == 1:
      total, per_task, batch_stats, grads = gradients(
          state.params, state.batch_stats, backbone, batch, totals, k_dropout, k_path,
          rank_masks)
    else:
      def accumulate(sums, xs):
        index, micro = xs
        out = gradients(state.params, state.batch_stats, backbone, micro, totals,
                        jax.random.fold_in(k_dropout, index), jax.random.fold_in(k_path, index),
                        rank_masks)
        return jax.tree_util.tree_map(jnp.add, sums, out), None

      micro = split_microbatches(batch, microbatches, mesh)
      first = jax.tree_util.tree_map(lambda x: x[0], micro)
      zeros = jax.tree_util.tree_map(
          lambda x: jnp.zeros(x.shape, x.dtype),
          jax.eval_shape(gradients, state.params, state.batch_stats, backbone, first, totals,
                         k_dropout, k_path, rank_masks))
      (total, per_task, stats_sum, grads), _ = jax.lax.scan(
          accumulate, zeros, (jnp.arange(microbatches), micro))
      batch_stats = jax.tree_util.tree_map(lambda x: x / microbatches, stats_sum)
    if trainable is not None:
      grads = new_tasks_lib.frozen_gradients(trainable["params"], grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if trainable is not None:
      params = new_tasks_lib.keep_frozen(trainable["params"], params, state.params)
      batch_stats = new_tasks_lib.keep_frozen(trainable["batch_stats"], batch_stats,
                                              state.batch_stats)
    flags = nonfinite.step_flags(per_task, grads, own_leaves)
    if skip_nonfinite:
      params, opt_state, batch_stats = nonfinite.keep_if_finite(
          nonfinite.step_is_finite(flags), (params, opt_state, batch_stats),
          (state.params, state.opt_state, state.batch_stats))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=batch_stats, rng=rng)
    out = {"loss": total, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    out.update({f"loss/{t}": v for t, v in per_task.items()})
    out.update(flags)
    out.update(task_frequencies(model, params))
    if with_pdrs:  # FAAR: the LoRA parameters the rank selection keeps, over training
      out["lora_params_kept"] = pdrs.kept_count(params, pdrs.find_state(opt_state).ranks)
    return new_state, out

  repl = sharding_lib.replicated(mesh)
  data = sharding_lib.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(state_sharding, data, backbone_sharding),
                 out_shardings=(state_sharding, repl),
                 donate_argnums=(0,) if donate_state else ())


class TrainSetup(NamedTuple):
  """What training steps with (build_train_step)."""
  state: TrainState  # on the mesh
  backbone: PyTree  # the frozen 'backbone' collection, on the mesh
  train_step: Callable  # jitted (state, batch, backbone) -> (state, metrics)
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation  # the optimizer the step applies


def build_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                     variables: Mapping[str, PyTree], schedule: optax.Schedule,
                     mesh: jax.sharding.Mesh | None = None, *, donate_state: bool = False,
                     trainable: PyTree | None = None,
                     steps_per_epoch: int | None = None) -> TrainSetup:
  """The optimizer of config.optim with `schedule`, the train state and backbone of `variables`
  on the mesh (init_train_state) and the jitted step for them (make_train_step): what the
  training loop builds, in one place for the loop, the tests and the benchmarks. `mesh`
  defaults to sharding.make_mesh(config); donate_state and trainable: make_train_step;
  steps_per_epoch: FAAR's default shrink interval (pdrs.spec_from_config)."""
  mesh = sharding_lib.make_mesh(config) if mesh is None else mesh
  tx = optimizer_lib.make_optimizer(config, schedule,
                                    pdrs.spec_from_config(config, steps_per_epoch))
  state, backbone = init_train_state(variables, tx, config, mesh)
  step = make_train_step(model, tx, config, schedule, mesh, state, backbone,
                         donate_state=donate_state, trainable=trainable)
  return TrainSetup(state, backbone, step, mesh, tx)


# ------------------------------------------------------------------------------------------
# Logging.
# ------------------------------------------------------------------------------------------


def window_summary(pending: Sequence[Mapping[str, Any]], seconds: float,
                   global_batch: int, timed_steps: int | None = None) -> dict[str, float]:
  """Scalars of a logging window: step metrics averaged over its steps (the task frequencies
  at its last step), seconds per step, steps and examples per second.

  timed_steps: how many of the window's steps `seconds` covers (default all; the train loop
  leaves the compiled first step out of the speed, not out of the loss average)."""
  summary = {k: float(pending[-1][k]) if k.startswith(FREQUENCY_PREFIX)
             else float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
  seconds = max(seconds, 1e-9)
  steps = len(pending) if timed_steps is None else timed_steps
  summary["step_time_sec"] = seconds / steps
  summary["steps_per_sec"] = steps / seconds
  summary["examples_per_sec"] = global_batch * steps / seconds
  return summary


def estimated_seconds_left(steps_left: int, steps_timed: int, seconds_timed: float,
                           window_steps_per_sec: float) -> float:
  """Time left at the rate of the steps since the compiled first step (its compilation is not
  a step's time, so an ETA including it starts minutes too long); before any such step, at the
  logging window's rate."""
  rate = (steps_timed / max(seconds_timed, 1e-9) if steps_timed > 0
          else window_steps_per_sec)
  return steps_left / rate if rate > 0 else math.inf


def progress_line(step: int, total_steps: int, summary: Mapping[str, float],
                  tasks: Sequence[str], eta_seconds: float) -> str:
  per_task = " ".join(f"{t} {summary[f'loss/{t}']:.4f}" for t in tasks)
  freqs = [summary[k] for k in (f"{FREQUENCY_PREFIX}{t}" for t in tasks) if k in summary]
  freq_text = f" | ω {' '.join(f'{f:.3f}' for f in freqs)}" if freqs else ""
  return (f"step {step:>{len(str(total_steps))}}/{total_steps} "
          f"[{100.0 * step / total_steps:5.1f}%] | loss {summary['loss']:.4f} ({per_task}) | "
          f"lr {summary['lr']:.3e}{freq_text} | {summary['steps_per_sec']:.2f} steps/s, "
          f"{summary['examples_per_sec']:.1f} examples/s | "
          f"ETA {writers.format_duration(eta_seconds)}")


# ------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------


def _num_train_examples(config: ml_collections.ConfigDict, loader: Any) -> int:
  if config.train.num_train_examples:
    return int(config.train.num_train_examples)
  n = getattr(loader, "num_examples", None)
  if n:
    return int(n)
  from freesine_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return len(pipeline.get_data_source(config, config.dataset.train_split))


class Plan(NamedTuple):
  """How long a run trains and its learning-rate schedule (MTLoRA's recipe, optimizer.py)."""
  steps_per_epoch: int
  schedule_steps: int  # the cosine's length (train.num_epochs)
  total_steps: int  # where training stops (train.max_steps, if shorter)
  warmup_steps: int
  learning_rates: tuple[float, float, float]  # (peak, warmup start, final)
  schedule: optax.Schedule


def training_plan(config: ml_collections.ConfigDict, num_train_examples: int) -> Plan:
  """The steps and learning rates config.train / config.optim give for this many examples."""
  global_batch = int(config.input.batch_size)
  steps_per_epoch = max(num_train_examples // global_batch, 1)
  schedule_steps = int(config.train.num_epochs * steps_per_epoch)
  total_steps = schedule_steps
  if config.train.max_steps is not None:
    total_steps = min(total_steps, int(config.train.max_steps))
  warmup_steps = int(config.train.warmup_epochs * steps_per_epoch)
  rates = optimizer_lib.scaled_learning_rates(config, global_batch)
  schedule = optimizer_lib.make_schedule(*rates, warmup_steps, schedule_steps)
  return Plan(steps_per_epoch, schedule_steps, total_steps, warmup_steps, rates, schedule)


def _variables(state: TrainState, backbone: PyTree) -> dict[str, PyTree]:
  return {"backbone": backbone, "params": state.params, "batch_stats": state.batch_stats}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       create_train_loader: Callable | None = None,
                       create_eval_loader: Callable | None = None,
                       stop_requested: Callable[[int], bool] | None = None) -> dict[str, Any]:
  """Trains, checkpoints, evaluates; writes workdir/{metrics.jsonl,tb,checkpoints,results.json}.

  The model is modeling.build_model(config) (config.model.factory for a custom one); the
  loaders default to freesine_jax.data.pipeline.create_{train,eval}_loader(config).
  stop_requested(step), asked after every step on every host (distributed.preemption_watch),
  True: save a checkpoint and return {'step', 'preempted': True} without evaluating.
  Returns the dict written to results.json. Anything that cannot be written for lack of space,
  a read-only file system or permissions (a checkpoint, metrics.jsonl, TensorBoard) ends it
  with one checkpointing.StorageFault naming the workdir and the intact checkpoints.
  """
  opened = []  # the run's Checkpointer, once made
  try:
    return _train_and_evaluate(config, workdir, create_train_loader=create_train_loader,
                               create_eval_loader=create_eval_loader,
                               stop_requested=stop_requested, opened=opened)
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    reason = checkpointing.storage_fault_reason(e)
    if reason is None:
      raise
    for ckpt in opened:  # a save still writing may well finish: it is not "unfinished"
      try:
        ckpt.wait_until_finished()
      except Exception:  # pylint: disable=broad-except
        pass  # it failed too: its directory is removed below
    raise checkpointing.storage_fault(checkpointing.checkpoint_directory(workdir), None,
                                      f"{reason} ({type(e).__name__}: "
                                      f"{errors.first_line(e)[:300]})") from e


def _train_and_evaluate(config, workdir, *, create_train_loader, create_eval_loader,
                        stop_requested, opened: list) -> dict[str, Any]:
  """train_and_evaluate's body; appends its Checkpointer to `opened`."""
  config_checks.check_version(config)
  config_checks.check_values(config)
  tasks = tuple(config.tasks)
  for t in tasks:
    tasks_lib.get_task(t)
  loss_weights(config)  # fails on a missing weight before any data or model is built
  added = tasks_lib.new_tasks(config)  # config.train.new_tasks: () for a run from scratch
  if config.train.init_from and not added:
    raise errors.UserError(f"config.train.init_from={config.train.init_from} is read only with "
                           "config.train.new_tasks=<tasks to add to that run>")
  # The mesh and the batch sizes, checked before any data or model is built.
  mesh = sharding_lib.make_mesh(config)
  global_batch = int(config.input.batch_size)
  microbatches = int(config.train.grad_accum_steps)
  sharding_lib.check_batch_size(global_batch, mesh, microbatches=microbatches)
  sharding_lib.check_batch_size(int(config.input.eval_batch_size), mesh,
                                "config.input.eval_batch_size")
  checkpointing.ensure_workdir(workdir)
  writer = writers.Writer(workdir)

  # Data.
  if create_train_loader is None or create_eval_loader is None:
    from freesine_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    create_train_loader = create_train_loader or pipeline.create_train_loader
    create_eval_loader = create_eval_loader or pipeline.create_eval_loader
  train_loader = create_train_loader(config)
  eval_loader = create_eval_loader(config)
  plan = training_plan(config, _num_train_examples(config, train_loader))
  steps_per_epoch, schedule_steps = plan.steps_per_epoch, plan.schedule_steps
  total_steps, warmup_steps, schedule = plan.total_steps, plan.warmup_steps, plan.schedule

  # Model, optimizer, state.
  model = modeling.build_model(config)
  variables = modeling.init_variables(model, config)
  trainable = None
  if added:  # the trained run's weights; only the new tasks' train
    variables, trainable = new_tasks_lib.start_from_trained(config, model, variables)
  forward, merge = evaluate_lib.make_eval_forward(model), evaluate_lib.make_inference_merge(model)
  peak_lr, warmup_lr, min_lr = plan.learning_rates
  backbone_hash = checkpointing.tree_hash(variables["backbone"])
  # The step keeps the state's shardings, which a restored state has too (restored onto them).
  setup = build_train_step(config, model, variables, schedule, mesh, donate_state=True,
                           trainable=trainable, steps_per_epoch=steps_per_epoch)
  state, backbone, train_step = setup.state, setup.backbone, setup.train_step
  num_trainable = modeling.count_parameters(variables["params"])
  if trainable is not None:
    num_trainable = sum(int(np.broadcast_to(m, np.shape(p)).sum()) for m, p in zip(
        jax.tree_util.tree_leaves(trainable["params"]),
        jax.tree_util.tree_leaves(variables["params"])))
  writer.print(f"tasks {', '.join(tasks)} | {num_trainable:,} trainable / "
               f"{modeling.count_parameters(variables['backbone']):,} frozen parameters | "
               f"{jax.device_count()} device(s), {jax.process_count()} process(es), mesh "
               f"{' x '.join(f'{a}={n}' for a, n in mesh.shape.items())}, "
               f"{config.model.dtype} compute")
  accumulation = f" in {microbatches} micro-batches" if microbatches > 1 else ""
  writer.print(f"{steps_per_epoch} steps/epoch, {total_steps} steps (schedule spans "
               f"{schedule_steps}, warmup {warmup_steps}), global batch {global_batch}"
               f"{accumulation}, "
               f"lr {peak_lr:.3g} (warmup from {warmup_lr:.3g}, min {min_lr:.3g})")

  # Untrained baseline (step-0 model), cached in the workdir so a resumed run reuses it.
  untrained = None
  untrained_path = epath.Path(workdir) / "untrained_eval.json"
  baseline_key = evaluate_lib.untrained_baseline_key(config, backbone_hash)
  if config.train.untrained_baseline:
    if untrained_path.exists():
      cached = json.loads(untrained_path.read_text())
      if cached.get("key") == baseline_key:
        untrained = cached["results"]
    if untrained is None:
      writer.print("evaluating the untrained model (baseline; its first batch compiles the "
                   "eval step)...")
      untrained, _ = evaluate_lib.evaluate(forward, variables, eval_loader, config, mesh,
                                             merge, log=writer.print)
      if writer.enabled:
        untrained_path.write_text(json.dumps(
            writers.jsonable({"key": baseline_key, "results": untrained})))
      writer.scalars(0, writers.flat_scalars(untrained, "untrained"))

  # Resume.
  ckpt = checkpointing.Checkpointer(
      checkpointing.checkpoint_directory(workdir),
      save_interval_steps=config.train.checkpoint_every_steps,
      max_to_keep=config.train.max_checkpoints_to_keep,
      async_save=config.train.async_checkpointing)
  opened.append(ckpt)
  train_iter = iter(train_loader)
  metadata = {"backbone_hash": backbone_hash, "config": config.to_json_best_effort()}
  if ckpt.latest_step() is not None:
    def check_saved(saved_meta, step):
      checkpointing.check_compatible(saved_meta, config, workdir, step, "resume")
      checkpointing.check_backbone(saved_meta, backbone_hash, step)
    # The newest intact step: a damaged one is moved aside with a warning naming it.
    latest, state, iter_state = ckpt.restore_latest_intact(state, check_saved, writer.print)
    if iter_state is not None:
      train_iter.set_state(iter_state)
    writer.print(f"resumed from {ckpt.directory} step {latest}")

  ckpt.check_space(state)  # a disk too full for one checkpoint: said now, not after steps

  # Train.
  batch_keys = ("image",) + tasks
  step = int(jax.device_get(state.step))
  writer.continue_from(step)  # rows an interrupted run logged past `step` go
  log_every = max(int(config.train.log_every_steps), 1)
  image_every = int(config.train.image_every_steps)
  examples = (evaluate_lib.qualitative_batches(eval_loader, config.eval.qualitative_examples)
              if image_every > 0 else [])
  monitor = nonfinite.Monitor(config, total_steps, writer.print)
  pending = []
  t_start, step_start = time.perf_counter(), step
  t_log = t_start
  t_rate, step_rate = t_start, step  # the ETA's rate: from the end of the compiled first step
  untimed, compile_seconds = 0, 0.0  # the window's steps its speed leaves out (the compiled one)
  if step < total_steps:
    writer.print("compiling the train step (its first run; once per process)...")
  while step < total_steps:
    try:
      batch = next(train_iter)
    except StopIteration as e:
      raise RuntimeError(
          f"the train loader ended at step {step}; create_train_loader must repeat "
          "indefinitely") from e
    state, step_metrics = train_step(
        state, sharding_lib.shard_batch(batch, mesh, batch_keys, global_batch), backbone)
    if step == step_start:  # the step was compiled: give the compiler's freed heap back
      jax.block_until_ready(step_metrics)
      distributed.release_freed_host_memory()
      t_rate, step_rate = time.perf_counter(), step + 1
      untimed, compile_seconds, t_log = 1, t_rate - t_log, t_rate
      writer.print(f"train step compiled and run once in {compile_seconds:.0f} s "
                   "(left out of the steps/s and the ETA)")
    step += 1
    pending.append(monitor.after_step(step, step_metrics, ckpt))  # NaN/Inf: stop or skip

    if step % log_every == 0 or step == total_steps:
      pending = jax.device_get(pending)
      now = time.perf_counter()
      if untimed and len(pending) > untimed:  # the speed from the end of the compiled step
        summary = window_summary(pending, now - t_log, global_batch, len(pending) - untimed)
      else:  # a window of the compiled step alone: its time is all there is
        summary = window_summary(pending, now - t_log + untimed * compile_seconds, global_batch)
      pending, t_log, untimed = [], now, 0
      writer.scalars(step, {f"train/{k}": v for k, v in summary.items()})
      writer.print(progress_line(step, total_steps, summary, tasks, estimated_seconds_left(
          total_steps - step, step - step_rate, now - t_rate, summary["steps_per_sec"])))

    # Pictures and evaluations are not training: their time is kept out of the step time.
    t_aside = time.perf_counter()
    if image_every > 0 and (step % image_every == 0 or step == total_steps):
      writer.images(step, evaluate_lib.draw_examples(
          forward, _variables(state, backbone), examples, config, mesh, f"step {step} · ",
          merge))

    if step % config.train.checkpoint_every_steps == 0 and step < total_steps:
      ckpt.save(step, state, data_iter_state=train_iter.get_state(), metadata=metadata)

    if stop_requested is not None and stop_requested(step):
      if ckpt.latest_step() != step:
        ckpt.save(step, state, data_iter_state=train_iter.get_state(), metadata=metadata,
                  force=True)
      ckpt.close()
      writer.print(f"stopped at step {step} (SIGTERM): checkpoint saved in {ckpt.directory}; "
                   "rerun the same command to resume")
      writer.close()
      return {"step": step, "preempted": True}

    if config.train.eval_every_steps and step % config.train.eval_every_steps == 0 \
        and step < total_steps:
      results, delta = evaluate_lib.evaluate(forward, _variables(state, backbone), eval_loader,
                                             config, mesh, merge)
      extra = {} if delta is None else {"eval/delta_m": delta}
      writer.scalars(step, {**writers.flat_scalars(results, "eval"), **extra})
    t_log += time.perf_counter() - t_aside

  if ckpt.latest_step() != step:
    ckpt.save(step, state, data_iter_state=train_iter.get_state(), metadata=metadata,
              force=True)
  ckpt.wait_until_finished()

  # Final evaluation.
  final, delta = evaluate_lib.evaluate(forward, _variables(state, backbone), eval_loader,
                                       config, mesh, merge)
  writer.scalars(step, {**writers.flat_scalars(final, "eval"),
                        **({} if delta is None else {"eval/delta_m": delta})})
  report = evaluate_lib.format_report(final, delta, registry.class_names(config.dataset.name))
  writer.print(f"\nfinal evaluation at step {step}:\n{report}")
  verdict = unchanged = None
  if untrained is not None:
    # A run that adds tasks starts from a trained one: its step-0 model is that run for the old
    # tasks, which must stay unchanged; only the added tasks start untrained.
    verdict = evaluate_lib.beats_untrained(
        {t: m for t, m in final.items() if not added or t in added}, untrained)
    if added:
      unchanged = evaluate_lib.unchanged_tasks(
          {t: m for t, m in final.items() if t not in added}, untrained)
    writer.print(evaluate_lib.format_verdict(final, untrained, verdict, unchanged))

  ranks = pdrs.find_state(state.opt_state)
  rank_selection = None
  if ranks is not None:  # FAAR: what the rank selection kept (tools.analyze: per layer)
    built, kept = pdrs.trained_count(state.params, ranks.ranks)
    rank_selection = {"lora_params_built": built, "lora_params_kept": kept,
                      "trainable_parameters_kept": num_trainable - built + kept}
    writer.print(f"rank selection kept {kept:,} of {built:,} LoRA parameters: "
                 f"{num_trainable - built + kept:,} trainable parameters in use "
                 "(per layer: python -m freesine_jax.tools.analyze --workdir=...)")

  results = writers.jsonable({
      "step": step,
      "final": final,
      "delta_m": delta,
      "untrained": untrained,
      "beats_untrained": verdict,
      "all_beat_untrained": None if verdict is None else all(verdict.values()),
      "old_tasks_unchanged": unchanged,  # a run adding tasks: the others vs the starting run
      "trainable_parameters": num_trainable,
      "rank_selection": rank_selection,
      "train_time_sec": time.perf_counter() - t_start,
  })
  if writer.enabled:
    (epath.Path(workdir) / "results.json").write_text(json.dumps(results, indent=2))
  ckpt.close()
  writer.close()
  return results
