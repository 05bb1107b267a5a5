"""Free Sinewich on PASCAL-Context (4 tasks), Swin-T, 448x448: the paper's main table.

  python -m freesine_jax.main --config=configs/pascal_context.py:r64 --workdir=...
  python -m freesine_jax.tools.count_params --config=configs/pascal_context.py:r64

Arg: r16 | r32 | r64 plus ablations (see configs/_paper.py). Prepare the data first
(docs/datasets.md) and point model.backbone_weights at converted Swin-T IN-1k weights
(docs/pretrained.md).
"""
import ml_collections

from configs import _paper
from configs import common


def get_config(arg: str = "r64") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.tasks = ("semseg", "human_parts", "sal", "normals")
  config.num_classes = {"semseg": 21, "human_parts": 7}
  config.loss_weights = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0}

  config.dataset = _paper.dataset("pascal_context", (448, 448))
  config.input = _paper.input_pipeline(32)

  config.model = _paper.model(arg)

  common.add_training_defaults(config)
  # Single-task fine-tuning reference row of the paper's table (docs/design.md §2) for Δm.
  config.eval.reference = {"semseg": {"mIoU": 67.21}, "human_parts": {"mIoU": 61.93},
                           "sal": {"mIoU": 62.35}, "normals": {"mean": 17.97}}
  return config
