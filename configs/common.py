"""Helpers shared by the experiment configs: the config arg and the paper's ablations.

Every key and its default is declared in configs/base.py; the experiment configs change values
only. Their arg is a comma-separated list of tokens: a rank `r16`/`r32`/`r64` (the paper's
configs; default r64) or `tiny` (configs/synthetic.py), plus any ablations (docs/design.md §2):
  no_lcn               one learnable frequency per task instead of the Clock Net
  no_lowpass           no Gaussian low-pass on the task kernels
  no_sine              linear scaling omega_t * M instead of the sine (same amplitude)
  independent_bases    per-task A, W, B instead of one shared base
  independent_decoder  per-task HRNet heads instead of the shared decoder group
  depthwise            depthwise W (r x k x k) instead of the full r x r x k x k
  taps_full            encoder low-pass over the k x k taps in 'full' mode (= a 7x7 Gaussian blur
                       of the feature map before the k x k kernel) instead of over the matrix
e.g. --config=configs/pascal_context.py:r32,no_sine or --config=configs/synthetic.py:tiny,no_lcn

or one baseline (docs/method.md, "Baselines"), built from the same modules, with per-task HRNet
heads (model.decoder.kind = independent) and no Clock Net:
  single_task   one fully fine-tuned model per task (the reference row)
  full_ft       one multi-task model, the whole backbone fine-tuned
  decoder_only  frozen backbone, only the heads train
  lora          shared LoRA on qkv, proj, fc1, fc2 of every block (MTLoRA's freezing)
  mtlora        MTLoRA: the shared LoRA + per-task rank-4 LoRA on proj, fc1, fc2 of each stage's
                last block, LayerNorms, rel-pos tables, patch_embed and patch-merging reductions
                trainable
  mtlora_plus   MTLoRA+: as mtlora, with LoRA on the (frozen) patch-merging reductions
  tadformer     TADFormer: the shared LoRA, task prompts with prompt-conditioned task inputs and
                a dynamic task filter in the LoRA's rank space, per stage gates
  faar          FAAR: as mtlora_plus with each task's LoRA at the shared rank, in the DoRA form
                (model.lora.form), every LoRA's ranks chosen while training (config.train.pdrs),
                TS-PD heads (model.decoder.kind = tspd)
e.g. --config=configs/pascal_context.py:mtlora,r32 or --config=configs/synthetic.py:tadformer
"""
from __future__ import annotations

import ml_collections

from freesine_jax import errors

ABLATIONS = ("no_lcn", "no_lowpass", "no_sine", "independent_bases", "independent_decoder",
             "depthwise", "taps_full")
BASELINES = ("single_task", "full_ft", "decoder_only", "lora", "mtlora", "mtlora_plus",
             "tadformer", "faar")
RANK_EXAMPLES = ("r16", "r32", "r64")  # any r<int> is a rank


def _is_rank(token: str) -> bool:
  return len(token) > 1 and token[0] == "r" and token[1:].isdigit()


def parse_arg(arg: str, *, ranks: bool = False, extra: tuple[str, ...] = ()
              ) -> tuple[str, ...]:
  """The tokens of a config arg: ranks r<int> (if `ranks`), `extra` words, ABLATIONS.

  An unknown token is a UserError naming the accepted ones.
  """
  tokens = tuple(t.strip() for t in (arg or "").split(",") if t.strip())
  known = (RANK_EXAMPLES if ranks else ()) + tuple(extra) + ABLATIONS + BASELINES
  for token in tokens:
    if token not in known and not (ranks and _is_rank(token)):
      raise errors.UserError(
          f"unknown config arg {token!r}{errors.did_you_mean(token, known)}; the arg is a "
          f"comma-separated list of {'r<rank>, ' if ranks else ''}"
          f"{', '.join(tuple(extra) + ABLATIONS)} or one of {', '.join(BASELINES)}")
  chosen = [t for t in tokens if t in BASELINES]
  if len(chosen) > 1:
    raise errors.UserError(f"config arg {arg!r} names {len(chosen)} baselines "
                           f"({', '.join(chosen)}); name at most one")
  ablations = [t for t in tokens if t in ABLATIONS]
  if chosen and ablations:
    raise errors.UserError(f"config arg {arg!r}: the ablations {', '.join(ablations)} switch "
                           f"parts of Free Sinewich off; the baseline {chosen[0]} has none of them")
  return tokens


