"""Name -> TFDS builder class for every dataset freesine_jax can read.

Builders are imported lazily so that importing the registry never pulls in a dataset's
dependencies (e.g. scipy.io for .mat files) unless that dataset is used.
"""
from __future__ import annotations

import importlib
import os

from freesine_jax import errors

_BUILDERS = {
    "synthetic": "freesine_jax.data.synthetic:SyntheticMultiTask",
    "pascal_context": "freesine_jax.data.pascal_context:PascalContextMT",
    "nyud": "freesine_jax.data.nyud:NyudMT",
    "cityscapes": "freesine_jax.data.cityscapes:CityscapesMT",
}

DATASET_NAMES = tuple(_BUILDERS)

# Where prepared datasets live unless config.dataset.data_dir / --data_dir say otherwise.
DEFAULT_DATA_DIR = os.environ.get(
    "FREESINE_DATA_DIR", os.path.expanduser("~/.cache/freesine_jax/tensorflow_datasets"))


def builder_class(name: str):
  if name not in _BUILDERS:
    raise errors.UserError(f"config.dataset.name={name!r} is not a dataset"
                           f"{errors.did_you_mean(name, DATASET_NAMES)}; the datasets are "
                           f"{', '.join(DATASET_NAMES)}")
  return errors.resolve(_BUILDERS[name], f"the builder of dataset {name!r}")


def class_names(name: str) -> dict[str, tuple[str, ...]]:
  """{task: class names} of dataset `name` (its module's CLASS_NAMES; {} if it has none)."""
  module_name = _BUILDERS[name].split(":")[0] if name in _BUILDERS else None
  if module_name is None:
    return {}
  return dict(getattr(importlib.import_module(module_name), "CLASS_NAMES", {}))
