"""Free Sinewich on PASCAL-Context (4 tasks), Swin-T, 448x448: the paper's main table.

  python -m freesine_jax.main --config=configs/pascal_context.py:r64 --workdir=...
  python -m freesine_jax.tools.count_params --config=configs/pascal_context.py:r64

Arg: r16 | r32 | r64 plus ablations or one baseline (configs/common.py). Prepare the data first
(docs/datasets.md) and point model.backbone_weights at converted Swin-T IN-1k weights
(docs/pretrained.md). The keys and their defaults: configs/base.py, docs/configuration.md.
"""
import ml_collections

from configs import base
from configs import common


def get_config(arg: str = "r64") -> ml_collections.ConfigDict:
  tokens = common.parse_arg(arg, ranks=True)
  config = base.get_config()  # PASCAL-Context's tasks, classes, augmentation and recipe
  config.model.lora.rank = common.rank_of(tokens)
  common.apply_ablations(config, tokens)
  common.apply_baseline(config, tokens)
  common.apply_lean_compute(config, tokens)
  # Single-task fine-tuning reference row of the paper's table (docs/design.md §2) for Δm.
  config.eval.reference = {"semseg": {"mIoU": 67.21}, "human_parts": {"mIoU": 61.93},
                           "sal": {"mIoU": 62.35}, "normals": {"mean": 17.97}}
  return config
