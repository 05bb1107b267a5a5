"""Device mesh and shardings: batches over ('data', 'fsdp'), arrays placed by rules on logical axes.

The mesh (config.mesh) has two named axes:
  'data'  pure data parallelism: each device holds a slice of the batch and whole arrays;
  'fsdp'  data parallelism whose devices also split the parameters, the optimizer state and the
          frozen backbone (FSDP / ZeRO-3): stored sharded, all-gathered for the forward pass,
          gradients reduce-scattered back by the SPMD partitioner.
Batches are split along their leading axis over both axes, so every device sees
global_batch / num_devices rows; each host's input pipeline yields only its own rows, which
`shard_batch` assembles into global arrays.

Every array of the train state (params, Adam's moments, BatchNorm statistics) and of the frozen
backbone is placed by one rule that reads nothing but its shape: its dimensions get logical names
(`logical_axes`) and config.mesh.rules say which mesh axes split which name (`partition_spec`).
So the optimizer's moments land exactly where their parameters are, for any model that follows
the model contract, without annotating it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from freesine_jax import errors

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
BATCH_AXES = MESH_AXES  # batches are split over every axis
LOGICAL_AXES = ("out", "in", "leading", "vector")

PyTree = Any


# ----------------------------------------------------------------------------- the mesh


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """(data, fsdp) sizes from config.mesh for `num_devices` devices; -1 takes the rest."""
  sizes = {DATA_AXIS: int(config.mesh.data), FSDP_AXIS: int(config.mesh.fsdp)}
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise errors.UserError(f"config.mesh.{bad[0]}={sizes[bad[0]]}: an axis size is a positive "
                           "number, or -1 for the devices the other axes leave")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise errors.UserError(f"config.mesh.{free[0]} and config.mesh.{free[1]} are both -1; at "
                           "most one axis takes the devices the others leave")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  shown = " x ".join(f"{a}={s}" for a, s in sizes.items())
  if free:
    if num_devices % fixed:
      raise errors.UserError(f"config.mesh {shown}: {num_devices} device(s) do not split into "
                             f"groups of {fixed}; use axis sizes whose product divides "
                             f"{num_devices}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise errors.UserError(f"config.mesh {shown} needs {fixed} devices, but the mesh has "
                           f"{num_devices}; set one axis to -1 or use sizes whose product is "
                           f"{num_devices}")
  return tuple(sizes[a] for a in MESH_AXES)


def _process_contiguous(devices: np.ndarray) -> np.ndarray:
  """The devices reordered (stably) so that each process's devices are consecutive, in process
  order, along the flattened mesh: then host p holds rows [p*b, (p+1)*b) of every batch, which
  is what it loads (data/pipeline.py). A no-op on one host and where make_mesh already does so."""
  flat = devices.reshape(-1)
  order = sorted(range(flat.size), key=lambda i: flat[i].process_index)
  return flat[order].reshape(devices.shape)


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The ('data', 'fsdp') mesh of config.mesh over the first config.mesh.num_devices devices
  (None: all), with Auto axis types so that jit partitions with GSPMD propagation."""
  devices = jax.devices()
  num = len(devices)
  if config.mesh.num_devices is not None:
    num = int(config.mesh.num_devices)
    if not 0 < num <= len(devices):
      raise errors.UserError(f"config.mesh.num_devices={num} but {len(devices)} device(s) "
                             f"exist; use 1..{len(devices)}, or None for all")
    devices = devices[:num]
  shape = mesh_shape(config, num)
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)
  return Mesh(_process_contiguous(mesh.devices), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 2)


# ----------------------------------------------------------------------------- placement rules


def logical_axes(shape: Sequence[int]) -> tuple[str, ...]:
  """Logical name of each dimension, from the layout every flax kernel shares: (..., in, out)
  for >= 2-D arrays (leading dimensions are conv taps or stacked tasks), 'vector' for 1-D."""
  ndim = len(shape)
  if ndim == 0:
    return ()
  if ndim == 1:
    return ("vector",)
  return ("leading",) * (ndim - 2) + ("in", "out")


def check_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """config.mesh.rules as ((logical axis, (mesh axes...)), ...), or a one-line UserError."""
  checked = []
  for rule in rules:
    if len(rule) != 2:
      raise errors.UserError(f"config.mesh.rules: {rule!r} is not a (logical axis, mesh axes) "
                             "pair, e.g. ('out', 'fsdp')")
    logical, mesh_axes = rule
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    if logical not in LOGICAL_AXES:
      raise errors.UserError(f"config.mesh.rules: unknown logical axis {logical!r}"
                             f"{errors.did_you_mean(logical, LOGICAL_AXES)}; the logical axes "
                             f"are {', '.join(LOGICAL_AXES)}")
    for axis in mesh_axes:
      if axis not in MESH_AXES:
        raise errors.UserError(f"config.mesh.rules: unknown mesh axis {axis!r}"
                               f"{errors.did_you_mean(axis, MESH_AXES)}; the mesh axes are "
                               f"{', '.join(MESH_AXES)}")
    checked.append((logical, mesh_axes))
  return tuple(checked)


