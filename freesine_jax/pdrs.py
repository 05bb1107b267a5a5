"""FAAR's performance-driven rank selection (PDRS): LoRA ranks chosen while training.

Every LoRA pair of the model (a layer's shared LoRA 'lora_a' (C_in, R) / 'lora_b' (R, C_out),
and MTLoRA's task LoRA 'task_lora/a' (T, C_in, R) / 'task_lora/b' (T, R, C_out), one rank set
per task) trains with nested rank dropout: each step, per rank set, a prefix of b ranks in the
set's order is kept, b ~ U{1..cap} (with probability `explore`, U{1..R}); evaluation uses all
`cap` ranks. Each rank i is scored per step from the (clipped) gradient,

    s_i = ½ (|Σ_c A[c, i] ∂L/∂A[c, i]| + |Σ_o B[i, o] ∂L/∂B[i, o]|),

clipped at `clip` x the set's (lower) median and smoothed by an EMA (β). Every `shrink_every`
steps (an epoch in FAAR) the set's cap shrinks to max(floor, min(cap, K + margin)), K the
fewest best ranks whose scores reach the share ρ of the set's total; the best ranks come first
in the order, and the others are zeroed for good.

Shapes stay static under jit: ranks are never removed, only masked (factor columns of A and rows
of B multiplied by 0/1), and the order is a per-rank `position` instead of a permutation of the
parameters (FAAR's code permutes A, B and the scores, but not AdamW's moments; keeping the
parameters in place keeps the moments with their ranks). The state lives in the optimizer state
(`transformation`, wrapped around AdamW after the gradient clipping as in FAAR's step), so it is
checkpointed and resumed with it; the train step reads it for the masks (`find_state`,
`nested_masks`). docs/method.md ("Baselines", FAAR's rank selection) gives the choices and
where we depart from FAAR's code.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from freesine_jax import errors

PyTree = Any
Path = tuple[str, ...]

# (A leaf's name, B leaf's name, the name of the module holding them or None for any module).
PAIRS = (("lora_a", "lora_b", None), ("a", "b", "task_lora"))


@dataclasses.dataclass(frozen=True)
class PdrsSpec:
  """config.train.pdrs (configs/base.py)."""
  rho: float = 0.95
  beta: float = 0.98
  clip: float = 100.0
  margin: int = 1
  floor: int = 2
  explore: float = 0.0
  shrink_every: int = 1

  def __post_init__(self):
    if not 0.0 < self.rho <= 1.0:
      raise ValueError(f"config.train.pdrs.rho must be in (0, 1], got {self.rho}")
    if not 0.0 <= self.beta < 1.0:
      raise ValueError(f"config.train.pdrs.beta must be in [0, 1), got {self.beta}")
    if self.clip <= 0:
      raise ValueError(f"config.train.pdrs.clip must be > 0, got {self.clip}")
    if self.margin < 0 or self.floor < 1:
      raise ValueError(f"config.train.pdrs: margin >= 0 and floor >= 1, got margin "
                       f"{self.margin}, floor {self.floor}")
    if not 0.0 <= self.explore <= 1.0:
      raise ValueError(f"config.train.pdrs.explore must be in [0, 1], got {self.explore}")
    if self.shrink_every < 1:
      raise ValueError(f"the PDRS shrink interval must be >= 1 step, got {self.shrink_every}")


def spec_from_config(config: ml_collections.ConfigDict,
                     steps_per_epoch: int | None) -> PdrsSpec | None:
  """config.train.pdrs as a PdrsSpec (None unless enabled); shrink_every_steps 0 means once per
  epoch, `steps_per_epoch` steps."""
  c = config.train.pdrs
  if not c.enabled:
    return None
  every = int(c.shrink_every_steps) or int(steps_per_epoch or 0)
  if not every:
    raise errors.UserError("config.train.pdrs.enabled: set config.train.pdrs."
                           "shrink_every_steps (the epoch length is not known here)")
  return PdrsSpec(rho=float(c.rho), beta=float(c.beta), clip=float(c.clip),
                  margin=int(c.margin), floor=int(c.floor), explore=float(c.explore),
                  shrink_every=every)


class RankSet(NamedTuple):
  """One LoRA pair's ranks; leading axes (e.g. tasks) are independent sets."""
  score: jax.Array  # (..., R) float32: EMA of the per-step importance
  position: jax.Array  # (..., R) int32: place of each rank in the nested order (0 first)
  cap: jax.Array  # (...) int32: ranks kept; those at position >= cap are zero for good


class PdrsState(NamedTuple):
  count: jax.Array  # optimizer steps taken
  ranks: PyTree  # nested dict, a RankSet at each pair's A path
  inner: optax.OptState


