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
reports as a step, and old steps are renamed away before they are deleted, so `latest_step()`
always names a complete checkpoint. A checkpoint damaged
later (a file truncated or altered on disk) is caught on restore: the metadata holds a digest of
the state's arrays (`state_digest`), compared after every restore; resuming then falls back to
the newest intact step (`restore_latest_intact`), moving the damaged ones aside with a warning.
With several processes every one of them calls `save` and `restore` at the same steps: each
writes and reads the shards of the arrays its devices hold (the state may be FSDP-sharded across
hosts), and Orbax's primary process writes the JSON items.
"""
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping

from etils import epath
import flax
from flax import traverse_util
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from freesine_jax import config_checks
from freesine_jax import errors

PyTree = Any
_STATE, _DATA, _META = "state", "data_iter", "metadata"
STATE_DIGEST = "state_sha256"  # metadata key: `state_digest` of the saved state
DAMAGED_DIR = "damaged_checkpoints"  # beside checkpoints/: where damaged steps are moved
TRASH_DIR = "deleted"  # inside checkpoints/: old steps on their way out (not a step name)


class CheckpointDamaged(errors.UserError):
  """A checkpoint step that cannot be read back, or reads back other arrays than were saved."""

  def __init__(self, directory: Any, step: int, reason: str):
    self.step, self.reason = int(step), " ".join(reason.split())
    super().__init__(f"checkpoint step {step} in {directory} is damaged: {self.reason}")


class StorageFault(errors.UserError):
  """A checkpoint that could not be written: no space, a read-only or forbidden directory.

  Command lines exit at once on it (cli.fail): background writers of the failing disk
  (TensorBoard's event queue, whose writer thread died of the same fault) would otherwise block
  the exit handlers forever."""
  exit_at_once = True


# What a failed write's errno, or the text TensorStore wraps it in, means for the user.
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device",
                   errno.EDQUOT: "the disk quota is exceeded",
                   errno.EROFS: "the file system is read-only",
                   errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def storage_fault_reason(exc: BaseException) -> str | None:
  """What `exc` (or an exception it was raised from) says about the storage, or None when it is
  not a storage fault (Orbax/TensorStore raise ValueError('RESOURCE_EXHAUSTED: ... [OS error
  28: No space left on device]') from their writer threads)."""
  for seen in errors.causes(exc):
    if isinstance(seen, OSError) and seen.errno in _STORAGE_ERRNOS:
      return _STORAGE_ERRNOS[seen.errno]
    text = str(seen)
    for code, reason in _STORAGE_ERRNOS.items():
      if os.strerror(code) in text:
        return reason
  return None


def storage_fault(directory: Any, step: int | None, reason: str, *,
                  written: bool = True) -> StorageFault:
  """Removes unfinished saves in the checkpoint `directory` (when `written`: something was
  being written), then says what failed, why, which checkpoints are intact and what to do.
  step None: not a particular checkpoint (metrics.jsonl, TensorBoard, ... on that disk)."""
  removed = _remove_unfinished_saves(directory) if written else []
  kept = sorted(int(p.name) for p in epath.Path(str(directory)).iterdir()
                if p.name.isdigit()) if epath.Path(str(directory)).is_dir() else []
  if step is not None:
    what = f"checkpoint step {step} {'could not be' if written else 'was not'} written to " \
           f"{directory}"
  elif written:
    what = f"training stopped: writing in {os.path.dirname(str(directory).rstrip('/'))} failed"
  else:
    what = f"no checkpoint can be written to {directory}"
  left = f" (its unfinished {', '.join(removed)} removed)" if removed else ""
  resume = (f"the intact checkpoints are steps {', '.join(map(str, kept))}; a rerun resumes "
            f"from step {kept[-1]}" if kept else "no checkpoint is kept; a rerun starts over")
  return StorageFault(f"{what}: {reason}{left}; {resume}; free space there or rerun with a "
                      "--workdir on another disk (docs/reliability.md)")


def _remove_unfinished_saves(directory: Any) -> list[str]:
  """Deletes Orbax's temporary save directories (<step>.orbax-checkpoint-tmp...)."""
  removed = []
  directory = epath.Path(str(directory))
  if jax.process_index() != 0 or not directory.is_dir():
    return removed
  for path in sorted(directory.iterdir()):
    if ".orbax-checkpoint-tmp" in path.name:
      try:
        path.rmtree(missing_ok=True)
        removed.append(path.name)
      except OSError:
        continue
  return removed


def _megabytes(n: float) -> str:
  return f"{n / 2 ** 20:.1f} MiB"


def is_url(path: Any) -> bool:
  """gs://... and other object-store URLs (no appending, no os.path)."""
  return "://" in str(path)


def absolute(path: str) -> str:
  """A local path made absolute; a URL (gs://...) as given (os.path would mangle it)."""
  return str(path) if is_url(path) else os.path.abspath(path)


def ensure_workdir(workdir: str) -> None:
  """Creates a local workdir and checks a file can be written in it, so a path naming a file,
  a read-only or full file system, or missing permissions is one UserError naming the path
  before any data or model is built. URLs (gs://...) are left to their client."""
  if is_url(workdir):
    return
  path = os.path.expanduser(str(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.UserError(f"--workdir={workdir} is a file, not a directory; name a directory "
                           "(created if missing)")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_check-{os.getpid()}")
    with open(probe, "wb") as f:
      f.write(b"x")
    os.remove(probe)
  except OSError as e:
    raise errors.UserError(f"--workdir={workdir}: cannot write there ({e.strerror or e}); "
                           "name a writable directory") from None


def checkpoint_directory(workdir: str) -> str:
  """<workdir>/checkpoints as Orbax wants it: absolute, or a URL (gs://...) as given."""
  if is_url(workdir):
    return workdir.rstrip("/") + "/checkpoints"
  return os.path.join(absolute(workdir), "checkpoints")


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


def state_digest(tree: Any) -> str | None:
  """sha256 over the multiset of the leaves' (dtype, shape, bytes) digests, or None when some
  leaf is not held whole by this process (multi-host sharding: not verified).

  Independent of the tree's container types and leaf order, so the TrainState saved and the same
  arrays restored as plain dicts (tools.analyze) digest alike.
  """
  leaves = jax.tree_util.tree_leaves(tree)
  if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return None
  digests = []
  for leaf in jax.device_get(leaves):
    v = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f"{v.dtype}|{v.shape}|".encode())
    h.update(v.tobytes())
    digests.append(h.hexdigest())
  return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


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


def move_tree(source: str, target: str) -> None:
  """Moves directory `source` to `target` (its parent created): a rename on a local disk; an
  object store (gs://) has no directory rename, so there every file is copied, then the source
  deleted (a copy interrupted halfway leaves the source whole)."""
  if not is_url(source):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
    return
  source_root, target_root = epath.Path(source), epath.Path(target)
  top = None
  for folder, _, files in source_root.walk(top_down=True):
    top = top or os.fspath(folder)  # the first folder walked: source, as the store names it
    relative = os.path.relpath(os.fspath(folder), top)
    into = target_root if relative == "." else target_root / relative
    into.mkdir(parents=True, exist_ok=True)
    for name in files:
      (folder / name).copy(into / name, overwrite=True)
  source_root.rmtree()


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
        # Old steps are first renamed out of sight (atomic), then deleted by `_purge_trash`:
        # Orbax's own deletion removes files one by one, and a run killed halfway through it
        # left a step that still looked committed with an item missing.
        todelete_subdir=TRASH_DIR,
    )
    # Orbax's tensorstore paths must be absolute (a relative one fails mid-save).
    self._manager = ocp.CheckpointManager(absolute(directory), options=options,
                                          item_names=(_STATE, _DATA, _META))
    self._writing_step = None  # the step of the save in progress or last started
    self._purge_trash()

  @property
  def directory(self):
    return self._manager.directory

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_iter_state: Any = None,
           metadata: dict | None = None, force: bool = False) -> bool:
    """Starts an (async) save if `step` is due (or `force`); returns whether it saved.

    The metadata gets the state's digest (`state_digest`), checked on restore. A save that
    cannot be written (no space, read-only, forbidden; found now, or when the background write
    of an earlier save ends) raises StorageFault after removing its unfinished directory; a
    save that cannot fit the free space is refused before anything is written."""
    if not (force or self._manager.should_save(int(step))):
      return False
    with self._writing():  # an earlier save still writing: its failure is its step's
      self._manager.wait_until_finished()
    self._writing_step = int(step)
    with self._writing():
      self.check_space(state, step)
      return self._save(step, state, data_iter_state, metadata, force)

  def _save(self, step, state, data_iter_state, metadata, force) -> bool:
    self._purge_trash()
    metadata = dict(metadata or {})
    digest = state_digest(state)
    if digest is not None:
      metadata[STATE_DIGEST] = digest
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state),
        _DATA: ocp.args.JsonSave(_gather_json(_encode_iter_state(data_iter_state))),
        _META: ocp.args.JsonSave(metadata),
    })
    return self._manager.save(int(step), args=args, force=force)

  def restore(self, step: int, target_state: Any) -> tuple[Any, Any, dict]:
    """Restores (state, data_iter_state, metadata) of `step`.

    target_state: a pytree of the same structure as the saved state whose leaves are arrays
    or jax.ShapeDtypeStruct with `.sharding`; restored leaves take those shardings.
    """
    abstract = jax.tree_util.tree_map(_abstract_leaf, target_state)
    self._check_layout(step, abstract)
    with self._damage_reported(step):
      restored = self._manager.restore(int(step), args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract),
          _DATA: ocp.args.JsonRestore(),
          _META: ocp.args.JsonRestore(),
      }))
    self._verify(step, restored[_STATE], restored[_META])
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
    (for offline tools such as tools.analyze that need no optimizer). Arrays saved by devices
    this process does not have (a multi-host run) land on its first device."""
    fallback = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with self._damage_reported(step):
      restored = self._manager.restore(int(step), args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(fallback_sharding=fallback),
          _META: ocp.args.JsonRestore()}))
    self._verify(step, restored[_STATE], restored[_META])
    return restored[_STATE]

  def read_metadata(self, step: int) -> dict:
    """The metadata saved with `step` (read alone, before any array is restored)."""
    with self._damage_reported(step):
      restored = self._manager.restore(int(step), args=ocp.args.Composite(**{
          _META: ocp.args.JsonRestore()}))
      if not isinstance(restored[_META], dict):
        raise ValueError(f"its {_META} item holds {type(restored[_META]).__name__}, not JSON")
    return dict(restored[_META])

  def _check_layout(self, step: int, abstract: Any) -> None:
    """UserError if the saved state's arrays (shapes, dtypes) are not the target's: another
    model or code version wrote it, which is no damage (nothing is moved aside)."""
    with self._damage_reported(step):
      saved = _leaf_layout(ocp.StandardCheckpointHandler().metadata(
          self._manager.directory / str(int(step)) / _STATE))
    wanted = _leaf_layout(abstract)
    if saved != wanted:
      extra = sorted(set(saved) - set(wanted)) or sorted(set(wanted) - set(saved))
      raise errors.UserError(
          f"checkpoint step {step} in {self.directory} holds {len(saved)} arrays that do not fit "
          f"this model's {len(wanted)} state arrays (e.g. shape/dtype {extra[:1]}); resume with "
          "the code and config that wrote it, or use a fresh --workdir")

  def _damage_reported(self, step: int):
    """Turns any failure to read `step` (a missing or cut file, bad JSON, ...) into
    CheckpointDamaged; the project's own UserErrors pass through."""
    return _DamageReported(self.directory, step)

  def _verify(self, step: int, state: Any, metadata: Any) -> None:
    saved = (metadata or {}).get(STATE_DIGEST)
    if saved is None:
      return  # written before digests existed, or sharded across hosts
    got = state_digest(state)
    if got is not None and got != saved:
      raise CheckpointDamaged(self.directory, step, "its arrays read back differently than they "
                              f"were saved (state digest {got[:12]}... != {saved[:12]}...)")

  def restore_latest_intact(self, target_state: Any, check_metadata: Callable[[dict, int], None],
                            warn: Callable[[str], None]) -> tuple[int, Any, Any]:
    """(step, state, data_iter_state) of the newest step that reads back intact.

    `check_metadata(metadata, step)` may refuse a step (a UserError, e.g. another config): that
    ends the resume. A damaged step is moved to <workdir>/damaged_checkpoints/ (so training can
    write that step again) and named in one `warn` line; if every step is damaged, UserError.
    """
    skipped = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        metadata = self.read_metadata(step)
        check_metadata(metadata, step)
        state, iter_state, _ = self.restore(step, target_state)
      except CheckpointDamaged as e:
        skipped.append((e.step, e.reason, self._move_aside(e.step)))
        continue
      if skipped:
        warn("WARNING: " + "; ".join(
            f"checkpoint step {s} in {self.directory} is damaged ({reason}), moved to {where}"
            for s, reason, where in skipped) + f"; resuming from step {step} instead")
      return step, state, iter_state
    raise errors.UserError(
        f"every checkpoint in {self.directory} is damaged (moved to {DAMAGED_DIR}/): " +
        "; ".join(f"step {s}: {reason}" for s, reason, _ in skipped) +
        "; rerun to start over in this workdir, or resume from a copy of the run")

  def _move_aside(self, step: int) -> str:
    """Moves step `step`'s directory to <workdir>/damaged_checkpoints/<step>-<time>/."""
    source = os.path.join(str(self.directory), str(step))
    target = os.path.join(os.path.dirname(str(self.directory).rstrip("/")), DAMAGED_DIR,
                          f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      move_tree(source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"freesine_jax moved damaged checkpoint {step}")
    self._manager.reload()
    return target

  def _purge_trash(self) -> None:
    """Deletes the steps Orbax moved to TRASH_DIR, and the folder once empty, unless a save (whose
    last act may be such a move) is still running; a purge killed halfway leaves nothing that
    looks like a step."""
    trash = epath.Path(str(self.directory)) / TRASH_DIR  # (Orbax uses none on gs://)
    if jax.process_index() != 0 or not trash.is_dir() or self._manager.is_saving_in_progress():
      return
    for step_dir in trash.iterdir():
      try:
        step_dir.rmtree(missing_ok=True)
      except OSError:  # left for the next purge, as a partly deleted step is
        continue
    try:  # no empty folder left behind (Orbax creates it again when it next deletes a step)
      trash.rmdir()
    except OSError:
      pass

  def wait_until_finished(self) -> None:
    with self._writing():
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._writing():
      self._manager.wait_until_finished()
    self._purge_trash()
    self._manager.close()

  def free_bytes(self) -> int | None:
    """Free bytes on the device holding the checkpoints (None for a URL)."""
    if is_url(self.directory):
      return None
    return shutil.disk_usage(str(self.directory)).free

  def check_space(self, state: Any, step: int | None = None) -> None:
    """StorageFault when the state's arrays alone (a lower bound of a checkpoint's size;
    measured: the files take ~1.35x the arrays for the tiny model's many small leaves) exceed
    the free space: before training (step None) and before each save. One process only: with
    several, each writes its own shards."""
    if jax.process_count() > 1:
      return
    free = self.free_bytes()
    need = sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree_util.tree_leaves(state))
    if free is not None and need > free:
      raise self._fault(step, f"a checkpoint of this run needs at least {_megabytes(need)} and "
                              f"the device has {_megabytes(free)} free", written=False)

  @contextlib.contextmanager
  def _writing(self):
    """Turns a storage fault raised inside into one StorageFault naming the step and path."""
    try:
      yield
    except StorageFault:
      raise
    except Exception as e:  # pylint: disable=broad-except
      reason = storage_fault_reason(e)
      if reason is None:
        raise
      raise self._fault(self._writing_step, reason) from e

  def _fault(self, step: int | None, reason: str, written: bool = True) -> StorageFault:
    fault = storage_fault(self.directory, step, reason, written=written)
    try:  # the unfinished save is gone: Orbax must not look for it
      self._manager.reload()
    except Exception:  # pylint: disable=broad-except
      pass
    return fault


