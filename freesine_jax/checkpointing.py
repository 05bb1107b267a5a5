"""Orbax checkpoints of a training run: TrainState + data-iterator state + metadata.

One checkpoint step holds three items:
  'state'      the TrainState pytree (step, params, opt_state, batch_stats, rng), restored
               straight onto the target shardings (StandardSave / StandardRestore);
  'data_iter'  JSON: every process's grain iterator state, keyed 'process_<i>-of-<n>' (each
               host reads its own shard, so the data order resumes exactly);
  'metadata'   JSON: the hash of the frozen backbone weights and the config. The backbone is
               never checkpointed (it comes from its source file or the seed); its hash detects
               a run resumed against different backbone weights.
Saves are asynchronous; a save killed halfway leaves a temporary directory that Orbax never
reports as a step, so `latest_step()` always names a complete checkpoint.
"""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import flax
from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from freesine_jax import errors

_STATE, _DATA, _META = "state", "data_iter", "metadata"


def backbone_hash(flat: dict[str, np.ndarray]) -> str:
  """sha256 over the sorted paths, dtypes, shapes and bytes: identifies the pretrained weights.

  The converter stores it with converted weights; checkpoints store the frozen collection's.
  """
  h = hashlib.sha256()
  for k in sorted(flat):
    v = np.ascontiguousarray(flat[k])
    h.update(k.encode())
    h.update(str(v.dtype).encode())
    h.update(str(tuple(v.shape)).encode())
    h.update(v.tobytes())
  return h.hexdigest()


