"""Pieces shared by the paper's configs (PASCAL-Context, NYUDv2): Swin-T + Free Sinewich.

The config arg is a comma-separated list: a rank `r16`/`r32`/`r64` (default r64) and optional
ablations from docs/design.md §2:
  no_lcn               one learnable frequency per task instead of the Clock Net
  no_lowpass           no Gaussian low-pass on the task kernels
  no_sine              linear scaling omega_t * M instead of the sine (same amplitude)
  independent_bases    per-task A, W, B instead of one shared base
  independent_decoder  per-task HRNet heads instead of the shared decoder group
  depthwise            depthwise W (r x k x k) instead of the full r x r x k x k
  taps_full            encoder low-pass over the k x k taps in 'full' mode (= a 7x7 Gaussian blur
                       of the feature map before the k x k kernel) instead of over the matrix
e.g. --config=configs/pascal_context.py:r32,no_sine
"""
import ml_collections

from freesine_jax import models
from freesine_jax.data import registry

DATA_DIR = registry.DEFAULT_DATA_DIR
PASCAL_AUGMENT = dict(flip=True, rotate_degrees=20.0, scale_range=(0.75, 1.25), scales=None)

ABLATIONS = ("no_lcn", "no_lowpass", "no_sine", "independent_bases", "independent_decoder",
             "depthwise", "taps_full")


def parse_arg(arg: str) -> tuple[int, tuple[str, ...]]:
  rank, ablations = 64, []
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    if token.startswith("r") and token[1:].isdigit():
      rank = int(token[1:])
    elif token in ABLATIONS:
      ablations.append(token)
    else:
      raise ValueError(f"config arg {token!r}: expected r<rank> or one of {ABLATIONS}")
  return rank, tuple(ablations)


def model(arg: str) -> ml_collections.ConfigDict:
  rank, ablations = parse_arg(arg)
  return apply_ablations(models.model_config(rank=rank, variant="swin_t"), ablations)


def apply_ablations(mc: ml_collections.ConfigDict,
                    ablations: tuple[str, ...]) -> ml_collections.ConfigDict:
  """Switches the named ablations (docs/design.md §2) on in a model config; returns it."""
  if "no_lcn" in ablations:
    mc.clock_net = False
  if "no_lowpass" in ablations:
    mc.sine_awb.lowpass = "none"
    mc.decoder.lowpass = "none"
  if "no_sine" in ablations:
    mc.sine_awb.modulation = "linear"
    mc.decoder.modulation = "linear"
  if "independent_bases" in ablations:
    mc.sine_awb.independent_bases = True
  if "independent_decoder" in ablations:
    mc.decoder.kind = "independent"
  if "depthwise" in ablations:
    mc.sine_awb.w_mode = "depthwise"
  if "taps_full" in ablations:
    mc.sine_awb.lowpass = "taps_full"
  return mc


def dataset(name: str, image_size, augment=PASCAL_AUGMENT) -> ml_collections.ConfigDict:
  """config.dataset for a prepared real dataset (docs/datasets.md)."""
  return ml_collections.ConfigDict(dict(
      name=name, builder_config="", data_dir=DATA_DIR, manual_dir="", train_split="train",
      eval_split="val", image_size=tuple(image_size), augment=dict(augment)))


def input_pipeline(batch_size: int, num_workers: int = 4) -> ml_collections.ConfigDict:
  """config.input: global batch sizes (split over hosts) and grain workers."""
  return ml_collections.ConfigDict(dict(batch_size=batch_size, eval_batch_size=batch_size,
                                        num_workers=num_workers))
