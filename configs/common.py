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
"""
from __future__ import annotations

import ml_collections

from freesine_jax import errors

ABLATIONS = ("no_lcn", "no_lowpass", "no_sine", "independent_bases", "independent_decoder",
             "depthwise", "taps_full")
RANK_EXAMPLES = ("r16", "r32", "r64")  # any r<int> is a rank


def _is_rank(token: str) -> bool:
  return len(token) > 1 and token[0] == "r" and token[1:].isdigit()


def parse_arg(arg: str, *, ranks: bool = False, extra: tuple[str, ...] = ()
              ) -> tuple[str, ...]:
  """The tokens of a config arg: ranks r<int> (if `ranks`), `extra` words, ABLATIONS.

  An unknown token is a UserError naming the accepted ones.
  """
  tokens = tuple(t.strip() for t in (arg or "").split(",") if t.strip())
  known = (RANK_EXAMPLES if ranks else ()) + tuple(extra) + ABLATIONS
  for token in tokens:
    if token not in known and not (ranks and _is_rank(token)):
      raise errors.UserError(
          f"unknown config arg {token!r}{errors.did_you_mean(token, known)}; the arg is a "
          f"comma-separated list of {'r<rank>, ' if ranks else ''}"
          f"{', '.join(tuple(extra) + ABLATIONS)}")
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
