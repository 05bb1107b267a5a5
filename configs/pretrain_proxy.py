"""Proxy pretraining of the synthetic default's small Swin (freesine_jax/pretrain.py).

  python -m freesine_jax.tools.pretrain --config=configs/pretrain_proxy.py[:tiny] [--out=DIR]

Without --out the proxy goes to the cache that configs/synthetic.py's backbone_weights
('proxy:synthetic') reads, where the default job would otherwise make it on first use. The arg is
the preset: 'synthetic' (default) or 'tiny' (configs/synthetic.py:tiny's Swin). Overrides such as
--config.train.num_steps=500 make another recipe, cached under another name; to use it, pass the
printed directory as --config.model.backbone_weights.
"""
import ml_collections

from freesine_jax import pretrain


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  return pretrain.get_config(arg or "synthetic")
