"""Every shipped config loads, overrides parse, and the model it describes builds."""
import importlib

import jax
import jax.numpy as jnp
import pytest

from configs import _paper
from freesine_jax import models

CONFIGS = [("synthetic", ""), ("synthetic", "tiny"), ("synthetic", "tiny,no_lcn,taps_full"),
           ("pascal_context", "r16"),
           ("pascal_context", "r32,no_sine,no_lowpass"), ("nyud", "r64"), ("cityscapes", "r32")]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_builds_model(name, arg):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  for section in ("dataset", "input", "model", "optim", "train", "eval"):
    assert section in config, section
  assert set(config.loss_weights) >= set(config.tasks)
  model = models.build_model(config)
  images = jax.ShapeDtypeStruct((1, *config.dataset.image_size, 3), jnp.float32)
  out = jax.eval_shape(lambda x: model.init_with_output({"params": jax.random.key(0)}, x)[0],
                       images)
  assert set(out) == set(config.tasks)
  for task in config.tasks:
    assert out[task].shape[1:3] == tuple(config.dataset.image_size)


def test_paper_arg_parsing():
  assert _paper.parse_arg("") == (64, ())
  assert _paper.parse_arg("r32,no_sine") == (32, ("no_sine",))
  mc = _paper.model("r16,no_lcn,no_sine,no_lowpass,independent_decoder,depthwise")
  assert (mc.lora.rank, mc.clock_net, mc.sine_awb.modulation, mc.sine_awb.lowpass,
          mc.decoder.kind, mc.sine_awb.w_mode) == (16, False, "linear", "none", "independent",
                                                    "depthwise")
  with pytest.raises(ValueError, match="r<rank>"):
    _paper.parse_arg("r64,fast")


def test_synthetic_takes_the_paper_ablations():
  from configs import synthetic
  config = synthetic.get_config("no_sine")
  assert (config.model.sine_awb.modulation, config.model.decoder.modulation) == ("linear",
                                                                               "linear")
  config = synthetic.get_config("tiny,no_lcn")
  assert config.model.clock_net is False and tuple(config.dataset.image_size) == (32, 32)
  with pytest.raises(ValueError, match="nosine"):
    synthetic.get_config("nosine")


def test_count_params_cli_last_line_is_the_trainable_total():
  import subprocess
  import sys
  out = subprocess.run(
      [sys.executable, "-m", "freesine_jax.tools.count_params",
       "--config=configs/pascal_context.py:r64"], capture_output=True, text=True, check=True,
      cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1])).stdout
  last = out.strip().splitlines()[-1]
  # Closed form (docs/method.md): shared LoRA + 12 full W + prompt projections + 4 prompt LNs and
  # gates + tokens and Clock Net + trainable LayerNorms/rel-pos/patch_embed + decoders.
  r = 64
  expected = (70_656 * r + 12 * 9 * r * r + 387_072 + 2_880 + 4 + 483 + 51_258 + 1_072_904)
  assert expected == 6_478_953
  assert last == f"trainable_params={expected}"
  assert "TA adapters" in out and "decoders" in out
