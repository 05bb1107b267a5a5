"""Default job: Free Sinewich on the embedded synthetic multi-task dataset (CPU, minutes).

  python -m freesine_jax.main --config=configs/synthetic.py --workdir=/tmp/freesine_synthetic

A small Swin with all six tasks at 64x64. Its frozen weights are the proxy backbone
('proxy:synthetic': pretrained by freesine_jax/pretrain.py on upstream images no split contains,
on first use, a few minutes on 2 cores, then cached), as the paper's come from ImageNet;
--config.model.backbone_weights='' adapts a randomly initialised one instead. Everything else
(adapters, Clock Net, shared decoder group, losses) is the paper's setup.
The arg is a comma-separated list: 'tiny' shrinks it further for tests and demos (32x32 images,
24 training examples, r=4, a randomly initialised backbone) and the paper's ablation names switch ablations on
(configs/common.py), e.g. --config=configs/synthetic.py:no_sine or :tiny,no_lcn.
"""
import ml_collections

from configs import base
from configs import common
from freesine_jax import pretrain
from freesine_jax.data import synthetic


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  tokens = common.parse_arg(arg, extra=("tiny",))
  tiny = "tiny" in tokens
  config = base.get_config()
  config.tasks = ("semseg", "human_parts", "sal", "normals", "edge", "depth")
  config.num_classes.semseg = synthetic.NUM_SEMSEG_CLASSES
  config.num_classes.human_parts = synthetic.NUM_HUMAN_PARTS_CLASSES

  config.dataset.name = "synthetic"
  config.dataset.builder_config = "tiny" if tiny else "default"
  config.dataset.image_size = (32, 32) if tiny else (64, 64)

  config.input.batch_size = 8
  config.input.eval_batch_size = 8 if tiny else 32
  config.input.num_workers = 0

  # The Swin of the proxy preset (freesine_jax/pretrain.py), so its weights fit.
  proxy = pretrain.get_config("tiny" if tiny else "synthetic")
  for key in pretrain.ARCHITECTURE_KEYS:
    config.model[key] = proxy.model[key]
  config.model.backbone_weights = "" if tiny else pretrain.PREFIX + proxy.preset
  config.model.drop_path_rate = 0.1
  config.model.lora.rank = 4 if tiny else 8
  config.model.decoder.head_channels = 32 if tiny else 64
  common.apply_ablations(config, tokens)
  common.apply_baseline(config, tokens)

  config.optim.lr_base = 2e-3 * 512 / config.input.batch_size  # peak lr 2e-3 at this batch
  config.optim.warmup_lr_base = 0.0
  config.optim.min_lr_base = 2e-5 * 512 / config.input.batch_size
  config.train.num_epochs = 2 if tiny else 6
  config.train.warmup_epochs = 0 if tiny else 1
  config.train.log_every_steps = 2 if tiny else 20
  config.train.image_every_steps = 6 if tiny else 100
  config.train.checkpoint_every_steps = 3 if tiny else 100
  return config
