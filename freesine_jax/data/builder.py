"""What the real-dataset builders share: the TFDS base class, file readers and validation.

`ManualDirBuilder` is the base class of the PASCAL-Context, NYUDv2 and Cityscapes builders: it
reads a local folder (nothing can be downloaded). The readers turn every broken input (missing
file, truncated image, wrong-shaped .mat/.npy, unknown class value) into a `DatasetError` naming
the file. Each task's stored feature and its "has a usable pixel" test come from the label layout
in the task registry (freesine_jax/tasks.py). The command line that builds a dataset is
freesine_jax/data/prepare.py.

Nothing half-written survives a failure: the builders check that every listed file exists before
any example is written, decode errors raise `DatasetError` during generation, and TFDS writes into
an `incomplete.*` directory that it deletes on error and renames only after every split succeeded.
"""
from __future__ import annotations

import abc
import io
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

from absl import logging as absl_logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from freesine_jax import errors
from freesine_jax import tasks as tasks_lib

_MAX_LISTED_PROBLEMS = 20

# TFDS notices that tell our users nothing: "OpenCV is not installed" (PIL decodes our PNGs
# well), "Variant folder ... has no dataset_info.json" (a set not built yet, which the builders
# say in their own words). Demoted to DEBUG: in the log at a verbose level, off the console.
QUIET_TFDS_NOTICES = ("OpenCV is not installed", "Variant folder ")


