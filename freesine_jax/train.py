"""Training and evaluation loop (docs/design.md §3, §6).

Read `train_and_evaluate` top to bottom: build data, model and state, resume from the latest
checkpoint, train with periodic async checkpoints, evaluate, write results. Everything jitted
is a pure function of its arguments:

  train_step(state, batch, backbone) -> (state, metrics)

differentiates only 'params'; the frozen 'backbone' collection is a separate, replicated
argument with no optimizer state; 'batch_stats' is threaded through the state.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from freesine_jax import checkpointing
from freesine_jax import losses
from freesine_jax import metrics as metrics_lib
from freesine_jax import models
from freesine_jax import sharding as sharding_lib
from freesine_jax import tasks as tasks_lib
from freesine_jax.models import pretrained

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed)."""
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  batch_stats: PyTree
  rng: jax.Array


# ------------------------------------------------------------------------------------------
# Optimizer and schedule.
# ------------------------------------------------------------------------------------------


def scaled_learning_rates(config: ml_collections.ConfigDict,
                          global_batch: int) -> tuple[float, float, float]:
  """(peak lr, warmup-start lr, final lr), linearly scaled by global_batch / 512 (MTLoRA)."""
  o = config.optim
  scale = global_batch / float(o.lr_reference_batch) if o.scale_lr_with_batch else 1.0
  return o.lr_base * scale, o.warmup_lr_base * scale, o.min_lr_base * scale


def make_schedule(peak_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int,
                  total_steps: int) -> optax.Schedule:
  """Per-step linear warmup warmup_lr -> peak_lr, then cosine peak_lr -> min_lr.

  Equals timm's CosineLRScheduler with warmup_prefix=True as MTLoRA configures it: at step
  t < W, lr = warmup_lr + t (peak − warmup_lr) / W; at t >= W, lr = min_lr + ½ (peak − min_lr)
  (1 + cos(π (t − W) / (T − W))), and min_lr after T.
  """
  warmup_steps = int(warmup_steps)
  decay_steps = max(int(total_steps) - warmup_steps, 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = warmup_lr + (peak_lr - warmup_lr) * t / max(warmup_steps, 1)
    frac = jnp.clip((t - warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(t < warmup_steps, warm, cosine)

  return schedule


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for leaves with ndim >= 2 (kernels, LoRA factors, tokens); biases, norms exempt."""
  return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with decoupled, masked weight decay."""
  o = config.optim
  parts = []
  if o.grad_clip and o.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(o.grad_clip)))
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts)


# ------------------------------------------------------------------------------------------
# Model variables and state.
# ------------------------------------------------------------------------------------------


def init_variables(model: nn.Module, config: ml_collections.ConfigDict,
                   image_shape: tuple[int, ...]) -> dict[str, PyTree]:
  """model.init from config.seed; loads pretrained backbone weights when configured."""
  k_params, k_dropout, k_path = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  images = jnp.zeros(image_shape, jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      {"params": k_params, "dropout": k_dropout, "drop_path": k_path}, images)
  variables = flax.core.unfreeze(variables)
  weights = config.model.get("backbone_weights") if "model" in config else None
  if weights:
    variables = flax.core.unfreeze(pretrained.load_pretrained(
        weights, variables, models.swin_spec(config.model),
        config.model.get("backbone_layout") or None))
  for name in variables:
    if name not in ("backbone", "params", "batch_stats"):
      raise ValueError(f"model.init returned an unexpected variable collection {name!r}")
  variables.setdefault("backbone", {})
  variables.setdefault("batch_stats", {})
  return variables


def create_train_state(variables: Mapping[str, PyTree], tx: optax.GradientTransformation,
                       seed: int) -> TrainState:
  params = variables["params"]
  # A key distinct from the init keys (fold_in), used for dropout / drop-path per step.
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    batch_stats=variables.get("batch_stats", {}), rng=rng)


# ------------------------------------------------------------------------------------------
# Steps.
# ------------------------------------------------------------------------------------------


def _loss_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  """{task: weight} from config.loss_weights, which must name every task of config.tasks."""
  configured = dict(config.get("loss_weights") or {})
  missing = [task for task in config.tasks if configured.get(task) is None]
  if missing:
    raise ValueError(f"config.loss_weights has no weight for task(s) {missing} (it has "
                     f"{sorted(configured)}): give every task of config.tasks a weight, e.g. "
                     f"--config.loss_weights.{missing[0]}=1.0")
  return {task: float(configured[task]) for task in config.tasks}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, schedule: optax.Schedule,
                    mesh: jax.sharding.Mesh) -> Callable:
  """The jitted `train_step(state, batch, backbone) -> (state, metrics)`."""
  tasks = tuple(config.tasks)
  weights = _loss_weights(config)

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


