"""Non-finite losses and gradients: stop training naming the step and the task(s), or skip the step.

A NaN or Inf in one step's loss or gradient poisons the parameters for good, and the checkpoints
written after it. The train step therefore reports, per step, which task's loss (or the
gradient of that loss w.r.t. the task's output) is non-finite, and whether any parameter
gradient is. The loop checks these flags on the host whenever it is about to do something with
the state (log, checkpoint, evaluate, draw, finish), so a poisoned state is never saved:

  config.train.on_nonfinite = 'stop'  (default) the run ends with one line (errors.UserError:
                                      exit code 2 on the command line) naming the first bad step
                                      and task(s); the checkpoints on disk are all from before it.
  config.train.on_nonfinite = 'skip'  the step leaves parameters, optimizer and BatchNorm state
                                      unchanged (the data and the step counter move on) and a
                                      line names the step and task(s).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from freesine_jax import errors

PyTree = Any
MODES = ("stop", "skip")
PREFIX = "nonfinite/"
GRADIENT = PREFIX + "gradient"  # any parameter gradient is non-finite


class NonFiniteError(errors.UserError):
  """Training met a non-finite loss or gradient (config.train.on_nonfinite='stop')."""


def check_mode(config: ml_collections.ConfigDict) -> str:
  mode = config.train.on_nonfinite
  if mode not in MODES:
    raise errors.UserError(f"config.train.on_nonfinite={mode!r}{errors.did_you_mean(mode, MODES)}"
                           f"; use one of {', '.join(MODES)}")
  return mode


def _all_finite(tree: PyTree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves \
      else jnp.array(True)


def output_gradient_nonfinite(loss_of_outputs: Callable[[Mapping[str, jax.Array]], jax.Array],
                              outputs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """{task: 1 if d(loss)/d(task's output) has a NaN/Inf else 0} (int32, so micro-batches add)."""
  output_grads = jax.grad(loss_of_outputs)(outputs)
  return {t: (~_all_finite(g)).astype(jnp.int32) for t, g in output_grads.items()}


def step_flags(per_task_loss: Mapping[str, jax.Array],
               output_gradient_bad: Mapping[str, jax.Array],
               grads: PyTree) -> dict[str, jax.Array]:
  """{'nonfinite/<task>': its loss or d(loss)/d(its output) is non-finite,
  'nonfinite/gradient': some parameter gradient is non-finite} (boolean scalars, in the step).

  output_gradient_bad: per task, a count (over micro-batches) of non-finite output gradients
  (output_gradient_nonfinite)."""
  flags = {}
  for task, loss in per_task_loss.items():
    bad = ~jnp.isfinite(loss)
    if task in output_gradient_bad:
      bad = bad | (output_gradient_bad[task] > 0)
    flags[PREFIX + task] = bad
  flags[GRADIENT] = ~_all_finite(grads)
  return flags


def step_is_finite(flags: Mapping[str, jax.Array]) -> jax.Array:
  return ~jnp.any(jnp.stack(list(flags.values())))


def keep_if_finite(finite: jax.Array, updated: PyTree, previous: PyTree) -> PyTree:
  """`updated` if `finite`, else `previous`, leaf by leaf (a skipped step changes nothing)."""
  return jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), updated, previous)


def describe(step: int, flags: Mapping[str, Any], metrics: Mapping[str, Any],
             tasks: Sequence[str]) -> str:
  """'step 17: non-finite loss or loss gradient of task(s) depth (inf)', or of the shared
  parameters' gradient; tasks in `tasks` order."""
  tasks = [t for t in tasks if bool(flags.get(PREFIX + t, False))]
  if tasks:
    values = ", ".join(f"{t} ({float(metrics[f'loss/{t}']):.4g})" if f"loss/{t}" in metrics
                       else t for t in tasks)
    return f"step {step}: non-finite loss or loss gradient of task(s) {values}"
  return (f"step {step}: non-finite parameter gradient (every task's loss and output gradient "
          "are finite: the shared network)")


class Monitor:
  """Host side: holds each step's flags until the loop is about to use the state, then checks
  them (stop: NonFiniteError; skip: one line per skipped step)."""

  def __init__(self, config: ml_collections.ConfigDict, total_steps: int,
               print_fn: Callable[[str], None]):
    self.mode = check_mode(config)
    self._tasks = tuple(config.tasks)
    t = config.train
    self._every = [int(n) for n in (t.log_every_steps, t.checkpoint_every_steps,
                                     t.eval_every_steps, t.image_every_steps) if n and n > 0]
    self._total_steps = int(total_steps)
    self._print = print_fn
    self._held: list[tuple[int, dict, dict]] = []

  def after_step(self, step: int, step_metrics: Mapping[str, Any], checkpointer: Any
                 ) -> dict[str, Any]:
    """Takes the flags out of `step_metrics` (returned without them) and checks every held step
    when `step` is one at which the loop logs, saves, evaluates, draws or ends."""
    flags = {k: v for k, v in step_metrics.items() if k.startswith(PREFIX)}
    rest = {k: v for k, v in step_metrics.items() if not k.startswith(PREFIX)}
    self._held.append((step, flags, {k: v for k, v in rest.items() if k.startswith("loss/")}))
    if step >= self._total_steps or any(step % n == 0 for n in self._every):
      self.check(checkpointer)
    return rest

  def check(self, checkpointer: Any) -> None:
    held, self._held = jax.device_get(self._held), []
    for step, flags, losses in held:
      if not any(bool(np.asarray(v)) for v in flags.values()):
        continue
      what = describe(step, flags, losses, self._tasks)
      if self.mode == "skip":
        self._print(f"{what}; step skipped (parameters unchanged; "
                    "config.train.on_nonfinite='skip')")
        continue
      checkpointer.wait_until_finished()
      last = checkpointer.latest_step()
      kept = (f"the last good checkpoint is step {last} in {checkpointer.directory} (a rerun "
              "resumes from it)" if last is not None else "no checkpoint was written before it")
      raise NonFiniteError(
          f"{what}; training stopped, {kept}; lower the learning rate or check the data, or set "
          "--config.train.on_nonfinite=skip to skip such steps")