class _DemoteTfdsNotices(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno > logging.DEBUG and str(record.msg).startswith(QUIET_TFDS_NOTICES):
      record.levelno, record.levelname = logging.DEBUG, "DEBUG"
      return absl_logging.get_absl_logger().isEnabledFor(logging.DEBUG)
    return True


if not any(isinstance(f, _DemoteTfdsNotices) for f in absl_logging.get_absl_logger().filters):
  absl_logging.get_absl_logger().addFilter(_DemoteTfdsNotices())


class DatasetError(Exception):
  """A dataset folder is missing, incomplete or holds a file that cannot be used."""


def rebuild_advice(name: str, folder: str, data_dir: str) -> str:
  """What to do about a damaged or incomplete prepared folder of dataset `name`: delete it and
  make it again (the synthetic set renders itself; the others are prepared from their files)."""
  if name == "synthetic":
    return (f"delete it (rm -r {folder}) and rerun: the synthetic set is rendered again on "
            "first use")
  return (f"delete it (rm -r {folder}) and prepare it again: python -m freesine_jax.data.prepare "
          f"--dataset={name} --manual_dir=<folder> --data_dir={data_dir} (docs/datasets.md)")


def incomplete_error(name: str, folder: str, data_dir: str) -> errors.UserError:
  """A prepared folder without dataset_info.json (TFDS writes it last; TFDS itself would
  'reuse' such a folder and find no splits)."""
  return errors.UserError(
      f"dataset {name!r}: {folder} is incomplete (it has no dataset_info.json, which TFDS "
      f"writes last); {rebuild_advice(name, folder, data_dir)}")


# ----------------------------------------------------------------------------- readers


def rel(root: str, path: str) -> str:
  """`path` relative to the dataset root (what error messages show)."""
  try:
    return os.path.relpath(path, root)
  except ValueError:
    return path


def read_id_list(path: str) -> list[str]:
  """Reads a split file: one image id per line (blank lines skipped)."""
  if not os.path.isfile(path):
    raise DatasetError(f"{path}: missing split file (expected one image id per line)")
  try:
    with open(path, "r", encoding="utf-8") as f:
      ids = [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise DatasetError(f"{path}: unreadable split file ({e})") from None
  if not ids:
    raise DatasetError(f"{path}: split file is empty (expected one image id per line)")
  return ids


def check_files_exist(root: str, required: Iterable[tuple[str, str]]) -> None:
  """Raises one DatasetError listing every missing (path, description) pair."""
  missing = [(p, what) for p, what in required if not os.path.isfile(p)]
  if not missing:
    return
  lines = [f"  {rel(root, p)}: missing (expected {what})" for p, what in
           missing[:_MAX_LISTED_PROBLEMS]]
  if len(missing) > _MAX_LISTED_PROBLEMS:
    lines.append(f"  ... and {len(missing) - _MAX_LISTED_PROBLEMS} more")
  raise DatasetError(f"{root}: dataset incomplete, {len(missing)} file(s) missing:\n"
                     + "\n".join(lines))


def _open_image(path: str, root: str) -> tuple[bytes, Image.Image]:
  """Reads and fully decodes an image file; any failure becomes a DatasetError."""
  if not os.path.isfile(path):
    raise DatasetError(f"{rel(root, path)}: missing")
  try:
    with open(path, "rb") as f:
      data = f.read()
    im = Image.open(io.BytesIO(data))
    im.load()  # Forces a full decode, so truncated files fail here.
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DatasetError(f"{rel(root, path)}: cannot decode image ({e})") from None
  return data, im


def read_rgb_image(path: str, root: str) -> tuple[Any, tuple[int, int]]:
  """Returns (value for a tfds Image feature, (H, W)).

  RGB files are stored byte-for-byte (no re-encoding); other modes (grayscale, CMYK, palette) are
  converted to RGB as the baselines' `.convert('RGB')` does, and handed to TFDS as a PIL image,
  which TFDS stores losslessly as PNG.
  """
  data, im = _open_image(path, root)
  size = (im.height, im.width)
  if im.mode == "RGB":
    return data, size
  return im.convert("RGB"), size


def read_png_array(path: str, root: str, *, channels: int | None = None) -> np.ndarray:
  """Decodes a label PNG to its raw values (palette indices for 'P' images).

  channels=None expects a single-channel (H, W) array, otherwise (H, W, channels).
  """
  _, im = _open_image(path, root)
  arr = np.asarray(im)
  if channels is None and arr.ndim != 2:
    raise DatasetError(f"{rel(root, path)}: expected a single-channel label image, "
                       f"got shape {arr.shape} (mode {im.mode})")
  if channels is not None and (arr.ndim != 3 or arr.shape[2] != channels):
    raise DatasetError(f"{rel(root, path)}: expected an image with {channels} channels, "
                       f"got shape {arr.shape} (mode {im.mode})")
  return arr


def load_mat(path: str, root: str, key: str) -> Any:
  """scipy.io.loadmat(path)[key], with unreadable files and missing keys as DatasetError."""
  import scipy.io  # Imported here: only the PASCAL builder needs it.

  if not os.path.isfile(path):
    raise DatasetError(f"{rel(root, path)}: missing")
  try:
    contents = scipy.io.loadmat(path)
  except Exception as e:  # scipy raises many types (ValueError, TypeError, MatReadError...).
    raise DatasetError(f"{rel(root, path)}: cannot read .mat file ({type(e).__name__}: {e})"
                       ) from None
  if key not in contents:
    keys = sorted(k for k in contents if not k.startswith("__"))
    raise DatasetError(f"{rel(root, path)}: expected variable {key!r}, found {keys}")
  return contents[key]


def load_npy(path: str, root: str) -> np.ndarray:
  """np.load without pickles; failures become DatasetError."""
  if not os.path.isfile(path):
    raise DatasetError(f"{rel(root, path)}: missing")
  try:
    arr = np.load(path, allow_pickle=False)
  except Exception as e:  # ValueError, OSError, EOFError, UnpicklingError...
    raise DatasetError(f"{rel(root, path)}: cannot read .npy file ({type(e).__name__}: {e})"
                       ) from None
  if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf":
    raise DatasetError(f"{rel(root, path)}: expected a numeric array, got dtype "
                       f"{getattr(arr, 'dtype', type(arr))}")
  return arr


def check_shape(arr: np.ndarray, expected: Sequence[int], path: str, root: str,
                what: str) -> None:
  if tuple(arr.shape) != tuple(expected):
    raise DatasetError(f"{rel(root, path)}: {what} has shape {tuple(arr.shape)}, expected "
                       f"{tuple(expected)} (the image's height x width)")


def check_values(arr: np.ndarray, allowed: np.ndarray, path: str, root: str, what: str) -> None:
  """Raises if `arr` holds a value outside `allowed` (listing up to 10 offenders)."""
  values = np.unique(arr)
  bad = values[~np.isin(values, allowed)]
  if bad.size:
    shown = ", ".join(str(v) for v in bad[:10].tolist())
    raise DatasetError(f"{rel(root, path)}: unknown {what} value(s) {shown}")


def check_finite(arr: np.ndarray, path: str, root: str, what: str) -> None:
  if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
    raise DatasetError(f"{rel(root, path)}: {what} contains NaN or infinite values")


def read_json(path: str, root: str) -> Any:
  if not os.path.isfile(path):
    raise DatasetError(f"{rel(root, path)}: missing")
  try:
    with open(path, "r", encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise DatasetError(f"{rel(root, path)}: cannot read JSON ({e})") from None


# ----------------------------------------------------------------------------- features


def task_feature(task: str) -> tfds.features.FeatureConnector:
  """Stored feature of one task label: its registry layout's shape and stored dtype."""
  layout = tasks_lib.get_task(task).kind.label
  return tfds.features.Tensor(shape=layout.shape(None, None), dtype=np.dtype(layout.stored_dtype),
                              encoding=tfds.features.Encoding.ZLIB)


def has_valid_label(task: str, label: np.ndarray) -> bool:
  """Whether an example carries any usable pixel for `task` (for the per-task counts)."""
  return bool(np.any(tasks_lib.get_task(task).kind.label.valid_pixels(label)))


# ----------------------------------------------------------------------------- builder base


class ManualDirBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder that reads a local dataset folder (nothing can be downloaded).

  Subclasses define TASKS, `list_examples(root)` (split -> example references, after checking
  that every needed file exists) and `load_example(root, ref)` (-> dict of numpy arrays with
  'image' as a tfds Image value and 'id').
  """

  TASKS: tuple[str, ...] = ()
  DESCRIPTION = ""
  HOMEPAGE = ""

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS looks for a checksums file next to the builder's source; resolving that path for a
    # module inside a package needs `importlib_resources`, which is not installed here, and a
    # manual_dir dataset has no checksums anyway.
    return None

  def __init__(self, *, manual_dir: str | None = None, file_format: str = "array_record",
               **kwargs):
    self._manual_root = os.path.expanduser(manual_dir) if manual_dir else None
    self.generation_stats: dict[str, dict[str, int]] = {}
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {"image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                "id": tfds.features.Text()}
    features.update({t: task_feature(t) for t in self.TASKS})
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, homepage=self.HOMEPAGE,
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True)  # Stored order = split-file order, so ds[i] is the i-th id.

  def _resolve_root(self, dl_manager=None) -> str:
    root = self._manual_root
    if root is None and dl_manager is not None:
      root = os.fspath(dl_manager.manual_dir)
    if root is None:
      raise DatasetError(f"{self.name}: no manual_dir given (the dataset cannot be downloaded)")
    if not os.path.isdir(root):
      raise DatasetError(f"{root}: manual_dir does not exist or is not a directory")
    return root

  @abc.abstractmethod
  def list_examples(self, root: str) -> dict[str, list[Any]]:
    """split -> references; raises DatasetError if any split file or listed file is missing."""

  @abc.abstractmethod
  def load_example(self, root: str, ref: Any) -> dict[str, Any]:
    """Reads, checks and converts one example; raises DatasetError naming the file at fault."""

  def example_key(self, ref: Any) -> str:
    return str(ref)

  def _split_generators(self, dl_manager):
    root = self._resolve_root(dl_manager)
    plan = self.list_examples(root)  # Fails before anything is written.
    self.generation_stats = {}
    return {split: self._generate_examples(root=root, split=split, refs=refs)
            for split, refs in plan.items()}

  def _generate_examples(self, root: str, split: str, refs: Sequence[Any]):
    stats = self.generation_stats.setdefault(split, _empty_stats(self.TASKS))
    for ref in refs:
      example = self.load_example(root, ref)
      _update_stats(stats, self.TASKS, example)
      yield self.example_key(ref), example

  def validate(self) -> dict[str, dict[str, int]]:
    """Decodes and checks every example of every split without writing anything."""
    root = self._resolve_root()
    stats = {}
    for split, refs in self.list_examples(root).items():
      stats[split] = _empty_stats(self.TASKS)
      for ref in refs:
        _update_stats(stats[split], self.TASKS, self.load_example(root, ref))
    return stats


def _empty_stats(task_names: Sequence[str]) -> dict[str, int]:
  return {"examples": 0, **{t: 0 for t in task_names}}


def _update_stats(stats: dict[str, int], task_names: Sequence[str],
                  example: Mapping[str, Any]) -> None:
  stats["examples"] += 1
  for t in task_names:
    stats[t] += int(has_valid_label(t, example[t]))


def count_from_source(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, int]]:
  """Per-split, per-task counts read back from the stored data (checks the round trip too)."""
  task_names = [t for t in builder.info.features.keys() if t in tasks_lib.TASKS]
  stats = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    stats[split] = _empty_stats(task_names)
    for i in range(len(source)):
      _update_stats(stats[split], task_names, source[i])
  return stats