def tree_hash(tree: Any) -> str:
  """`backbone_hash` of a nested tree, its leaves keyed by their 'a/b/c' paths."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(tree)), sep="/") \
      if tree else {}
  return backbone_hash({k: np.asarray(v) for k, v in flat.items()})


def _encode_iter_state(state: Any) -> dict:
  """grain iterator states are bytes (DataLoader) or JSON-able dicts (dataset iterators)."""
  if state is None:
    return {"kind": "none"}
  if isinstance(state, (bytes, bytearray)):
    return {"kind": "bytes", "value": base64.b64encode(bytes(state)).decode("ascii")}
  return {"kind": "json", "value": json.loads(json.dumps(state))}


def _decode_iter_state(payload: dict) -> Any:
  kind = payload.get("kind")
  if kind == "none":
    return None
  if kind == "bytes":
    return base64.b64decode(payload["value"])
  if kind == "json":
    return payload["value"]
  raise ValueError(f"checkpoint item {_DATA!r}: unknown iterator state kind {kind!r}")


def _process_key(index: int, count: int) -> str:
  return f"process_{index}-of-{count}"


def _gather_json(payload: dict) -> dict[str, dict]:
  """Every process's iterator state, keyed by process (each host reads its own shard)."""
  count = jax.process_count()
  if count == 1:
    return {_process_key(0, 1): payload}
  data = np.frombuffer(json.dumps(payload).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  everything = np.asarray(multihost_utils.process_allgather(padded))
  return {_process_key(i, count): json.loads(bytes(everything[i, :int(lengths[i, 0])]).decode())
          for i in range(count)}


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager for one workdir."""

  def __init__(self, directory: str, *, save_interval_steps: int = 1, max_to_keep: int = 3,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(save_interval_steps)),
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    self._manager = ocp.CheckpointManager(directory, options=options,
                                          item_names=(_STATE, _DATA, _META))

  @property
  def directory(self):
    return self._manager.directory

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iter_state: Any = None,
           metadata: dict | None = None, force: bool = False) -> bool:
    """Starts an (async) save if `step` is due (or `force`); returns whether it saved."""
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: ocp.args.JsonSave(_gather_json(_encode_iter_state(data_iter_state))),
        _META: ocp.args.JsonSave(dict(metadata or {})),
    })
    return self._manager.save(int(step), args=args, force=force)

  def restore(self, step: int, target_state: Any) -> tuple[Any, Any, dict]:
    """Restores (state, data_iter_state, metadata) of `step`.

    target_state: a pytree of the same structure as the saved state whose leaves are arrays
    or jax.ShapeDtypeStruct with `.sharding`; restored leaves take those shardings.
    """
    abstract = jax.tree_util.tree_map(_abstract_leaf, target_state)
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract),
        _DATA: ocp.args.JsonRestore(),
        _META: ocp.args.JsonRestore(),
    }))
    key = _process_key(jax.process_index(), jax.process_count())
    per_process = restored[_DATA] or {}
    if key not in per_process:
      raise ValueError(
          f"checkpoint step {step} holds data-iterator states for {sorted(per_process)}, not "
          f"for {key}: resume with the same number of processes")
    return (restored[_STATE], _decode_iter_state(per_process[key]),
            dict(restored[_META] or {}))

  def restore_saved_state(self, step: int) -> dict:
    """The saved TrainState of `step` as nested dicts of arrays, without a target structure
    (for offline tools such as tools.analyze that need no optimizer)."""
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore()}))
    return restored[_STATE]

  def read_metadata(self, step: int) -> dict:
    """The metadata saved with `step` (read alone, before any array is restored)."""
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**{
        _META: ocp.args.JsonRestore()}))
    return dict(restored[_META] or {})

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _abstract_leaf(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  arr = np.asarray(x)
  return jax.ShapeDtypeStruct(arr.shape, arr.dtype)


COMPARED_SECTIONS = ("tasks", "num_classes", "model")  # what the saved parameters depend on


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flatten(v, f"{prefix}.{k}"))
    return out
  return {prefix: tuple(value) if isinstance(value, list) else value}


def config_differences(saved_config_json: str, config) -> list[tuple[str, Any, Any]]:
  """(key, value in the checkpoint, value in `config`) for every key of COMPARED_SECTIONS that
  differs. model.backbone_weights may move (its content is checked by the backbone hash), and
  model.compute.* chooses how the same function is computed (e.g. resume a CPU run on TPU)."""
  saved = json.loads(saved_config_json)
  current = json.loads(config.to_json_best_effort())
  diffs = []
  for section in COMPARED_SECTIONS:
    a, b = _flatten(saved.get(section), section), _flatten(current.get(section), section)
    for key in sorted(set(a) | set(b)):
      if (key != "model.backbone_weights" and not key.startswith("model.compute.")
          and a.get(key) != b.get(key)):
        diffs.append((key, a.get(key), b.get(key)))
  return diffs


def override_flag(key: str, value: Any) -> str:
  """The --config.<key>=<value> that sets `value` (tuples quoted as Python literals)."""
  if isinstance(value, tuple):
    return f"--config.{key}=\"{value!r}\""
  return f"--config.{key}={value}"


def check_compatible(metadata: dict, config, directory: str, step: int, action: str) -> None:
  """UserError (one line, naming the fields and the overrides that match the run) if the
  checkpoint was written by a different model/task setup than `config`.

  Compared before restoring, so a changed config gives this message instead of a shape
  mismatch from deep inside Orbax. `action` says what would work otherwise ('resume', ...).
  """
  saved_json = metadata.get("config")
  if not saved_json:
    return
  diffs = config_differences(saved_json, config)
  if not diffs:
    return
  shown = "; ".join(f"{key} is {saved!r} there, {now!r} here" for key, saved, now in diffs[:3])
  more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
  overrides = " ".join(override_flag(key, saved) for key, saved, _ in diffs[:3])
  raise errors.UserError(
      f"{directory} step {step} was trained with another config: {shown}{more}; to {action}, use "
      f"the run's config (e.g. {overrides}){' or a fresh --workdir' if action == 'resume' else ''}")


def check_backbone(metadata: dict, current_hash: str, step: int) -> None:
  """UserError if the checkpoint was trained against different frozen backbone weights."""
  saved = metadata.get("backbone_hash")
  if saved is not None and saved != current_hash:
    raise errors.UserError(
        f"checkpoint step {step} was trained with frozen backbone weights of hash "
        f"{saved[:12]}..., but this config's backbone (config.model.backbone_weights, or "
        f"config.seed for a random one) hashes to {current_hash[:12]}...; use the run's "
        "backbone weights and seed")