def rank_of(tokens: tuple[str, ...], default: int = 64) -> int:
  """The LoRA rank named by an 'r<rank>' token (the last one wins), else `default`."""
  ranks = [int(t[1:]) for t in tokens if _is_rank(t)]
  return ranks[-1] if ranks else default


def apply_ablations(config: ml_collections.ConfigDict, tokens: tuple[str, ...]) -> None:
  """Switches the named ablations (docs/design.md §2) on in config.model."""
  model = config.model
  if "no_lcn" in tokens:
    model.clock_net = False
  if "no_lowpass" in tokens:
    model.sine_awb.lowpass = "none"
    model.decoder.lowpass = "none"
  if "no_sine" in tokens:
    model.sine_awb.modulation = "linear"
    model.decoder.modulation = "linear"
  if "independent_bases" in tokens:
    model.sine_awb.independent_bases = True
  if "independent_decoder" in tokens:
    model.decoder.kind = "independent"
  if "depthwise" in tokens:
    model.sine_awb.w_mode = "depthwise"
  if "taps_full" in tokens:
    model.sine_awb.lowpass = "taps_full"


# The compute choices of the real-data configs (448 x 448 and up) for Free Sinewich: every Swin
# block and every layer's task paths recomputed in the backward pass, the tasks one after another
# (docs/method.md, Memory: at 448, batch 2, the step peaks at 5.7 GiB instead of 9.7 and, measured
# side by side on the 2-core CPU, was not slower). configs/base.py keeps 'none' / 'stacked'.
LEAN_COMPUTE = {"block_remat": "recompute", "task_loop": "scan"}


def apply_lean_compute(config: ml_collections.ConfigDict, tokens: tuple[str, ...]) -> None:
  """LEAN_COMPUTE for Free Sinewich; a baseline (tokens) keeps the base's compute choices."""
  if not any(t in BASELINES for t in tokens):
    config.model.compute.update(LEAN_COMPUTE)


def apply_baseline(config: ml_collections.ConfigDict, tokens: tuple[str, ...]) -> None:
  """Turns config.model into the baseline named in tokens (if any); keeps the rank."""
  chosen = [t for t in tokens if t in BASELINES]
  if not chosen:
    return
  name = chosen[0]
  model = config.model
  model.name = name
  model.decoder.kind = "independent"  # MTLoRA's per-task HRNet heads
  model.clock_net = False
  model.prompts = False
  model.task_path = "none"
  model.task_frozen_input = "shared"  # the baselines' task streams: Phi(shared) + update
  if name in ("single_task", "full_ft"):
    model.lora.rank = 0
    model.trainable_backbone = "all"
    model.separate_models = name == "single_task"
  elif name == "decoder_only":
    model.lora.rank = 0
    model.trainable_backbone = "none"
  elif name == "lora":
    model.trainable_backbone = "mtlora"
  elif name == "mtlora":
    model.task_path = "task_lora"
    model.trainable_backbone = "mtlora"
  elif name in ("mtlora_plus", "faar"):  # LoRA on the reductions, which then stay frozen
    model.task_path = "task_lora"
    model.lora.modules = tuple(model.lora.modules) + ("reduction",)
    model.trainable_backbone = "norms_relpos_embed"
    if name == "faar":  # FAAR's code: every task's LoRA at the shared rank, DoRA form, PDRS
      model.task_lora.rank = model.lora.rank
      model.lora.form = "dora"
      model.decoder.kind = "tspd"
      config.train.pdrs.enabled = True
  elif name == "tadformer":
    model.task_path = "dynamic_filter"
    model.prompts = True
    model.prompt_norm_every_block = True
    model.trainable_backbone = "norms_relpos_embed"
