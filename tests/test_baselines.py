"""The baselines: exact published counts (derived here from Swin-T's shapes), their task paths
against direct computations, and each one training and evaluating end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import common, pascal_context, synthetic
from freesine_jax import errors
from freesine_jax import train
from freesine_jax.models import lora as lora_lib
from freesine_jax.tools import count_params

# Swin-T at 448x448 with PASCAL-Context's four tasks (semseg 21, human_parts 7, sal 1, normals 3).
DIMS, DEPTHS, HEADS = (96, 192, 384, 768), (2, 2, 6, 2), (3, 6, 12, 24)
OUTPUTS = (21, 7, 1, 3)
T = len(OUTPUTS)
BLOCK_DIMS = [c for c, d in zip(DIMS, DEPTHS) for _ in range(d)]
MERGE_DIMS = DIMS[:-1]


def shared_lora_per_rank():
  # qkv C->3C, proj C->C, fc1 C->4C, fc2 4C->C: (C_in + C_out) per rank each.
  return sum(4 * c + 2 * c + 5 * c + 5 * c for c in BLOCK_DIMS)


def layernorms():  # norm1, norm2 of every block; the merges' norm over 4C (Swin's last norm unused)
  return sum(2 * 2 * c for c in BLOCK_DIMS) + sum(2 * 4 * c for c in MERGE_DIMS)


def relpos_tables(window=7):
  return sum((2 * window - 1) ** 2 * h for h, d in zip(HEADS, DEPTHS) for _ in range(d))


def patch_embed():  # 4x4x3 -> 96 conv with bias, and its LayerNorm
  return 4 * 4 * 3 * 96 + 96 + 2 * 96


def reductions():  # 4C -> 2C, no bias
  return sum(4 * c * 2 * c for c in MERGE_DIMS)


def hrnet_decoders():
  # per task: bias-free 1x1 projections of the stage taps (192, 384, 768, 768 ch) to
  # 18/36/72/144, then 270 -> 1080 conv with bias, BN (scale, bias), 1080 -> n conv with bias.
  projections = 192 * 18 + 384 * 36 + 768 * 72 + 768 * 144
  return sum(projections + 270 * 1080 + 1080 + 2 * 1080 + 1080 * n + n for n in OUTPUTS)


def task_path_layers():  # proj C->C, fc1 C->4C, fc2 4C->C of each stage's last block
  return [(c_in, c_out) for c in DIMS for c_in, c_out in ((c, c), (c, 4 * c), (4 * c, c))]


def mtlora_count(r):
  task_lora = T * sum(4 * (c_in + c_out) for c_in, c_out in task_path_layers())
  return (shared_lora_per_rank() * r + task_lora + layernorms() + relpos_tables() +
          patch_embed() + reductions() + hrnet_decoders())


def tadformer_count(r):
  dynamic_filters = len(task_path_layers()) * (r * 9 * r + 9 * r + 9 * r + 9 * r)
  prompt_projections = sum(c * 2 * c for c in MERGE_DIMS)
  prompt_norms = sum(2 * c for c in BLOCK_DIMS)  # one per block's proj, as TADFormer builds them
  tokens, gates = T * DIMS[0], len(DIMS)
  return (shared_lora_per_rank() * r + dynamic_filters + prompt_projections + prompt_norms +
          tokens + gates + layernorms() + relpos_tables() + patch_embed() + hrnet_decoders())


def trainable(arg):
  variables = count_params.variable_shapes(pascal_context.get_config(arg))
  return count_params.count(variables["params"]), variables


PUBLISHED = {"mtlora,r16": 4_953_146, "mtlora,r32": 6_083_642, "mtlora,r64": 8_344_634,
             "tadformer,r16": 3_557_502, "tadformer,r32": 4_776_126, "tadformer,r64": 7_379_262}


@pytest.mark.parametrize("arg", sorted(PUBLISHED))
def test_published_counts_follow_from_the_architecture(arg):
  method, rank = arg.split(",")
  derived = (mtlora_count if method == "mtlora" else tadformer_count)(int(rank[1:]))
  assert derived == PUBLISHED[arg]
  assert trainable(arg)[0] == PUBLISHED[arg]


def test_count_params_prints_the_published_count(capsys):
  print(count_params.report(pascal_context.get_config("mtlora,r64")))
  assert capsys.readouterr().out.strip().splitlines()[-1] == "trainable_params=8344634"


def test_other_baseline_counts():
  r = 16
  decoder_only, variables = trainable("decoder_only")
  backbone = count_params.count(variables["backbone"])
  assert decoder_only == hrnet_decoders()
  assert trainable("full_ft")[0] == backbone + hrnet_decoders()
  assert trainable("single_task")[0] == T * backbone + hrnet_decoders()
  assert trainable(f"lora,r{r}")[0] == mtlora_count(r) - T * sum(
      4 * (i + o) for i, o in task_path_layers())
  # MTLoRA+: LoRA (4C + 2C per rank) on the reductions, which freeze.
  assert trainable(f"mtlora_plus,r{r}")[0] == (mtlora_count(r) - reductions() +
                                               sum(6 * c * r for c in MERGE_DIMS))
  # faar: tests/test_dora.py (its DoRA magnitudes on top of these terms).


def test_a_baseline_refuses_free_sinewich_ablations_and_a_second_baseline():
  with pytest.raises(errors.UserError, match="no_sine"):
    common.parse_arg("mtlora,no_sine", ranks=True)
  with pytest.raises(errors.UserError, match="2 baselines"):
    common.parse_arg("mtlora,tadformer", ranks=True)


# ----------------------------------------------------------------------------- task paths

X = jax.random.normal(jax.random.key(0), (3, 2, 6, 5, 8))  # (T, B, H, W, C_in)


def test_task_lora_is_each_tasks_own_product():
  module = lora_lib.TaskLora(rank=2, scale=4.0, num_tasks=3, features=7)
  params = module.init(jax.random.key(1), X)["params"]
  assert not np.any(module.apply({"params": params}, X))  # B_t = 0: no update at init
  params = dict(params, b=jax.random.normal(jax.random.key(2), params["b"].shape))
  out = module.apply({"params": params}, X)
  for t in range(3):
    np.testing.assert_allclose(out[t], 4.0 * X[t] @ params["a"][t] @ params["b"][t],
                               rtol=1e-5, atol=1e-5)


def test_depthwise_filter_matches_a_grouped_convolution():
  z = jax.random.normal(jax.random.key(3), (2, 6, 5, 4))
  filters = jax.random.normal(jax.random.key(4), (2, 3, 3, 4))
  out = lora_lib.depthwise_filter(z, filters)
  for i in range(2):
    reference = jax.lax.conv_general_dilated(
        z[i:i + 1], filters[i][:, :, None, :], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
    np.testing.assert_allclose(out[i], reference[0], rtol=1e-5, atol=1e-5)


def test_dynamic_filter_normalises_each_generated_filter_then_applies_it():
  rank, features = 4, 7
  a = jax.random.normal(jax.random.key(5), (8, rank))
  b = jax.random.normal(jax.random.key(6), (rank, features))
  module = lora_lib.DynamicTaskFilter(kernel_size=3, scale=4.0)
  params = module.init(jax.random.key(7), X, a, b)["params"]
  out = module.apply({"params": params}, X, a, b)
  # Direct computation for one task and example.
  z = X[1, 0] @ a
  g = (z.mean(axis=(0, 1)) @ params["generator_kernel"] + params["generator_bias"]).reshape(rank, 9)
  g = (g - g.mean(-1, keepdims=True)) / (g.std(-1, ddof=1, keepdims=True) + 1e-10)
  g = g * params["tap_std"].reshape(rank, 9) + params["tap_mean"].reshape(rank, 9)
  zp = jnp.pad(z, ((1, 1), (1, 1), (0, 0)))
  filtered = sum(zp[u:u + 6, v:v + 5] * g[:, 3 * u + v] for u in range(3) for v in range(3))
  np.testing.assert_allclose(out[1, 0], 4.0 * filtered @ b, rtol=1e-4, atol=1e-4)
  assert not np.any(module.apply({"params": params}, X, a, jnp.zeros_like(b)))  # B = 0 at init


# ----------------------------------------------------------------------------- end to end

TRAINED = ("single_task", "full_ft", "decoder_only", "lora", "mtlora", "mtlora_plus",
           "tadformer")


@pytest.mark.parametrize("baseline", TRAINED)
def test_baseline_trains_and_evaluates(baseline, synthetic_data_dir, tmp_path):
  """Trains 2 steps and evaluates one batch: finite metrics, the trainable count reported is
  the model's, and the baseline's distinctive modules (and no Sine-AWB or Clock Net) are in it.

  The smallest Swin that still has every baseline's distinctive parts keeps the compiled
  programs small (compile time grows with the program, and there is one per baseline): two
  tasks, two stages of one (task) block each, so there is one patch merging (MTLoRA+'s LoRA on
  the reduction, TADFormer's prompt projection) and two stages of task LoRA, filters and gates.
  """
  config = synthetic.get_config(f"tiny,{baseline}")
  config.tasks = ("semseg", "normals")
  config.model.depths, config.model.num_heads = (1, 1), (1, 1)
  config.model.decoder.proj_channels = (8, 16)
  config.model.decoder.head_channels = 8
  config.dataset.data_dir = synthetic_data_dir
  config.train.max_steps = 2
  config.train.untrained_baseline = False
  config.train.image_every_steps = 0
  config.eval.max_batches = 1
  from freesine_jax import modeling  # pylint: disable=g-import-not-at-top
  model = modeling.build_model(config)
  initial = modeling.init_variables(model, config)
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["trainable_parameters"] == modeling.count_parameters(initial["params"])
  assert np.isfinite(results["final"]["semseg"]["mIoU"])
  assert np.isfinite(results["final"]["normals"]["mean"])
  names = {p for path in traverse_util.flatten_dict(initial["params"]) for p in path}
  assert ("task_lora" in names) == (baseline in ("mtlora", "mtlora_plus"))
  assert ("task_filter" in names) == (baseline == "tadformer")
  assert ("prompt_proj_0" in names) == (baseline == "tadformer")
  paths = ["/".join(path) for path in traverse_util.flatten_dict(initial["params"])]
  assert any(p.endswith("layers_0_downsample/reduction/lora_a") for p in paths) == (
      baseline == "mtlora_plus")
  assert "clock" not in names and "sine_awb" not in names