def lora_pairs(params: PyTree) -> dict[Path, Path]:
  """{A leaf's path: B leaf's path} of every LoRA pair in `params`."""
  flat = traverse_util.flatten_dict(params)
  pairs = {}
  for path in flat:
    for a_name, b_name, module in PAIRS:
      if path[-1] == a_name and (module is None or (len(path) > 1 and path[-2] == module)):
        b_path = path[:-1] + (b_name,)
        if b_path in flat:
          pairs[path] = b_path
  return pairs


def _leaf(tree: PyTree, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def init_ranks(params: PyTree) -> PyTree:
  """Every rank kept, in slot order, with zero scores."""
  sets = {}
  for a_path in lora_pairs(params):
    shape = jnp.shape(_leaf(params, a_path))
    lead, rank = shape[:-2], shape[-1]
    sets[a_path] = RankSet(jnp.zeros((*lead, rank), jnp.float32),
                           jnp.broadcast_to(jnp.arange(rank, dtype=jnp.int32), (*lead, rank)),
                           jnp.full(lead, rank, jnp.int32))
  return traverse_util.unflatten_dict(sets)


def _flat_sets(ranks: PyTree) -> dict[Path, RankSet]:
  return traverse_util.flatten_dict(ranks, is_leaf=lambda _, x: isinstance(x, RankSet))


def rank_scores(a, grad_a, b, grad_b, clip: float) -> jax.Array:
  """The step's per-rank importance (..., R) of a pair A (..., C_in, R), B (..., R, C_out)."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  s_a = jnp.abs(jnp.sum(f32(a) * f32(grad_a), axis=-2))
  s_b = jnp.abs(jnp.sum(f32(b) * f32(grad_b), axis=-1))
  s = jnp.nan_to_num(0.5 * (s_a + s_b), nan=0.0, posinf=0.0, neginf=0.0)
  rank = s.shape[-1]
  median = jnp.sort(s, axis=-1)[..., (rank - 1) // 2]  # the lower median, as torch.median
  return jnp.minimum(s, median[..., None] * clip + 1e-12)


def shrink(rs: RankSet, spec: PdrsSpec) -> RankSet:
  """The cap and order after a shrink: the kept ranks, best first, are the fewest whose scores
  reach the share rho of the kept ranks' total, plus `margin`, at least `floor`, at most the
  current cap. A set whose kept scores sum to 0 is left as it is."""
  alive = rs.position < rs.cap[..., None]
  live_score = jnp.where(alive, rs.score, 0.0)
  # Best first; ranks already dropped (key -1) last; ties in slot order.
  order = jnp.argsort(jnp.where(alive, -rs.score, 1.0), axis=-1, stable=True)
  ranked = jnp.take_along_axis(live_score, order, axis=-1)
  total = jnp.sum(ranked, axis=-1, keepdims=True)
  share = jnp.cumsum(ranked, axis=-1) / jnp.maximum(total, 1e-12)
  reached = share >= spec.rho
  k = jnp.where(jnp.any(reached, axis=-1), jnp.argmax(reached, axis=-1) + 1, rs.cap)
  keep = jnp.minimum(rs.cap, jnp.maximum(spec.floor, k + spec.margin)).astype(jnp.int32)
  position = jnp.argsort(order, axis=-1).astype(jnp.int32)
  act = total[..., 0] > 0
  return RankSet(rs.score, jnp.where(act[..., None], position, rs.position),
                 jnp.where(act, keep, rs.cap))


def kept_masks(ranks: PyTree) -> dict[Path, jax.Array]:
  """{A path: (..., R) 1 for ranks kept (position < cap), 0 for those dropped for good}."""
  return {p: (rs.position < rs.cap[..., None]).astype(jnp.float32)
          for p, rs in _flat_sets(ranks).items()}


def nested_masks(ranks: PyTree, key: jax.Array, explore: float) -> dict[Path, jax.Array]:
  """This step's nested rank dropout: per rank set, the first b ranks of its order,
  b ~ U{1..cap} (U{1..R} with probability `explore`)."""
  masks = {}
  for i, (path, rs) in enumerate(sorted(_flat_sets(ranks).items())):
    k_b, k_explore = jax.random.split(jax.random.fold_in(key, i))
    rank = rs.position.shape[-1]
    u = jax.random.uniform(k_b, rs.cap.shape)
    top = jnp.where(jax.random.uniform(k_explore, rs.cap.shape) < explore, rank, rs.cap)
    b = jnp.minimum(jnp.floor(u * top).astype(jnp.int32) + 1, top)
    masks[path] = (rs.position < b[..., None]).astype(jnp.float32)
  return masks


def masked(params: PyTree, masks: dict[Path, jax.Array]) -> PyTree:
  """The parameters the forward pass sees: A's rank columns and B's rank rows multiplied by
  masks[A path] (..., R), so the ranks outside the masks give zero output and receive zero
  gradient."""
  pairs = lora_pairs(params)
  flat = traverse_util.flatten_dict(params)
  for a_path, mask in masks.items():
    b_path = pairs[a_path]
    a, b = flat[a_path], flat[b_path]
    flat[a_path] = a * mask[..., None, :].astype(a.dtype)
    flat[b_path] = b * mask[..., :, None].astype(b.dtype)
  return traverse_util.unflatten_dict(flat)


def transformation(spec: PdrsSpec, inner: optax.GradientTransformation
                   ) -> optax.GradientTransformation:
  """`inner` (AdamW), plus the rank scores, the shrinks every spec.shrink_every steps, and the
  dropped ranks held at exactly zero (their update is minus the parameter)."""

  def init(params):
    return PdrsState(jnp.zeros((), jnp.int32), init_ranks(params), inner.init(params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("PDRS needs the parameters (optax update(..., params))")
    pairs = lora_pairs(params)
    flat_p = traverse_util.flatten_dict(params)
    flat_g = traverse_util.flatten_dict(grads)
    sets = _flat_sets(state.ranks)
    scored = {}
    for a_path, b_path in pairs.items():
      rs = sets[a_path]
      s = rank_scores(flat_p[a_path], flat_g[a_path], flat_p[b_path], flat_g[b_path],
                      spec.clip)
      scored[a_path] = rs._replace(score=spec.beta * rs.score + (1.0 - spec.beta) * s)
    updates, inner_state = inner.update(grads, state.inner, params)
    count = state.count + 1
    now = count % spec.shrink_every == 0
    shrunk = {p: jax.tree.map(lambda new, old: jnp.where(now, new, old), shrink(rs, spec), rs)
              for p, rs in scored.items()}
    ranks = traverse_util.unflatten_dict(shrunk)
    # Dropped ranks: params + updates == 0 exactly.
    flat_u = traverse_util.flatten_dict(updates)
    for a_path, mask in kept_masks(ranks).items():
      b_path = pairs[a_path]
      for path, m in ((a_path, mask[..., None, :]), (b_path, mask[..., :, None])):
        flat_u[path] = jnp.where(m > 0, flat_u[path], -flat_p[path]).astype(flat_u[path].dtype)
    return traverse_util.unflatten_dict(flat_u), PdrsState(count, ranks, inner_state)

  return optax.GradientTransformation(init, update)


def find_state(opt_state: PyTree) -> PdrsState | None:
  """The PdrsState inside an optimizer state (optax.chain's tuple), or None without PDRS."""
  if isinstance(opt_state, PdrsState):
    return opt_state
  if isinstance(opt_state, tuple):
    for part in opt_state:
      found = find_state(part)
      if found is not None:
        return found
  return None


def kept_ranks(ranks: PyTree) -> dict[str, list]:
  """{'/'-joined A path: cap (an int, or a list per leading index, e.g. per task)}."""
  return {"/".join(p): jax.device_get(rs.cap).tolist() for p, rs in
          sorted(_flat_sets(ranks).items())}


def kept_count(params: PyTree, ranks: PyTree) -> jax.Array:
  """Parameters of the LoRA pairs' kept ranks (traceable: the caps may be traced)."""
  pairs, sets = lora_pairs(params), _flat_sets(ranks)
  total = jnp.zeros((), jnp.int32)
  for a_path, b_path in pairs.items():
    per_rank = jnp.shape(_leaf(params, a_path))[-2] + jnp.shape(_leaf(params, b_path))[-1]
    total = total + per_rank * jnp.sum(sets[a_path].cap)
  return total


def trained_count(params: PyTree, ranks: PyTree) -> tuple[int, int]:
  """(parameters of the LoRA pairs as built, those of the ranks kept): a pair A (..., C_in, R),
  B (..., R, C_out) counts (C_in + C_out) per kept rank of each set."""
  built = 0
  for a_path, b_path in lora_pairs(params).items():
    a_shape, b_shape = jnp.shape(_leaf(params, a_path)), jnp.shape(_leaf(params, b_path))
    built += (a_shape[-2] + b_shape[-1]) * a_shape[-1] * math.prod(a_shape[:-2])
  return built, int(kept_count(params, ranks))


def saved_ranks(saved_opt_state: Any) -> PyTree | None:
  """The rank sets in an optimizer state restored without a target (nested dicts and lists, as
  checkpointing.Checkpointer.restore_saved_state gives it), or None without PDRS."""
  if isinstance(saved_opt_state, dict):
    if set(saved_opt_state) == set(PdrsState._fields):
      return _rank_sets(saved_opt_state["ranks"])
    parts = saved_opt_state.values()
  elif isinstance(saved_opt_state, (list, tuple)):
    parts = saved_opt_state
  else:
    return None
  for part in parts:
    found = saved_ranks(part)
    if found is not None:
      return found
  return None


def _rank_sets(tree: dict) -> dict:
  if set(tree) == set(RankSet._fields):
    return RankSet(**{k: jnp.asarray(tree[k]) for k in RankSet._fields})
  return {k: _rank_sets(v) for k, v in tree.items()}
