"""Training: the state, the step and the loop (docs/design.md §3, §6).

Read `train_and_evaluate` top to bottom: build data, model and state, resume from the latest
checkpoint, train with periodic async checkpoints, log scalars and example pictures, evaluate,
write results. The step is a pure function of its arguments:

  train_step(state, batch, backbone) -> (state, metrics)

differentiates only 'params'; the frozen 'backbone' collection is a separate, replicated
argument with no optimizer state; 'batch_stats' is threaded through the state. The optimizer
and schedule are in optimizer.py, evaluation in evaluate.py, the model and its initial
variables in modeling.py.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from freesine_jax import checkpointing
from freesine_jax import errors
from freesine_jax import evaluate as evaluate_lib
from freesine_jax import losses
from freesine_jax import modeling
from freesine_jax import optimizer as optimizer_lib
from freesine_jax import sharding as sharding_lib
from freesine_jax import tasks as tasks_lib

PyTree = Any
FREQUENCY_PREFIX = "frequency/"


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


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, schedule: optax.Schedule,
                    mesh: jax.sharding.Mesh) -> Callable:
  """The jitted `train_step(state, batch, backbone) -> (state, metrics)`."""
  tasks = tuple(config.tasks)
  weights = loss_weights(config)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], backbone: PyTree):
    rng, k_dropout, k_path = jax.random.split(state.rng, 3)

    def loss_fn(params):
      outputs, mutated = model.apply(
          {"backbone": backbone, "params": params, "batch_stats": state.batch_stats},
          batch["image"], train=True, rngs={"dropout": k_dropout, "drop_path": k_path},
          mutable=["batch_stats"])
      total, per_task = losses.multitask_loss(outputs, batch, tasks, weights)
      return total, (per_task, mutated)

    (total, (per_task, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=mutated.get("batch_stats", state.batch_stats),
                              rng=rng)
    out = {"loss": total, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    out.update({f"loss/{t}": v for t, v in per_task.items()})
    out.update(task_frequencies(model, params))
    return new_state, out

  repl = sharding_lib.replicated(mesh)
  data = sharding_lib.data_sharded(mesh)
  return jax.jit(train_step, in_shardings=(repl, data, repl), out_shardings=(repl, repl))


# ------------------------------------------------------------------------------------------
# Logging.
# ------------------------------------------------------------------------------------------


def _flat_eval(results: Mapping[str, Mapping[str, Any]], prefix: str) -> dict[str, float]:
  flat = {}
  for task, metrics in results.items():
    for key, value in metrics.items():
      if isinstance(value, (int, float, np.integer, np.floating)):
        flat[f"{prefix}/{task}/{key}"] = float(value)
  return flat


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Writer:
  """metrics.jsonl + TensorBoard (tensorboardX: scalars and images) + stdout, on process 0."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(evaluate_lib.jsonable({"step": int(step), **values})) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def images(self, step: int, images: Sequence[np.ndarray], prefix: str = "examples") -> None:
    """RGB uint8 (H, W, 3) images as TensorBoard images '<prefix>/<i>'."""
    if not self.enabled:
      return
    for i, image in enumerate(images):
      self._tb.add_image(f"{prefix}/{i}", np.asarray(image, np.uint8), int(step),
                         dataformats="HWC")
    self._tb.flush()

  def print(self, text: str) -> None:
    if self.enabled:
      print(text, flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def window_summary(pending: Sequence[Mapping[str, Any]], seconds: float,
                   global_batch: int) -> dict[str, float]:
  """Scalars of a logging window: step metrics averaged over its steps (the task frequencies
  at its last step), seconds per step, steps and examples per second."""
  summary = {k: float(pending[-1][k]) if k.startswith(FREQUENCY_PREFIX)
             else float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
  seconds = max(seconds, 1e-9)
  summary["step_time_sec"] = seconds / len(pending)
  summary["steps_per_sec"] = len(pending) / seconds
  summary["examples_per_sec"] = global_batch * len(pending) / seconds
  return summary


def progress_line(step: int, total_steps: int, summary: Mapping[str, float],
                  tasks: Sequence[str], eta_seconds: float) -> str:
  per_task = " ".join(f"{t} {summary[f'loss/{t}']:.4f}" for t in tasks)
  freqs = [summary[k] for k in (f"{FREQUENCY_PREFIX}{t}" for t in tasks) if k in summary]
  freq_text = f" | ω {' '.join(f'{f:.3f}' for f in freqs)}" if freqs else ""
  return (f"step {step:>{len(str(total_steps))}}/{total_steps} "
          f"[{100.0 * step / total_steps:5.1f}%] | loss {summary['loss']:.4f} ({per_task}) | "
          f"lr {summary['lr']:.3e}{freq_text} | {summary['steps_per_sec']:.2f} steps/s, "
          f"{summary['examples_per_sec']:.1f} examples/s | ETA {_fmt_duration(eta_seconds)}")


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


def _variables(state: TrainState, backbone: PyTree) -> dict[str, PyTree]:
  return {"backbone": backbone, "params": state.params, "batch_stats": state.batch_stats}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       create_train_loader: Callable | None = None,
                       create_eval_loader: Callable | None = None) -> dict[str, Any]:
  """Trains, checkpoints, evaluates; writes workdir/{metrics.jsonl,tb,checkpoints,results.json}.

  The model is modeling.build_model(config) (config.model.factory for a custom one); the
  loaders default to freesine_jax.data.pipeline.create_{train,eval}_loader(config).
  Returns the dict written to results.json.
  """
  tasks = tuple(config.tasks)
  for t in tasks:
    tasks_lib.get_task(t)
  loss_weights(config)  # fails on a missing weight before any data or model is built
  writer = Writer(workdir)

  # Data.
  if create_train_loader is None or create_eval_loader is None:
    from freesine_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    create_train_loader = create_train_loader or pipeline.create_train_loader
    create_eval_loader = create_eval_loader or pipeline.create_eval_loader
  train_loader = create_train_loader(config)
  eval_loader = create_eval_loader(config)
  global_batch = int(config.input.batch_size)
  steps_per_epoch = max(_num_train_examples(config, train_loader) // global_batch, 1)
  schedule_steps = int(config.train.num_epochs * steps_per_epoch)
  total_steps = schedule_steps
  if config.train.max_steps is not None:
    total_steps = min(total_steps, int(config.train.max_steps))
  warmup_steps = int(config.train.warmup_epochs * steps_per_epoch)

  # Model, optimizer, state.
  mesh = sharding_lib.make_mesh(config)
  sharding_lib.check_batch_size(global_batch, mesh)
  model = modeling.build_model(config)
  variables = modeling.init_variables(model, config)
  forward = evaluate_lib.make_eval_forward(model)
  peak_lr, warmup_lr, min_lr = optimizer_lib.scaled_learning_rates(config, global_batch)
  schedule = optimizer_lib.make_schedule(peak_lr, warmup_lr, min_lr, warmup_steps,
                                         schedule_steps)
  tx = optimizer_lib.make_optimizer(config, schedule)
  state = sharding_lib.replicate(create_train_state(variables, tx, config.seed), mesh)
  backbone = sharding_lib.replicate(variables["backbone"], mesh)
  backbone_hash = checkpointing.tree_hash(variables["backbone"])
  num_trainable = modeling.count_parameters(variables["params"])
  writer.print(f"tasks {', '.join(tasks)} | {num_trainable:,} trainable / "
               f"{modeling.count_parameters(variables['backbone']):,} frozen parameters | "
               f"{jax.device_count()} device(s), {jax.process_count()} process(es)")
  writer.print(f"{steps_per_epoch} steps/epoch, {total_steps} steps (schedule spans "
               f"{schedule_steps}, warmup {warmup_steps}), global batch {global_batch}, "
               f"lr {peak_lr:.3g} (warmup from {warmup_lr:.3g}, min {min_lr:.3g})")

  # Untrained baseline (step-0 model), cached in the workdir so a resumed run reuses it.
  untrained = None
  untrained_path = os.path.join(workdir, "untrained_eval.json")
  baseline_key = evaluate_lib.untrained_baseline_key(config, backbone_hash)
  if config.train.untrained_baseline:
    if os.path.exists(untrained_path):
      with open(untrained_path, encoding="utf-8") as f:
        cached = json.load(f)
      if cached.get("key") == baseline_key:
        untrained = cached["results"]
    if untrained is None:
      writer.print("evaluating the untrained model (baseline)...")
      untrained, _ = evaluate_lib.evaluate(forward, variables, eval_loader, config, mesh)
      if writer.enabled:
        with open(untrained_path, "w", encoding="utf-8") as f:
          json.dump(evaluate_lib.jsonable({"key": baseline_key, "results": untrained}), f)
      writer.scalars(0, _flat_eval(untrained, "untrained"))

  # Resume.
  ckpt = checkpointing.Checkpointer(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      save_interval_steps=config.train.checkpoint_every_steps,
      max_to_keep=config.train.max_checkpoints_to_keep,
      async_save=config.train.async_checkpointing)
  train_iter = iter(train_loader)
  metadata = {"backbone_hash": backbone_hash, "config": config.to_json_best_effort()}
  latest = ckpt.latest_step()
  if latest is not None:
    saved_meta = ckpt.read_metadata(latest)
    checkpointing.check_compatible(saved_meta, config, workdir, latest, "resume")
    checkpointing.check_backbone(saved_meta, backbone_hash, latest)
    state, iter_state, _ = ckpt.restore(latest, state)
    if iter_state is not None:
      train_iter.set_state(iter_state)
    writer.print(f"resumed from {ckpt.directory} step {latest}")

  # Train.
  train_step = make_train_step(model, tx, config, schedule, mesh)
  batch_keys = ("image",) + tasks
  step = int(jax.device_get(state.step))
  log_every = max(int(config.train.log_every_steps), 1)
  image_every = int(config.train.image_every_steps)
  examples = (evaluate_lib.qualitative_batches(eval_loader, config.eval.qualitative_examples)
              if image_every > 0 else [])
  pending = []
  t_start, step_start = time.perf_counter(), step
  t_log = t_start
  while step < total_steps:
    try:
      batch = next(train_iter)
    except StopIteration as e:
      raise RuntimeError(
          f"the train loader ended at step {step}; create_train_loader must repeat "
          "indefinitely") from e
    state, step_metrics = train_step(state, sharding_lib.shard_batch(batch, mesh, batch_keys),
                                     backbone)
    step += 1
    pending.append(step_metrics)

    if step % log_every == 0 or step == total_steps:
      pending = jax.device_get(pending)
      now = time.perf_counter()
      summary = window_summary(pending, now - t_log, global_batch)
      pending, t_log = [], now
      overall = (step - step_start) / max(now - t_start, 1e-9)
      writer.scalars(step, {f"train/{k}": v for k, v in summary.items()})
      writer.print(progress_line(step, total_steps, summary, tasks,
                                 (total_steps - step) / overall if overall > 0 else math.inf))

    # Pictures and evaluations are not training: their time is kept out of the step time.
    t_aside = time.perf_counter()
    if image_every > 0 and (step % image_every == 0 or step == total_steps):
      writer.images(step, evaluate_lib.draw_examples(
          forward, _variables(state, backbone), examples, config, mesh, f"step {step} · "))

    if step % config.train.checkpoint_every_steps == 0 and step < total_steps:
      ckpt.save(step, state, data_iter_state=train_iter.get_state(), metadata=metadata)

    if config.train.eval_every_steps and step % config.train.eval_every_steps == 0 \
        and step < total_steps:
      results, delta = evaluate_lib.evaluate(forward, _variables(state, backbone), eval_loader,
                                             config, mesh)
      extra = {} if delta is None else {"eval/delta_m": delta}
      writer.scalars(step, {**_flat_eval(results, "eval"), **extra})
    t_log += time.perf_counter() - t_aside

  if ckpt.latest_step() != step:
    ckpt.save(step, state, data_iter_state=train_iter.get_state(), metadata=metadata,
              force=True)
  ckpt.wait_until_finished()

  # Final evaluation.
  final, delta = evaluate_lib.evaluate(forward, _variables(state, backbone), eval_loader,
                                       config, mesh)
  writer.scalars(step, {**_flat_eval(final, "eval"),
                        **({} if delta is None else {"eval/delta_m": delta})})
  writer.print(f"\nfinal evaluation at step {step}:\n{evaluate_lib.format_report(final, delta)}")
  verdict = None
  if untrained is not None:
    verdict = evaluate_lib.beats_untrained(final, untrained)
    writer.print(evaluate_lib.format_verdict(final, untrained, verdict))

  results = evaluate_lib.jsonable({
      "step": step,
      "final": final,
      "delta_m": delta,
      "untrained": untrained,
      "beats_untrained": verdict,
      "all_beat_untrained": None if verdict is None else all(verdict.values()),
      "trainable_parameters": num_trainable,
      "train_time_sec": time.perf_counter() - t_start,
  })
  if writer.enabled:
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  ckpt.close()
  writer.close()
  return results