FREQUENCY_PREFIX = "frequency/"


def task_frequencies(model: nn.Module, params: PyTree) -> dict[str, jax.Array]:
  """{'frequency/<task>': omega_t} of a Free Sinewich model ({} for models without a Clock Net
  or per-task frequencies, e.g. a custom config.model.factory model)."""
  if not hasattr(model, "frequencies"):
    return {}
  omegas = model.apply({"params": params}, method=model.frequencies)
  return {f"{FREQUENCY_PREFIX}{t}": omegas[i] for i, t in enumerate(model.tasks)}


def make_eval_forward(model: nn.Module) -> Callable:
  """Jitted `forward(variables, images) -> outputs` (inference mode). Build it once per model
  and pass it to `evaluate` to compile once (linen modules with dict fields are unhashable,
  so the model cannot be a static jit argument)."""
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False))


def _device_batch(batch: Mapping[str, Any], keys: Iterable[str],
                  mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """The keys the jitted step needs, as global arrays sharded along 'data'."""
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"batch lacks {missing} (has {sorted(batch)}); check config.tasks")
  return sharding_lib.shard_batch({k: batch[k] for k in keys}, mesh)


def evaluate(model: nn.Module, variables: Mapping[str, PyTree], loader: Iterable,
             config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh | None = None,
             forward: Callable | None = None) -> tuple[dict[str, dict], float | None]:
  """Jitted forward over `loader` + streaming meters; returns (results, Δm or None).

  Padding rows (batch['valid'] False) are skipped. Meter states are summed over hosts, so
  every host returns the metrics of the whole split. Δm is against config.eval.reference.
  """
  mesh = mesh or sharding_lib.make_mesh(config)
  forward = forward or make_eval_forward(model)
  tasks = tuple(config.tasks)
  num_classes = config.get("num_classes", {}) or {}
  meters = {t: metrics_lib.make_meter(t, tasks_lib.class_count(t, num_classes.get(t)))
            for t in tasks}
  variables = sharding_lib.replicate(
      {k: variables[k] for k in ("backbone", "params", "batch_stats") if k in variables}, mesh)
  max_batches = config.eval.get("max_batches") if "eval" in config else None
  for i, batch in enumerate(loader):
    if max_batches is not None and i >= max_batches:
      break
    images = _device_batch(batch, ("image",), mesh)["image"]
    outputs = sharding_lib.local_rows(forward(variables, images), mesh)
    valid = batch.get("valid")
    for t in tasks:
      meters[t].update(metrics_lib.postprocess(t, outputs[t]), batch[t], valid=valid)
  if jax.process_count() > 1:
    for t in tasks:
      gathered = multihost_utils.process_allgather(meters[t].state())
      meters[t].reset()
      meters[t].merge({k: np.sum(v, axis=0) for k, v in gathered.items()})
  results = {t: meters[t].result() for t in tasks}
  reference = config.eval.get("reference") if "eval" in config else None
  delta = None
  if reference:
    ref = {t: dict(m) for t, m in dict(reference).items()}
    if any(t in ref for t in results):
      delta = metrics_lib.delta_m(results, ref)
  return results, delta


def beats_untrained(final: Mapping[str, Mapping[str, Any]],
                    untrained: Mapping[str, Mapping[str, Any]]) -> dict[str, bool]:
  """Per task: is the headline metric strictly better than the untrained model's?"""
  verdict = {}
  for task, metrics in final.items():
    spec = tasks_lib.get_task(task)
    m = float(metrics[spec.headline_metric])
    u = float(untrained.get(task, {}).get(spec.headline_metric, math.nan))
    if math.isnan(m):
      verdict[task] = False
    elif math.isnan(u):
      verdict[task] = True
    else:
      verdict[task] = m > u if spec.higher_is_better else m < u
  return verdict


# ------------------------------------------------------------------------------------------
# Logging helpers.
# ------------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return _jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


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


