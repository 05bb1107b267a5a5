"""Device mesh and shardings: data parallelism over a 1-D 'data' axis.

Params, optimizer state and the frozen backbone are replicated; batches are split along their
leading axis over every device of every host. Each host's input pipeline yields only its own
slice of the global batch, which `shard_batch` assembles into global arrays.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(config: ml_collections.ConfigDict | None = None) -> Mesh:
  """A 1-D mesh over all devices (axis 'data', Auto axis type so jit uses GSPMD propagation).

  config.mesh.num_devices (optional) restricts the mesh to the first N devices.
  """
  devices = jax.devices()
  num = len(devices)
  if config is not None and "mesh" in config and config.mesh.get("num_devices"):
    num = int(config.mesh.num_devices)
    if num > len(devices):
      raise ValueError(f"config.mesh.num_devices={num} but only {len(devices)} devices exist")
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
    raise ValueError(f"{what}={global_batch} is not divisible by the {n} devices of the mesh")
  if global_batch % jax.process_count():
    raise ValueError(f"{what}={global_batch} is not divisible by the "
                     f"{jax.process_count()} processes")


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays sharded along 'data'.

  Each host passes its own rows (global batch / process_count); the global batch is their
  concatenation in process order.
  """
  sharding = data_sharded(mesh)
  out = {}
  for key, value in batch.items():
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
