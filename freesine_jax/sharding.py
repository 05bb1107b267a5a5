"""Device mesh and shardings: data parallelism over a 1-D 'data' axis.

Params, optimizer state and the frozen backbone are replicated; batches are split along their
leading axis over every device of every host. Each host's input pipeline yields only its own
slice of the global batch, which `shard_batch` assembles into global arrays.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from freesine_jax import errors

DATA_AXIS = "data"


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """A 1-D mesh (axis 'data', Auto axis type so jit uses GSPMD propagation) over the first
  config.mesh.num_devices devices (None: all)."""
  devices = jax.devices()
  num = len(devices)
  if config.mesh.num_devices is not None:
    num = int(config.mesh.num_devices)
    if not 0 < num <= len(devices):
      raise errors.UserError(f"config.mesh.num_devices={num} but {len(devices)} device(s) "
                             f"exist; use 1..{len(devices)}, or None for all")
    devices = devices[:num]
  return jax.make_mesh((num,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', other axes replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "config.input.batch_size"):
  n = mesh.devices.size
  if global_batch % n:
    raise errors.UserError(f"{what}={global_batch} is not divisible by the {n} devices of the "
                           f"mesh; use a multiple of {n}")
  if global_batch % jax.process_count():
    raise errors.UserError(f"{what}={global_batch} is not divisible by the "
                           f"{jax.process_count()} processes; use a multiple of them")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh,
                keys: Sequence[str] | None = None) -> dict[str, jax.Array]:
  """Process-local numpy batch (its `keys`, default all) -> global jax.Arrays along 'data'.

  Each host passes its own rows (global batch / process_count); the global batch is their
  concatenation in process order.
  """
  keys = tuple(batch) if keys is None else tuple(keys)
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"batch lacks {missing} (has {sorted(batch)}); check config.tasks")
  sharding = data_sharded(mesh)
  out = {}
  for key in keys:
    value = batch[key]
    value = np.asarray(value)
    global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` (identical on all hosts) replicated on the mesh."""
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


def local_rows(tree: Any, mesh: Mesh) -> Any:
  """Global data-sharded arrays -> this host's rows as numpy (inverse of `shard_batch`)."""
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
  local = multihost_utils.global_array_to_host_local_array(tree, mesh, P(DATA_AXIS))
  return jax.tree_util.tree_map(np.asarray, local)