class _Writer:
  """metrics.jsonl + TensorBoard scalars + stdout, on process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # TensorBoard logging is optional.
        self._tb = None

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(_jsonable({"step": int(step), **values})) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def print(self, text: str) -> None:
    if self.enabled:
      print(text, flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


# ------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """freesine_jax.models.build_model(config), or config.model.factory ('pkg.module:fn', called
  with the config) to train a custom linen model that follows the same variable contract."""
  factory = config.model.get("factory") if "model" in config else None
  if factory:
    module_name, sep, fn_name = str(factory).partition(":")
    if not sep or not fn_name:
      raise ValueError(f"config.model.factory={factory!r} must look like 'pkg.module:function'")
    return getattr(importlib.import_module(module_name), fn_name)(config)
  return models.build_model(config)


def _num_train_examples(config: ml_collections.ConfigDict, loader: Any) -> int:
  n = config.train.get("num_train_examples")
  if n:
    return int(n)
  n = getattr(loader, "num_examples", None)
  if n:
    return int(n)
  from freesine_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return len(pipeline.get_data_source(config.dataset, config.dataset.get("train_split",
                                                                         "train")))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       model: nn.Module | None = None,
                       create_train_loader: Callable | None = None,
                       create_eval_loader: Callable | None = None) -> dict[str, Any]:
  """Trains, checkpoints, evaluates; writes workdir/{metrics.jsonl,tb,checkpoints,results.json}.

  model / create_*_loader default to freesine_jax.models.build_model(config) and
  freesine_jax.data.pipeline.create_{train,eval}_loader(config).
  Returns the dict written to results.json.
  """
  writer = _Writer(workdir)
  tasks = tuple(config.tasks)
  for t in tasks:
    tasks_lib.get_task(t)
  _loss_weights(config)  # fails on a missing weight before any data or model is built

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
  if config.train.get("max_steps"):
    total_steps = min(total_steps, int(config.train.max_steps))
  warmup_steps = int(config.train.warmup_epochs * steps_per_epoch)

  # Model, optimizer, state.
  mesh = sharding_lib.make_mesh(config)
  sharding_lib.check_batch_size(global_batch, mesh)
  if model is None:
    model = build_model(config)
  height, width = config.dataset.image_size
  variables = init_variables(model, config, (1, int(height), int(width), 3))
  forward = make_eval_forward(model)
  peak_lr, warmup_lr, min_lr = scaled_learning_rates(config, global_batch)
  schedule = make_schedule(peak_lr, warmup_lr, min_lr, warmup_steps, schedule_steps)
  tx = make_optimizer(config, schedule)
  state = sharding_lib.replicate(create_train_state(variables, tx, config.seed), mesh)
  backbone = sharding_lib.replicate(variables["backbone"], mesh)
  backbone_hash = checkpointing.tree_hash(variables["backbone"])
  num_trainable = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(
      variables["params"]))
  num_frozen = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(backbone))
  writer.print(f"tasks {', '.join(tasks)} | {num_trainable:,} trainable / {num_frozen:,} "
               f"frozen parameters | {jax.device_count()} device(s), "
               f"{jax.process_count()} process(es)")
  writer.print(f"{steps_per_epoch} steps/epoch, {total_steps} steps (schedule spans "
               f"{schedule_steps}, warmup {warmup_steps}), global batch {global_batch}, "
               f"lr {peak_lr:.3g} (warmup from {warmup_lr:.3g}, min {min_lr:.3g})")

  # Untrained baseline (step-0 model), cached in the workdir so a resumed run reuses it.
  untrained = None
  untrained_path = os.path.join(workdir, "untrained_eval.json")
  # The cached baseline is valid only for the same backbone, model, tasks and eval data.
  config_json_text = config.to_json_best_effort()
  config_json = json.loads(config_json_text)
  baseline_key = hashlib.sha256(json.dumps(
      [backbone_hash] + [config_json.get(k) for k in
                         ("seed", "tasks", "num_classes", "model", "dataset")],
      sort_keys=True, default=str).encode()).hexdigest()
  if config.train.get("untrained_baseline", True):
    if os.path.exists(untrained_path):
      with open(untrained_path, encoding="utf-8") as f:
        cached = json.load(f)
      if cached.get("key") == baseline_key:
        untrained = cached["results"]
    if untrained is None:
      writer.print("evaluating the untrained model (baseline)...")
      untrained, _ = evaluate(model, variables, eval_loader, config, mesh, forward)
      if writer.enabled:
        with open(untrained_path, "w", encoding="utf-8") as f:
          json.dump(_jsonable({"key": baseline_key, "results": untrained}), f)
      writer.scalars(0, _flat_eval(untrained, "untrained"))

  # Resume.
  ckpt = checkpointing.Checkpointer(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      save_interval_steps=config.train.checkpoint_every_steps,
      max_to_keep=config.train.max_checkpoints_to_keep,
      async_save=config.train.get("async_checkpointing", True))
  train_iter = iter(train_loader)
  metadata = {"backbone_hash": backbone_hash, "config": config_json_text}
  latest = ckpt.latest_step()
  if latest is not None:
    saved_meta = ckpt.read_metadata(latest)
    checkpointing.check_compatible(saved_meta, config, ckpt.directory, latest)
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
  ckpt_every = max(int(config.train.checkpoint_every_steps), 1)
  eval_every = int(config.train.get("eval_every_steps") or 0)
  pending = []
  t_start, step_start = time.perf_counter(), step
  t_log, step_log = t_start, step
  while step < total_steps:
    try:
      batch = next(train_iter)
    except StopIteration as e:
      raise RuntimeError(
          f"the train loader ended at step {step}; create_train_loader must repeat "
          "indefinitely") from e
    state, step_metrics = train_step(state, _device_batch(batch, batch_keys, mesh), backbone)
    step += 1
    pending.append(step_metrics)

    if step % log_every == 0 or step == total_steps:
      pending = jax.device_get(pending)
      # Losses etc. are averaged over the logging window; frequencies are the values at `step`.
      summary = {k: float(pending[-1][k]) if k.startswith(FREQUENCY_PREFIX)
                 else float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
      pending = []
      now = time.perf_counter()
      rate = (step - step_log) / max(now - t_log, 1e-9)
      t_log, step_log = now, step
      overall = (step - step_start) / max(now - t_start, 1e-9)
      eta = (total_steps - step) / overall if overall > 0 else math.inf
      summary["steps_per_sec"] = rate
      writer.scalars(step, {f"train/{k}": v for k, v in summary.items()})
      per_task = " ".join(f"{t} {summary[f'loss/{t}']:.4f}" for t in tasks)
      freqs = [summary[k] for k in (f"{FREQUENCY_PREFIX}{t}" for t in tasks) if k in summary]
      freq_text = f" | ω {' '.join(f'{f:.3f}' for f in freqs)}" if freqs else ""
      writer.print(f"step {step:>{len(str(total_steps))}}/{total_steps} "
                   f"[{100.0 * step / total_steps:5.1f}%] | loss {summary['loss']:.4f} "
                   f"({per_task}) | lr {summary['lr']:.3e}{freq_text} | {rate:.2f} steps/s | "
                   f"ETA {_fmt_duration(eta)}")

    if step % ckpt_every == 0 and step < total_steps:
      ckpt.save(step, state, data_iter_state=train_iter.get_state(), metadata=metadata)

    if eval_every and step % eval_every == 0 and step < total_steps:
      results, delta = evaluate(model, _variables(state, backbone), eval_loader, config, mesh,
                               forward)
      extra = {} if delta is None else {"eval/delta_m": delta}
      writer.scalars(step, {**_flat_eval(results, "eval"), **extra})

  if ckpt.latest_step() != step:
    ckpt.save(step, state, data_iter_state=train_iter.get_state(), metadata=metadata,
              force=True)
  ckpt.wait_until_finished()

  # Final evaluation.
  final, delta = evaluate(model, _variables(state, backbone), eval_loader, config, mesh,
                               forward)
  writer.scalars(step, {**_flat_eval(final, "eval"),
                        **({} if delta is None else {"eval/delta_m": delta})})
  writer.print(f"\nfinal evaluation at step {step}:\n{metrics_lib.format_table(final)}")
  if delta is not None:
    writer.print(f"Δm vs config.eval.reference: {delta:+.2f}%")
  verdict = None
  if untrained is not None:
    verdict = beats_untrained(final, untrained)
    for t in tasks:
      spec = tasks_lib.get_task(t)
      key = spec.headline_metric
      writer.print(f"  {t:<12} {key} {final[t][key]:.4f} vs untrained "
                   f"{untrained[t][key]:.4f} ({'higher' if spec.higher_is_better else 'lower'}"
                   f" is better): {'beats' if verdict[t] else 'does NOT beat'} the untrained "
                   "model")
    writer.print("all tasks beat the untrained model: "
                 f"{'YES' if all(verdict.values()) else 'NO'}")

  results = _jsonable({
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


def _variables(state: TrainState, backbone: PyTree) -> dict[str, PyTree]:
  return {"backbone": backbone, "params": state.params, "batch_stats": state.batch_stats}
