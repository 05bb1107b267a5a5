"""Non-finite losses and gradients: stop training naming the step and the task(s), or skip the step.

A NaN or Inf in one step's loss or gradient poisons the parameters for good, and the checkpoints
written after it. The train step therefore reports, per step, which task's loss, or the gradient
of that task's own parameters (its decoder head: the leaves only its output depends on,
`task_parameter_leaves`, found once when the step is built: train.traced_forward), is
non-finite, and whether any parameter gradient is. Both come from what the step computes anyway
(per-task losses, the one backward pass): no second gradient.
A task's output gradient reaches its own head's parameter gradient before the shared network's,
so a non-finite shared gradient with every task's loss and head gradient finite arose inside the
shared network's backward pass, and is reported as such. The loop checks these flags on the host whenever it is about to do something with
the state (log, checkpoint, evaluate, draw, finish), so a poisoned state is never saved:

  config.train.on_nonfinite = 'stop'  (default) the run ends with one line (errors.UserError:
                                      exit code 2 on the command line) naming the first bad step
                                      and task(s); the checkpoints on disk are all from before it.
  config.train.on_nonfinite = 'skip'  the step leaves parameters, optimizer and BatchNorm state
                                      unchanged (the data and the step counter move on) and a
                                      line names the step and task(s).
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.extend.core as jex_core
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


def _dependence_of_outputs(jaxpr, inputs: Sequence[int]) -> list[int]:
  """Per output variable of `jaxpr`, the bitmask of `inputs` (one per input variable) it is
  computed from. Calls whose body maps inputs to outputs one to one (jit, remat, custom
  derivatives) are followed; any other equation (loops, conditionals) makes each of its outputs
  depend on all of its inputs, which can only make a leaf look shared, never task-specific."""
  deps = dict(zip(jaxpr.invars, inputs))
  read = lambda v: 0 if isinstance(v, jex_core.Literal) else deps.get(v, 0)
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    subs = [j for j in jex_core.jaxprs_in_params(eqn.params)
            if len(j.invars) == len(eqn.invars) and len(j.outvars) == len(eqn.outvars)]
    if len(subs) == 1:
      outs = _dependence_of_outputs(subs[0], ins)
    else:
      outs = [functools.reduce(operator.or_, ins, 0)] * len(eqn.outvars)
    deps.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def task_parameter_leaves(closed: jex_core.ClosedJaxpr, outputs: PyTree, num_params: int,
                          select: Callable[[PyTree], Mapping[str, PyTree]] = lambda o: o
                          ) -> dict[str, tuple[int, ...]]:
  """{task: indices (in tree_leaves(params) order) of the parameter leaves only that task's
  output depends on}, from the dataflow of a trace (jax.make_jaxpr; nothing is computed):
  `closed` takes the parameter leaves first (num_params of them) and returns the leaves of
  `outputs` (its tree, e.g. the shapes make_jaxpr returns); select(that tree) picks the
  {task: output} mapping out of it. Leaves that feed several tasks are in none."""
  inputs = [1 << i if i < num_params else 0 for i in range(len(closed.jaxpr.invars))]
  masks = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(outputs),
                                       _dependence_of_outputs(closed.jaxpr, inputs))
  per_task = {task: functools.reduce(operator.or_, jax.tree_util.tree_leaves(sub), 0)
              for task, sub in select(masks).items()}
  own = {}
  for task, mask in per_task.items():
    others = functools.reduce(operator.or_, (m for t, m in per_task.items() if t != task), 0)
    own[task] = tuple(i for i in range(num_params) if (mask & ~others) >> i & 1)
  return own


def step_flags(per_task_loss: Mapping[str, jax.Array], grads: PyTree,
               task_leaves: Mapping[str, Sequence[int]]) -> dict[str, jax.Array]:
  """{'nonfinite/<task>': its loss or the gradient of its own parameters is non-finite,
  'nonfinite/gradient': some parameter gradient is non-finite} (boolean scalars, in the step).

  task_leaves: task_parameter_leaves of the model (indices into tree_leaves(grads))."""
  leaves = jax.tree_util.tree_leaves(grads)
  flags = {}
  for task, loss in per_task_loss.items():
    own = [leaves[i] for i in task_leaves.get(task, ())]
    flags[PREFIX + task] = ~jnp.isfinite(loss) | ~_all_finite(own)
  flags[GRADIENT] = ~_all_finite(grads)
  return flags


def step_is_finite(flags: Mapping[str, jax.Array]) -> jax.Array:
  return ~jnp.any(jnp.stack(list(flags.values())))


def keep_if_finite(finite: jax.Array, updated: PyTree, previous: PyTree) -> PyTree:
  """`updated` if `finite`, else `previous`, leaf by leaf (a skipped step changes nothing)."""
  return jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), updated, previous)


def describe(step: int, flags: Mapping[str, Any], metrics: Mapping[str, Any],
             tasks: Sequence[str]) -> str:
  """'step 17: non-finite loss or loss gradient of task(s) depth (inf)' (its loss or its own
  parameters' gradient), or of the shared parameters' gradient; tasks in `tasks` order."""
  tasks = [t for t in tasks if bool(flags.get(PREFIX + t, False))]
  if tasks:
    values = ", ".join(f"{t} ({float(metrics[f'loss/{t}']):.4g})" if f"loss/{t}" in metrics
                       else t for t in tasks)
    return f"step {step}: non-finite loss or loss gradient of task(s) {values}"
  return (f"step {step}: non-finite parameter gradient (every task's loss and task-specific "
          "parameter gradients are finite: the shared network)")


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
