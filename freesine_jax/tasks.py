"""Task registry: the one place that says what each dense-prediction task is.

Label conventions (shared by every dataset builder, the input pipeline, losses and metrics):

  task         label in a batch                        model output (B,H,W,C)   ignore
  semseg       int32 (B,H,W) class ids                 logits, C=num_classes    255
  human_parts  int32 (B,H,W) part ids                  logits, C=num_classes    255
  sal          int32 (B,H,W) in {0,1}                  1 logit                  255
  edge         int32 (B,H,W) in {0,1}                  1 logit                  255
  normals      float32 (B,H,W,3) unit vectors          3 raw values             zero vector
  depth        float32 (B,H,W) metres (or units)       1 value                  0 (or <= 0)

Stored (unbatched) examples use the same layout with uint8 for the integer labels.
"""
from __future__ import annotations

import dataclasses

IGNORE_INDEX = 255

# Class-balanced BCE weight of edge positives (MTLoRA/MTI-Net); the loss and the edge meter share it.
EDGE_POS_WEIGHT = 0.95

ALL_TASKS = ("semseg", "human_parts", "sal", "normals", "edge", "depth")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  kind: str  # 'classification' | 'binary' | 'normals' | 'depth'
  default_channels: int
  default_loss_weight: float
  higher_is_better: bool  # direction of the headline metric
  headline_metric: str


TASKS = {
    "semseg": TaskSpec("semseg", "classification", 21, 1.0, True, "mIoU"),
    "human_parts": TaskSpec("human_parts", "classification", 7, 2.0, True, "mIoU"),
    "sal": TaskSpec("sal", "binary", 1, 5.0, True, "mIoU"),
    "normals": TaskSpec("normals", "normals", 3, 10.0, False, "mean"),
    "edge": TaskSpec("edge", "binary", 1, 50.0, False, "loss"),
    "depth": TaskSpec("depth", "depth", 1, 1.0, False, "rmse"),
}


# Labels resampled with nearest neighbour (class ids / binary masks): the non-regression tasks.
DISCRETE_TASKS = tuple(n for n, s in TASKS.items() if s.kind in ("classification", "binary"))


def get_task(name: str) -> TaskSpec:
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}; known tasks: {', '.join(ALL_TASKS)}")
  return TASKS[name]


def output_channels(task: str, num_classes: int | None = None) -> int:
  """Channels of the model's output for `task` (num_classes overrides for classification)."""
  spec = get_task(task)
  if spec.kind == "classification" and num_classes is not None:
    return int(num_classes)
  return spec.default_channels
