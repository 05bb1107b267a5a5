r"""Build the TFDS (array_record) copy of a real multi-task dataset from a local folder.

  python -m freesine_jax.data.prepare --dataset=pascal_context --manual_dir=/data/PASCAL_MT \
      [--data_dir=<dir>] [--validate_only]

--data_dir defaults to $FREESINE_DATA_DIR or ~/.cache/freesine_jax/tensorflow_datasets, where the
configs look.

Prints, per split, the number of examples and how many carry a usable label for each task. The
builders, their base class and readers are in freesine_jax/data/builder.py; a failure is reported
as the `DatasetError` naming the file at fault, without a traceback.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from absl import app
from absl import flags

from freesine_jax.data import builder as builder_lib
from freesine_jax.data import registry
from freesine_jax.data.builder import DatasetError


def format_stats(stats: Mapping[str, Mapping[str, int]]) -> str:
  lines = []
  for split, counts in stats.items():
    n = counts["examples"]
    per_task = ", ".join(f"{t} {c}/{n}" for t, c in counts.items() if t != "examples")
    lines.append(f"{split}: {n} examples; with valid labels: {per_task}")
  return "\n".join(lines)


def prepare(dataset: str, manual_dir: str, data_dir: str | None = None,
            validate_only: bool = False) -> dict[str, dict[str, int]]:
  """Builds (or only validates) `dataset`; returns per-split, per-task counts."""
  cls = registry.builder_class(dataset)
  if not (isinstance(cls, type) and issubclass(cls, builder_lib.ManualDirBuilder)):
    raise DatasetError(f"{dataset}: not a manual_dir dataset; nothing to prepare here")
  kwargs = {"data_dir": os.path.expanduser(data_dir)} if data_dir else {}
  builder = cls(manual_dir=manual_dir, **kwargs)
  if validate_only:
    return builder.validate()
  already = builder.is_prepared()
  builder.download_and_prepare()
  if not already and builder.generation_stats:
    return builder.generation_stats
  return builder_lib.count_from_source(builder)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    stats = prepare(f.dataset, f.manual_dir, f.data_dir, f.validate_only)
  except DatasetError as e:
    raise SystemExit(f"DatasetError: {e}") from None
  print(("validated" if f.validate_only else "prepared") + f" {f.dataset}:")
  print(format_stats(stats))


def _define_flags() -> None:
  """Flags are defined only when run as a script, so importing this module defines none."""
  flags.DEFINE_enum("dataset", None, [n for n in registry.DATASET_NAMES if n != "synthetic"],
                    "Dataset to prepare.")
  flags.DEFINE_string("manual_dir", None, "Folder holding the dataset in its standard layout.")
  flags.DEFINE_string("data_dir", registry.DEFAULT_DATA_DIR,
                      "TFDS data_dir to write to (the configs' default; $FREESINE_DATA_DIR).")
  flags.DEFINE_bool("validate_only", False, "Check every file decodes; write nothing.")
  flags.mark_flags_as_required(["dataset", "manual_dir"])


def run() -> None:
  """Console-script entry point (`freesine-prepare-data`)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
