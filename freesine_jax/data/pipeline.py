"""Grain input pipelines: TFDS array_record sources -> augmented, batched numpy dicts.

Batches are dicts of numpy arrays: 'image' float32 (B, H, W, 3) ImageNet-normalised, and for each
task in config.tasks its label in the layout of freesine_jax/tasks.py (int32 (B, H, W) for semseg,
human_parts, sal, edge; float32 (B, H, W, 3) normals; float32 (B, H, W) depth). Eval batches add
'valid' bool (B,): False on padding rows (whose labels are all "ignore").

Batch sizes in config.input are GLOBAL: each of the `shard_count` processes (default
jax.process_count()) loads batch_size // shard_count examples per step.

Train: one global stream of records, IndexSampler (global shuffle per epoch, num_epochs=None,
seed) cut into global batches: global batch s is records [s*B, (s+1)*B) of the stream, and host
p of P loads only its rows [p*b, (p+1)*b) of each (b = B / P, `HostRowsSampler`), i.e. the rows
its devices hold (sharding.shard_batch). So the global batches, and their augmentation (a numpy
Generator per record derived by grain from the seed and the record's position in the global
stream, restored with the iterator state), do not depend on the number of hosts or of
config.input.num_workers. -> RandomMapTransform -> Batch(drop_remainder=True). `iter(loader)` is
a grain iterator with get_state() / set_state() for checkpointing. Worker processes need absl
flags parsed (run under absl.app, or call flags.FLAGS(argv) first).
"""
from __future__ import annotations

import glob
import math
import os
import sys
from typing import Any, Iterator, Sequence

import grain.python as grain
from etils import epath
import numpy as np

from freesine_jax import errors
from freesine_jax import tasks as tasks_lib
from freesine_jax.data import augment as augment_lib
from freesine_jax.data import builder as builder_lib
from freesine_jax.data import registry


def _advice(config, folder: str) -> str:
  return builder_lib.rebuild_advice(config.dataset.name, folder, config.dataset.data_dir)


def _incomplete(config, folder: str) -> errors.UserError:
  return builder_lib.incomplete_error(config.dataset.name, folder, config.dataset.data_dir)


def _builder(config):
  """A prepared TFDS builder for config.dataset (renders 'synthetic' on first use)."""
  dataset = config.dataset
  cls = registry.builder_class(dataset.name)  # a UserError for an unknown name
  if dataset.name == "synthetic":
    from freesine_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.ensure_built(dataset.data_dir, config=dataset.builder_config or "default")
  kwargs: dict[str, Any] = {"data_dir": dataset.data_dir, "file_format": "array_record"}
  if dataset.builder_config:
    kwargs["config"] = dataset.builder_config
  # Looked for before the builder exists: TFDS warns about every missing dataset folder.
  root = os.path.join(os.path.expanduser(dataset.data_dir), cls.name)
  written = glob.glob(os.path.join(root, "**", "dataset_info.json"), recursive=True)
  builder = cls(**kwargs) if written else None
  if builder is None or not builder.is_prepared():
    shards = glob.glob(os.path.join(root, "**", "*.array_record-*"), recursive=True)
    if shards:  # the data files are there, the metadata TFDS writes last is not
      raise _incomplete(config, os.path.dirname(sorted(shards)[0]))
    raise errors.UserError(
        f"dataset {dataset.name!r} is not prepared in config.dataset.data_dir="
        f"{dataset.data_dir}; prepare it once from its files with "
        f"python -m freesine_jax.data.prepare --dataset={dataset.name} --manual_dir=<folder> "
        f"--data_dir={dataset.data_dir} (docs/datasets.md)")
  return builder


# Splits up to this size are read whole before use (the synthetic sets: 6 MB). Raw reads ran at
# ~155 MB/s on a 2-core Xeon, so this bounds the check to ~2 s; larger splits (PASCAL-Context's
# train split) check the ends of each shard only.
FULL_CHECK_BYTES = 256 * 2 ** 20