def partition_spec(shape: Sequence[int], rules: Sequence[tuple[str, tuple[str, ...]]],
                   axis_sizes: Mapping[str, int], min_size: int) -> P:
  """Where an array of `shape` lives: each rule in turn gives its mesh axes (those of size > 1
  not used yet) to the first dimension of its logical name that they divide. Arrays of fewer
  than `min_size` elements, and dimensions no rule divides, stay replicated."""
  shape = tuple(int(d) for d in shape)
  if not shape or math.prod(shape) < min_size:
    return P()
  names = logical_axes(shape)
  spec: list[Any] = [None] * len(shape)
  used: set[str] = set()
  for logical, mesh_axes in rules:
    free = tuple(a for a in mesh_axes if axis_sizes[a] > 1 and a not in used)
    if not free:
      continue
    size = math.prod(axis_sizes[a] for a in free)
    for dim, name in enumerate(names):
      if name == logical and spec[dim] is None and shape[dim] % size == 0:
        spec[dim] = free[0] if len(free) == 1 else free
        used.update(free)
        break
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def tree_shardings(tree: PyTree, mesh: Mesh, config: ml_collections.ConfigDict) -> PyTree:
  """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs), by config.mesh."""
  rules = check_rules(config.mesh.rules)
  sizes = dict(mesh.shape)
  min_size = int(config.mesh.min_shard_size)
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, partition_spec(np.shape(x), rules, sizes, min_size)), tree)


def shardings_of(tree: PyTree) -> PyTree:
  """The sharding of every array of `tree` (the in/out shardings of a jitted step)."""
  return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def place(tree: PyTree, shardings: PyTree) -> PyTree:
  """Puts `tree` (host arrays or arrays on one local device, identical on every host; or global
  arrays) onto `shardings`. Each host copies only the shards its devices hold."""

  def put(x, sharding):
    if isinstance(x, jax.Array) and x.is_fully_addressable and not sharding.is_fully_addressable:
      x = np.asarray(x)  # a host's local copy of a value every host holds
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map(put, tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places every leaf of `tree` (identical on all hosts, or global) replicated on the mesh."""
  sharding = replicated(mesh)
  return place(tree, jax.tree_util.tree_map(lambda _: sharding, tree))


def gathered(tree: PyTree, mesh: Mesh) -> PyTree:
  """Inside jit: `tree` replicated on every device (FSDP's all-gather before the forward pass;
  the gradient flows back to the sharded storage). A no-op for replicated arrays."""
  return jax.lax.with_sharding_constraint(tree, replicated(mesh))


# ----------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis, other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "config.input.batch_size",
                     microbatches: int = 1) -> None:
  """One-line UserErrors unless `global_batch` splits into `microbatches` micro-batches, each
  split evenly over the processes (each host loads global_batch / processes rows) and over the
  mesh's devices."""
  processes = jax.process_count()
  shards = num_batch_shards(mesh)
  if microbatches < 1:
    raise errors.UserError(f"config.train.grad_accum_steps={microbatches}: use 1 (no "
                           "accumulation) or more micro-batches per step")
  if global_batch % processes:
    raise errors.UserError(
        f"{what}={global_batch} is the global batch and does not split over the {processes} "
        f"processes (each host loads batch / processes rows); use a multiple of {processes}")
  per_micro = shards * microbatches
  if global_batch % per_micro:
    accum = (f" x config.train.grad_accum_steps={microbatches}" if microbatches > 1 else "")
    raise errors.UserError(
        f"{what}={global_batch} does not split over the {shards} devices of the mesh{accum}; "
        f"use a multiple of {per_micro}")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, keys: Sequence[str] | None = None,
                global_batch: int | None = None) -> dict[str, jax.Array]:
  """Process-local numpy batch (its `keys`, default all) -> global jax.Arrays split over the
  batch axes. Host p passes rows [p*b, (p+1)*b) of the global batch (b = global / processes);
  `global_batch`, when given, is checked against what the host passed."""
  keys = tuple(batch) if keys is None else tuple(keys)
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"batch lacks {missing} (has {sorted(batch)}); check config.tasks")
  sharding = batch_sharding(mesh)
  processes = jax.process_count()
  out = {}
  for key in keys:
    value = np.asarray(batch[key])
    if global_batch is not None and value.shape[0] * processes != global_batch:
      raise ValueError(
          f"process {jax.process_index()} loaded {value.shape[0]} rows of {key!r}, but each of "
          f"the {processes} processes loads global batch {global_batch} / {processes} = "
          f"{global_batch // processes}; the train loader must yield per-host batches")
    global_shape = (value.shape[0] * processes, *value.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def local_rows(tree: PyTree, mesh: Mesh) -> PyTree:
  """Global batch-sharded arrays -> this host's rows as numpy (inverse of `shard_batch`)."""
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
  local = multihost_utils.global_array_to_host_local_array(tree, mesh, P(BATCH_AXES))
  return jax.tree_util.tree_map(np.asarray, local)