class _DamageReported:
  """Context: any exception but a UserError becomes CheckpointDamaged(directory, step, ...)."""

  def __init__(self, directory: Any, step: int):
    self._directory, self._step = directory, step

  def __enter__(self):
    return self

  def __exit__(self, kind, exc, tb):
    if exc is None or isinstance(exc, errors.UserError) or not isinstance(exc, Exception):
      return False
    # The deepest cause says what is wrong (TensorStore: 'OUT_OF_RANGE: Error reading "<array>"
    # ...'); the outer ones wrap it in pages of specs.
    root = next((e for e in reversed(errors.causes(exc)) if str(e).strip()), exc)
    raise CheckpointDamaged(self._directory, self._step, f"cannot be read back "
                            f"({type(root).__name__}: {errors.first_line(root)[:300]})") from exc


def find_checkpoint(config: ml_collections.ConfigDict | None, workdir: str,
                    step: int | None, *, flag: str = "--workdir",
                    action: str = "evaluate it") -> tuple[int, dict]:
  """(step, metadata) of a training run's checkpoint (the latest if step is None), checked
  against `config` (unless None) before any model is built. Every failure is a one-line
  UserError naming `flag`, the option that gave `workdir`."""
  if not epath.Path(workdir).is_dir():
    raise errors.UserError(f"{flag}={workdir} does not exist (no checkpoints to read); pass "
                           "the --workdir a training run wrote "
                           "(python -m freesine_jax.main --workdir=...)")
  directory = checkpoint_directory(workdir)
  if not epath.Path(directory).is_dir():
    raise errors.UserError(f"{flag}={workdir} holds no checkpoints/ directory; pass the "
                           "--workdir of a training run that saved a checkpoint")
  ckpt = Checkpointer(directory, async_save=False)
  try:
    steps = sorted(ckpt.all_steps())
    if not steps:
      raise errors.UserError(f"{directory} holds no complete checkpoint yet; train longer or "
                             "wait for the first checkpoint")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise errors.UserError(f"--step={step}: {directory} has no checkpoint at that step; the "
                             f"saved steps are {', '.join(map(str, steps))}")
    metadata = ckpt.read_metadata(step)
  finally:
    ckpt.close()
  if config is not None:
    check_compatible(metadata, config, workdir, step, action)
  return int(step), metadata