def check_shards(config, builder, split: str) -> list[tuple[str, int]]:
  """(path, records) of each array_record shard of `split`, each checked cheaply before use.

  Every shard must exist, be non-empty, hold the number of records dataset_info.json gives it,
  and read back: every record (undecoded; array_record checks each block's hash) when the
  split holds at most FULL_CHECK_BYTES, else its first and last record (a truncated shard
  loses its index, which sits at the end). Damage found later is reported when its record is
  read (`CheckedSource`). A UserError names the shard and what to do.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  info = builder.info.splits[split]
  folder = str(builder.data_dir)
  full = info.num_bytes <= FULL_CHECK_BYTES
  shards = []
  for path, expected in zip(info.filepaths, info.shard_lengths):
    path = epath.Path(path)
    problem = None
    if not path.exists():
      problem = "is missing"
    elif path.stat().length == 0:
      problem = "is empty"
    else:
      try:
        reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
        try:
          found = reader.num_records()
          if found != expected:
            problem = f"holds {found} records where dataset_info.json says {expected}"
          elif expected and full:
            for start in range(0, expected, 256):  # bounded memory
              reader.read(list(range(start, min(start + 256, expected))))
          elif expected:
            reader.read([0, expected - 1])
        finally:
          reader.close()
      except (RuntimeError, OSError, ValueError) as e:
        problem = f"cannot be read ({errors.first_line(e)})"
    if problem:
      raise errors.UserError(
          f"dataset {config.dataset.name!r}: shard {path.name} of split {split!r} {problem}; "
          f"the folder {folder} is damaged: {_advice(config, folder)}")
    shards.append((str(path), int(expected)))
  return shards


class CheckedSource:
  """A TFDS data source whose read failures (a damaged shard) raise a one-line UserError
  naming the record, its shard and what to do, instead of array_record's traceback."""

  def __init__(self, source, shards: Sequence[tuple[str, int]], dataset: str, split: str,
               advice: str):
    self.source = source
    self.shards = tuple(shards)  # (path, records) in record order
    self.dataset, self.split = dataset, split
    self.advice = advice  # "the folder ... is damaged: delete it ..."

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    return f"CheckedSource({self.source!r})"

  def shard_of(self, index: int) -> str:
    start = 0
    for path, count in self.shards:
      if index < start + count:
        return os.path.basename(path)
      start += count
    return "?"

  def __getitem__(self, index):
    try:
      return self.source[index]
    except (RuntimeError, OSError) as e:
      index = int(index)
      raise errors.UserError(
          f"dataset {self.dataset!r}: reading record {index} of split {self.split!r} failed in "
          f"shard {self.shard_of(index)} ({errors.first_line(e)}); {self.advice}") from None


def get_data_source(config, split: str):
  """Random-access source of decoded examples (dicts in the stored format) of `split` of
  config.dataset; every task of config.tasks must be stored in it. Its shards are checked
  first (`check_shards`), and a record that cannot be read raises a UserError naming its shard."""
  builder = _builder(config)
  if not builder.info.splits:  # e.g. dataset_info.json deleted by hand after the build
    raise _incomplete(config, str(builder.data_dir))
  if split not in builder.info.splits:
    raise errors.UserError(
        f"dataset {config.dataset.name!r} has no split {split!r}"
        f"{errors.did_you_mean(split, builder.info.splits)}; its splits are "
        f"{', '.join(sorted(builder.info.splits))}")
  stored = set(builder.info.features)
  missing = [t for t in config.tasks if t not in stored]
  if missing:
    raise errors.UserError(
        f"dataset {config.dataset.name!r} stores no {', '.join(missing)} labels (it has "
        f"{', '.join(sorted(stored - {'image', 'id'}))}); remove them from config.tasks")
  shards = check_shards(config, builder, split)
  folder = str(builder.data_dir)
  return CheckedSource(builder.as_data_source(split), shards, config.dataset.name, split,
                       f"the folder {folder} is damaged: {_advice(config, folder)}")


def _shard(shard_index, shard_count) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    if shard_index is not None or shard_count is not None:
      raise ValueError("Give both shard_index and shard_count, or neither (then jax processes).")
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")
  return int(shard_index), int(shard_count)


def _local_batch(global_batch: int, shard_count: int, key: str) -> int:
  if global_batch % shard_count:
    raise ValueError(f"config.input.{key}={global_batch} is not divisible by the number of data "
                     f"shards (processes) {shard_count}")
  return global_batch // shard_count


def _image_size(config) -> tuple[int, int]:
  size = config.dataset.image_size
  if len(size) != 2:
    raise errors.UserError(f"config.dataset.image_size must be (height, width), got {size!r}")
  return int(size[0]), int(size[1])


