"""Task registry: the one place that says what each dense-prediction task is and how it behaves.

Every task is an instance of a task *kind*. The kind carries everything the rest of the code needs
to handle the task's labels and outputs — the label layout (channels, dtypes, which pixels are
valid, the padding value), the model's output channels, the loss, the post-processing, the metric
meter and how the label moves under augmentation — so losses, metrics, evaluation, the input
pipeline and the dataset builders look the task up here instead of branching on its name. Adding
a kind is one `KINDS` entry plus its functions (docs/design.md §7 shows one).

Functions are named 'package.module:attribute' and imported on first use (`resolve`), the lookup
by name that data/registry.py uses for builders: the modules implementing them (losses, metrics,
data/augment) read this registry themselves, and it imports none of them.

  task         kind            label in a batch                 model output (B,H,W,C)  invalid
  semseg       classification  int32 (B,H,W) class ids          logits, C=num_classes   255
  human_parts  classification  int32 (B,H,W) part ids           logits, C=num_classes   255
  sal          saliency        int32 (B,H,W) in {0,1}           1 logit                 255
  edge         edge            int32 (B,H,W) in {0,1}           1 logit                 255
  normals      normals         float32 (B,H,W,3) unit vectors   3 raw values            zero vector
  depth        depth           float32 (B,H,W) metres (units)   1 value                 <= 0

Stored (unbatched) examples use the same layout with uint8 for the integer labels.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Mapping

import numpy as np

from freesine_jax import errors

IGNORE_INDEX = 255

# Class-balanced BCE weight of edge positives (MTLoRA/MTI-Net); the edge loss and meter share it.
EDGE_POS_WEIGHT = 0.95


# ----------------------------------------------------------------------------- label layouts


def _not_ignored(label: np.ndarray) -> np.ndarray:
  return np.asarray(label) != IGNORE_INDEX


def _nonzero_vectors(label: np.ndarray) -> np.ndarray:
  return np.any(np.asarray(label) != 0, axis=-1)


def _positive(label: np.ndarray) -> np.ndarray:
  return np.asarray(label) > 0


@dataclasses.dataclass(frozen=True)
class LabelLayout:
  """How a task's label map is stored, batched, padded and told valid, pixel by pixel."""
  channels: int | None  # None: an (H, W) map; k: (H, W, k)
  stored_dtype: str     # dtype of the stored (TFDS) label
  batch_dtype: str      # dtype of the label in a batch
  padding_value: float  # every pixel of a padding example; reads as invalid
  valid_pixels: Callable[[np.ndarray], np.ndarray]  # label (..., H, W[, k]) -> bool (..., H, W)

  def shape(self, height: int | None, width: int | None) -> tuple[int | None, ...]:
    return (height, width) if self.channels is None else (height, width, self.channels)


CLASS_IDS = LabelLayout(None, "uint8", "int32", IGNORE_INDEX, _not_ignored)
UNIT_VECTORS = LabelLayout(3, "float32", "float32", 0.0, _nonzero_vectors)
POSITIVE_VALUES = LabelLayout(None, "float32", "float32", 0.0, _positive)


# ----------------------------------------------------------------------------- kinds


@dataclasses.dataclass(frozen=True)
class TaskKind:
  """What every task of one kind shares. Function fields name 'module:attribute':

  loss         (output (B,H,W,C), label (B,H,W[,k]), totals=None, **loss_options) -> scalar
               loss: a sum over pixels divided by counts of the labels, `totals` (default: of
               `label`; those of a whole batch when the rows are a micro-batch of it)
  loss_totals  (label, **loss_options) -> {name: count}: the totals `loss` divides by, additive
               over rows (losses.py)
  postprocess  output (B,H,W,C) numpy -> what the meter consumes (channels checked before)
  meter        a metrics.Meter class: meter(task, [num_classes=], **meter_options, **options)
  warp         (label, sampler, *, angle_degrees, scale, label_fill) -> the label resampled by an
               augment._Sampler (rotation, zoom and resize in one pass)
  mirror       label -> label after its array was flipped left-right (None: values unchanged)
  draw         (ax_label, ax_prediction, label, prediction, *, spec, class_names) draws one
               example's ground truth and prediction (freesine_jax/visualize.py)
  """
  name: str
  label: LabelLayout
  output_channels: int | None  # None: the task's number of classes
  loss: str
  loss_totals: str
  postprocess: str
  meter: str
  warp: str
  mirror: str | None = None
  draw: str = "freesine_jax.visualize:draw_values"
  loss_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  meter_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    # Read-only: every caller shares the registry's entries.
    object.__setattr__(self, "loss_options", types.MappingProxyType(dict(self.loss_options)))
    object.__setattr__(self, "meter_options", types.MappingProxyType(dict(self.meter_options)))