def restore_checkpoint(workdir: str, step: int, metadata: dict,
                       variables: Mapping[str, PyTree]) -> dict[str, PyTree]:
  """`variables` (freshly initialised: their frozen backbone is kept, and checked against the
  hash the checkpoint recorded) with the params and batch_stats saved at `step`."""
  check_backbone(metadata, tree_hash(variables["backbone"]), step)
  ckpt = Checkpointer(checkpoint_directory(workdir), async_save=False)
  try:
    saved = ckpt.restore_saved_state(step)
  finally:
    ckpt.close()
  for name in ("params", "batch_stats"):
    if (jax.tree_util.tree_structure(dict(variables[name]))
        != jax.tree_util.tree_structure(dict(saved[name]))):
      raise errors.UserError(f"{workdir} step {step}: the checkpoint's {name} do not fit the "
                             "model this config builds; use the config the run was trained with")
  return {"backbone": variables["backbone"], "params": saved["params"],
          "batch_stats": saved["batch_stats"]}


def load_saved_run(workdir: str, step: int | None = None, *, flag: str = "--workdir"
                   ) -> tuple[Any, dict, int]:
  """(config, saved TrainState as nested dicts, step) of a training run's checkpoint (`step`,
  default the latest), for the offline tools; a one-line UserError if there is none."""
  step, metadata = find_checkpoint(None, workdir, step, flag=flag)
  if not metadata.get("config"):
    raise errors.UserError(f"{checkpoint_directory(workdir)} step {step}: the checkpoint's "
                           "metadata holds no config")
  config = ml_collections.ConfigDict(config_checks.upgrade(json.loads(metadata["config"])))
  ckpt = Checkpointer(checkpoint_directory(workdir), async_save=False)
  try:
    saved = ckpt.restore_saved_state(step)
  finally:
    ckpt.close()
  return config, saved, step