def augment_options(config) -> dict[str, Any]:
  """Keyword arguments of augment.augment from config.dataset.augment."""
  options = config.dataset.augment
  if options.label_fill not in ("zero", "ignore"):
    raise errors.UserError(f"config.dataset.augment.label_fill={options.label_fill!r}: use "
                           "'zero' or 'ignore'")
  if options.image_order not in (1, 3):
    raise errors.UserError(f"config.dataset.augment.image_order={options.image_order!r}: use "
                           "1 (bilinear) or 3 (bicubic)")
  return dict(flip=bool(options.flip), rotate_degrees=float(options.rotate_degrees),
              scale_range=options.scale_range, scales=options.scales,
              image_order=int(options.image_order), label_fill=options.label_fill)


def _select(element: dict, tasks: Sequence[str]) -> dict:
  out = {"image": element["image"]}
  for task in tasks:
    if task not in element:
      raise KeyError(f"Task {task!r} (config.tasks) is not stored in this dataset; stored keys: "
                     f"{sorted(element)}")
    out[task] = element[task]
  return out


class TrainTransform(grain.RandomMapTransform):
  """Selects the tasks, augments with the record's rng (augment.augment options), normalises."""

  def __init__(self, tasks: Sequence[str], image_size: tuple[int, int],
               options: dict[str, Any]):
    self.tasks = tuple(tasks)
    self.image_size = image_size
    self.kwargs = dict(options)

  def random_map(self, element, rng: np.random.Generator):
    ex = augment_lib.augment(_select(element, self.tasks), rng, self.image_size, **self.kwargs)
    return augment_lib.to_model_inputs(ex, self.tasks)


class EvalTransform(grain.MapTransform):
  """Selects config.tasks, resizes, normalises, marks the example valid."""

  def __init__(self, tasks: Sequence[str], image_size: tuple[int, int], image_order: int = 1):
    self.tasks = tuple(tasks)
    self.image_size = image_size
    self.image_order = image_order

  def map(self, element):
    ex = augment_lib.resize(_select(element, self.tasks), self.image_size,
                            image_order=self.image_order)
    out = augment_lib.to_model_inputs(ex, self.tasks)
    out["valid"] = np.bool_(True)
    return out


def padding_example(tasks: Sequence[str], image_size: tuple[int, int]) -> dict:
  """An invalid example whose labels are all "ignore" (so a forgotten mask still ignores it)."""
  h, w = image_size
  out = {"image": np.zeros((h, w, 3), np.float32)}
  for task in tasks:
    layout = tasks_lib.get_task(task).kind.label
    out[task] = np.full(layout.shape(h, w), layout.padding_value, layout.batch_dtype)
  out["valid"] = np.bool_(False)
  return out


def _seed(config) -> int:
  return int(config.seed if config.input.seed is None else config.input.seed)


class HostRowsSampler:
  """This host's rows of every global batch of one global record stream (a grain Sampler).

  Global batch s is positions [s*B, (s+1)*B) of `global_sampler`; host p of P loads positions
  s*B + p*b + [0, b) (b = B / P). grain's DataLoader reads local index i through worker
  i % W (W = max(workers, 1)) and batches each worker's records in turn, so local index i
  belongs to local batch s = (i // W // b) * W + i % W, row (i // W) % b. The record keys and
  per-record rngs come from the global position: the stream is the same for any P and W.
  """

  def __init__(self, global_sampler, shard_index: int, shard_count: int, local_batch: int,
               worker_count: int):
    self.global_sampler = global_sampler
    self.shard_index, self.shard_count = shard_index, shard_count
    self.local_batch = local_batch
    self.workers = max(int(worker_count), 1)

  def __len__(self) -> int:
    return sys.maxsize  # endless (num_epochs=None)

  def __repr__(self) -> str:
    return (f"HostRowsSampler({self.global_sampler!r}, shard {self.shard_index} of "
            f"{self.shard_count}, local batch {self.local_batch}, {self.workers} worker(s))")

  def global_position(self, index: int) -> int:
    per_worker, worker = divmod(index, self.workers)
    batch_of_worker, row = divmod(per_worker, self.local_batch)
    step = batch_of_worker * self.workers + worker
    return (step * self.shard_count + self.shard_index) * self.local_batch + row

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    record = self.global_sampler[self.global_position(index)]
    return grain.RecordMetadata(index=index, record_key=record.record_key, rng=record.rng)