KINDS = {kind.name: kind for kind in (
    TaskKind("classification", CLASS_IDS, None,
             loss="freesine_jax.losses:softmax_cross_entropy",
             loss_totals="freesine_jax.losses:class_totals",
             postprocess="freesine_jax.metrics:argmax_class_ids",
             meter="freesine_jax.metrics:ConfusionMatrixMeter",
             warp="freesine_jax.data.augment:warp_class_ids",
             draw="freesine_jax.visualize:draw_class_ids"),
    TaskKind("saliency", CLASS_IDS, 1,
             loss="freesine_jax.losses:balanced_binary_cross_entropy",  # batch-balanced weight
             loss_totals="freesine_jax.losses:balanced_totals",
             postprocess="freesine_jax.metrics:sigmoid_probabilities",
             meter="freesine_jax.metrics:SaliencyMeter",
             warp="freesine_jax.data.augment:warp_class_ids",
             draw="freesine_jax.visualize:draw_probabilities"),
    TaskKind("edge", CLASS_IDS, 1,
             loss="freesine_jax.losses:balanced_binary_cross_entropy",
             loss_totals="freesine_jax.losses:balanced_totals",
             postprocess="freesine_jax.metrics:sigmoid_probabilities",
             meter="freesine_jax.metrics:EdgeMeter",
             warp="freesine_jax.data.augment:warp_class_ids",
             draw="freesine_jax.visualize:draw_edges",
             loss_options={"pos_weight": EDGE_POS_WEIGHT},
             meter_options={"pos_weight": EDGE_POS_WEIGHT}),
    TaskKind("normals", UNIT_VECTORS, 3,
             loss="freesine_jax.losses:normals_l1",
             loss_totals="freesine_jax.losses:normals_totals",
             postprocess="freesine_jax.metrics:unit_vectors",
             meter="freesine_jax.metrics:NormalsMeter",
             warp="freesine_jax.data.augment:warp_normals",
             mirror="freesine_jax.data.augment:mirror_normals",
             draw="freesine_jax.visualize:draw_normals"),
    TaskKind("depth", POSITIVE_VALUES, 1,
             loss="freesine_jax.losses:depth_l1",
             loss_totals="freesine_jax.losses:depth_totals",
             postprocess="freesine_jax.metrics:first_channel",
             meter="freesine_jax.metrics:DepthMeter",
             warp="freesine_jax.data.augment:warp_depth",
             draw="freesine_jax.visualize:draw_values"),
)}


# ----------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task: its kind, its headline metric, and what is particular to it."""
  name: str
  kind: TaskKind
  higher_is_better: bool  # direction of the headline metric
  headline_metric: str
  num_classes: int | None = None  # default class count, for kinds whose output is the classes
  # After augmentation, a map left without foreground (no value in 1..254) is all IGNORE_INDEX:
  # the image has no annotated object of this task (human_parts: no person).
  ignore_without_foreground: bool = False

  def __post_init__(self):
    if (self.kind.output_channels is None) != (self.num_classes is not None):
      raise ValueError(f"task {self.name!r} of kind {self.kind.name!r}: num_classes must be set "
                       "exactly when the kind's output channels are the classes")


TASKS = {spec.name: spec for spec in (
    TaskSpec("semseg", KINDS["classification"], True, "mIoU", num_classes=21),
    TaskSpec("human_parts", KINDS["classification"], True, "mIoU", num_classes=7,
             ignore_without_foreground=True),
    TaskSpec("sal", KINDS["saliency"], True, "mIoU"),
    TaskSpec("normals", KINDS["normals"], False, "mean"),
    TaskSpec("edge", KINDS["edge"], False, "loss"),
    TaskSpec("depth", KINDS["depth"], False, "rmse"),
)}

def get_task(name: str) -> TaskSpec:
  """The registry entry of task `name` (a UserError naming the known tasks if there is none)."""
  if name not in TASKS:
    hint = errors.did_you_mean(name, TASKS)
    if "," in str(name):
      hint += (f"; a tuple on the command line is written --config.tasks=\"("
               f"{', '.join(repr(t.strip()) for t in str(name).split(','))})\"")
    raise errors.UserError(f"unknown task {name!r}{hint}; the tasks are {', '.join(TASKS)}")
  return TASKS[name]


def new_tasks(config) -> tuple[str, ...]:
  """The tasks config.train.new_tasks adds to the run in config.train.init_from: the trailing
  entries of config.tasks (docs/training.md, "Adding a task"). A UserError names what is wrong."""
  spec = config.train.new_tasks
  names = tuple(t.strip() for t in str(spec).split(",") if t.strip())
  for name in names:
    get_task(name)
  if not names:
    return ()
  if len(set(names)) != len(names):
    raise errors.UserError(f"config.train.new_tasks={spec!r} names a task "
                           "twice")
  tasks = tuple(config.tasks)
  if tasks[len(tasks) - len(names):] != names:
    old = tuple(t for t in tasks if t not in names)
    raise errors.UserError(
        f"config.train.new_tasks={spec!r}: config.tasks must end with the new "
        f"tasks, after the trained run's, e.g. --config.tasks=\"{old + names!r}\"")
  return names


def class_count(task: str, configured: int | None = None) -> int | None:
  """Number of classes of `task` (configured overrides the default); None if it has none."""
  spec = get_task(task)
  if spec.num_classes is None:
    return None
  return spec.num_classes if configured is None else int(configured)


def output_channels(task: str, num_classes: int | None = None) -> int:
  """Channels of the model's output for `task` (num_classes overrides a class count)."""
  spec = get_task(task)
  if spec.kind.output_channels is not None:
    return spec.kind.output_channels
  return class_count(task, num_classes)


@functools.cache
def resolve(reference: str) -> Any:
  """The attribute a 'package.module:attribute' reference names (errors.resolve), cached."""
  return errors.resolve(reference, "task registry reference")