def _leaf_layout(tree: Any) -> list[tuple[tuple[int, ...], str]]:
  """Sorted (shape, dtype) of every leaf: a state's layout, whatever its container types."""
  return sorted((tuple(int(d) for d in leaf.shape), str(np.dtype(leaf.dtype)))
                for leaf in jax.tree_util.tree_leaves(tree))


def _abstract_leaf(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  arr = np.asarray(x)
  return jax.ShapeDtypeStruct(arr.shape, arr.dtype)


COMPARED_SECTIONS = ("tasks", "num_classes", "model")  # what the saved parameters depend on
# Single keys outside those sections that the model depends on (default when a config lacks it).
COMPARED_KEYS = {"train.new_tasks": ""}  # which tasks' prompts are masked (tasks.new_tasks)


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
  saved = config_checks.upgrade(json.loads(saved_config_json))  # a run saved by older code
  current = json.loads(config.to_json_best_effort())
  diffs = []
  for section in COMPARED_SECTIONS:
    a, b = _flatten(saved.get(section), section), _flatten(current.get(section), section)
    for key in sorted(set(a) | set(b)):
      if (key != "model.backbone_weights" and not key.startswith("model.compute.")
          and a.get(key) != b.get(key)):
        diffs.append((key, a.get(key), b.get(key)))
  for key, default in COMPARED_KEYS.items():
    section, name = key.split(".")
    a, b = ((c.get(section) or {}).get(name, default) for c in (saved, current))
    if a != b:
      diffs.append((key, a, b))
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
  if saved is None or saved == current_hash:
    return
  try:
    was_random = not json.loads(metadata["config"])["model"]["backbone_weights"]
  except (TypeError, KeyError, ValueError):
    was_random = False  # no config recorded: nothing more to say
  random = ("; the run's backbone was random: XLA makes it again from config.seed, and another "
            "jaxlib, XLA_FLAGS or CPU can round it differently, so resume it with the jaxlib "
            "and XLA_FLAGS it was trained with" if was_random else "")
  raise errors.UserError(
      f"checkpoint step {step} was trained with frozen backbone weights of hash "
      f"{saved[:12]}..., but this config's backbone (config.model.backbone_weights, or "
      f"config.seed for a random one) hashes to {current_hash[:12]}...; use the run's "
      f"backbone weights and seed{random}")