def create_train_loader(config, *, shard_index: int | None = None,
                        shard_count: int | None = None, data_source=None) -> grain.DataLoader:
  """Endless shuffled, augmented train batches: this shard's batch_size // shard_count rows of
  each global batch (HostRowsSampler)."""
  shard_index, shard_count = _shard(shard_index, shard_count)
  if data_source is None:
    data_source = get_data_source(config, config.dataset.train_split)
  global_batch = int(config.input.batch_size)
  batch = _local_batch(global_batch, shard_count, "batch_size")
  if len(data_source) < global_batch:
    raise ValueError(f"the train split has {len(data_source)} examples, fewer than one global "
                     f"batch ({global_batch})")
  workers = int(config.input.num_workers)
  global_sampler = grain.IndexSampler(len(data_source), shuffle=True, num_epochs=None,
                                      seed=_seed(config))
  sampler = HostRowsSampler(global_sampler, shard_index, shard_count, batch, workers)
  transform = TrainTransform(config.tasks, _image_size(config), augment_options(config))
  return grain.DataLoader(
      data_source=data_source, sampler=sampler, shard_options=grain.NoSharding(),
      operations=[transform, grain.Batch(batch, drop_remainder=True)], worker_count=workers)


class _Subset:
  """Records [start, stop) of a random-access source, itself a random-access source."""

  def __init__(self, source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int):
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for a shard of {len(self)} records")
    return self.source[self.start + index]

  def __repr__(self) -> str:
    return f"_Subset({self.source!r}, {self.start}, {self.stop})"


class EvalLoader:
  """Every example of the split exactly once, in order, in fixed-size padded batches.

  Each shard yields the same number of batches (ceil(ceil(N / shard_count) / B)), so all
  processes run the same number of eval steps; 'valid' marks the real rows.
  """

  def __init__(self, data_source, tasks: Sequence[str], image_size: tuple[int, int],
               batch_size: int, shard_index: int, shard_count: int, num_workers: int = 0,
               image_order: int = 1):
    self.num_examples = len(data_source)
    self.batch_size = batch_size
    self._pad = padding_example(tasks, image_size)
    self.num_batches = math.ceil(math.ceil(self.num_examples / shard_count) / batch_size)
    self._loader = None
    # Contiguous shards of sizes differing by at most one (as grain's even_split). We slice the
    # source ourselves: grain 0.2.18's DataLoader drops records of uneven shards.
    start = shard_index * self.num_examples // shard_count
    stop = (shard_index + 1) * self.num_examples // shard_count
    self.shard = _Subset(data_source, start, stop)
    if len(self.shard):
      sampler = grain.IndexSampler(len(self.shard), shuffle=False, num_epochs=1, seed=0)
      # No Batch op: with workers grain batches per worker (ragged batches); we batch here.
      self._loader = grain.DataLoader(
          data_source=self.shard, sampler=sampler,
          operations=[EvalTransform(tasks, image_size, image_order)], worker_count=num_workers)

  def __len__(self) -> int:
    return self.num_batches

  def _stack(self, rows: list[dict]) -> dict:
    rows = rows + [self._pad] * (self.batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in self._pad}

  def __iter__(self) -> Iterator[dict]:
    count, rows = 0, []
    for element in self._loader if self._loader is not None else ():
      rows.append(element)
      if len(rows) == self.batch_size:
        count += 1
        yield self._stack(rows)
        rows = []
    if rows:
      count += 1
      yield self._stack(rows)
    for _ in range(self.num_batches - count):
      yield self._stack([])


def create_eval_loader(config, *, shard_index: int | None = None,
                       shard_count: int | None = None, data_source=None,
                       split: str | None = None) -> EvalLoader:
  """Resize-only batches of eval_batch_size // shard_count covering this shard once."""
  shard_index, shard_count = _shard(shard_index, shard_count)
  if data_source is None:
    data_source = get_data_source(config, split or config.dataset.eval_split)
  batch = _local_batch(int(config.input.eval_batch_size), shard_count, "eval_batch_size")
  return EvalLoader(data_source, config.tasks, _image_size(config), batch, shard_index,
                    shard_count, num_workers=int(config.input.num_workers),
                    image_order=int(config.dataset.augment.image_order))
