"""Where a run's numbers go: metrics.jsonl, TensorBoard and stdout (process 0 only).

`Writer` is what the train loop logs through; `JsonLines` keeps metrics.jsonl readable as one
run across resumes; `jsonable` turns metrics (numpy, jax arrays, non-finite floats) into JSON
values for every JSON file a run writes. clu.metric_writers is not used: it needs TensorFlow for
TensorBoard, which this project keeps out of its runtime; tensorboardX writes the same files.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from etils import epath
import jax
import numpy as np

from freesine_jax import checkpointing


def jsonable(x: Any) -> Any:
  """Numbers, arrays and nested containers as JSON values (non-finite floats -> None)."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def flat_scalars(results: Mapping[str, Mapping[str, Any]], prefix: str) -> dict[str, float]:
  """{'<prefix>/<task>/<metric>': value} of the numeric metrics of per-task results."""
  flat = {}
  for task, metrics in results.items():
    for key, value in metrics.items():
      if isinstance(value, (int, float, np.integer, np.floating)):
        flat[f"{prefix}/{task}/{key}"] = float(value)
  return flat


def format_duration(seconds: float) -> str:
  """h:mm:ss (m:ss under an hour); '?' for an unknown (infinite) duration."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class JsonLines:
  """A JSON-lines file that grows by lines: appended on a file system, rewritten whole on an
  object store (gs://), whose objects cannot be appended to."""

  def __init__(self, path: str, rewrite: bool):
    self.path = epath.Path(path)
    self.rewrite = rewrite
    self._lines = []
    if rewrite and self.path.exists():
      self._lines = self.path.read_text().splitlines(keepends=True)
    self._file = None if rewrite else self.path.open("a")

  def drop_after(self, step: int) -> int:
    """Drops the rows past `step` (and a last line cut short by a kill), rewriting the file
    atomically, so a resumed run's file reads as one run. Returns how many rows it dropped."""
    if not self.path.exists():
      return 0
    lines = self.path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and int(row.get("step", 0)) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines) and all(line.endswith("\n") for line in lines):
      return 0
    if self._file is not None:
      self._file.close()
    if self.rewrite:
      self.path.write_text("".join(kept))
    else:
      partial = self.path.with_name(self.path.name + ".partial")
      partial.write_text("".join(kept))
      os.replace(partial, self.path)
      self._file = self.path.open("a")
    self._lines = kept if self.rewrite else []
    return len(lines) - len(kept)

  def write(self, record: Mapping[str, Any]) -> None:
    line = json.dumps(jsonable(record)) + "\n"
    if self.rewrite:
      self._lines.append(line)
      self.path.write_text("".join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class Writer:
  """metrics.jsonl + TensorBoard (tensorboardX: scalars and images) + stdout, on process 0.

  The workdir may be a gs:// URL (TensorBoard then needs google-cloud-storage, the JSON files
  gcsfs: docs/launch.md).
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self._jsonl = JsonLines(f"{workdir}/metrics.jsonl", rewrite=checkpointing.is_url(workdir))
      self._tb = SummaryWriter(f"{workdir}/tb")
      self._tb_dir = f"{workdir}/tb"

  def continue_from(self, step: int) -> None:
    """Training goes on from `step` (a resume, or a restart with no checkpoint): rows logged past
    it by the interrupted run are dropped from metrics.jsonl, and TensorBoard is told to hide
    its events past it (tensorboardX purge_step), so neither shows a doubled segment."""
    if not self.enabled:
      return
    if self._jsonl.drop_after(step):
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb.close()
      self._tb = SummaryWriter(self._tb_dir, purge_step=step + 1)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write({"step": int(step), **values})
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def images(self, step: int, images: Sequence[np.ndarray], prefix: str = "examples") -> None:
    """RGB uint8 (H, W, 3) images as TensorBoard images '<prefix>/<i>'."""
    if not self.enabled:
      return
    for i, image in enumerate(images):
      self._tb.add_image(f"{prefix}/{i}", np.asarray(image, np.uint8), int(step),
                         dataformats="HWC")
    self._tb.flush()

  def print(self, text: str) -> None:
    if self.enabled:
      print(text, flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
