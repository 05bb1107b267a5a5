"""Converts a pretrained Swin checkpoint to the project's format (Orbax weights + metadata).

  python -m freesine_jax.tools.convert_swin --src=swin_tiny_patch4_window7_224.pth \
      --out=/ckpt/swin_t_in1k [--variant=swin_t] [--layout=ms|timm|hf] [--window=7]

Reads a Microsoft release .pth, a timm state dict (.pth/.bin/.safetensors) or a Hugging Face
Swin (.safetensors/.bin, or its directory) without executing pickled code, maps the names to our
module paths, and writes <out>/weights (Orbax) and <out>/metadata.json. Keys that are not part of
the backbone features (final norm, classifier head) are listed in the output and the metadata.
Point config.model.backbone_weights at <out> (or at the source file). See docs/pretrained.md.
A file that cannot be converted (empty, truncated, not a checkpoint, not the requested variant)
ends in one line naming it and exit code 2, and nothing is written.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from absl import flags
import numpy as np
from flax import traverse_util

from freesine_jax import checkpointing
from freesine_jax import cli
from freesine_jax import errors
from freesine_jax.models import pretrained
from freesine_jax.models import relpos_resize
from freesine_jax.models import swin

def convert(src: str, out: str, *, variant: str | None = None, layout: str | None = None,
            window: int | None = None) -> dict:
  """Converts `src` into `out`; returns the metadata written."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(out, pretrained.WEIGHTS_DIR)):
    raise errors.UserError(f"--out={out} already holds {pretrained.WEIGHTS_DIR}/; choose a new "
                           "directory or delete it")
  if os.path.exists(out) and not os.path.isdir(out):
    raise errors.UserError(f"--out={out} is a file; name a directory to create")
  if window is not None and window < 1:
    raise errors.UserError(f"--window={window} must be >= 1")
  flat, info = pretrained.read_checkpoint(src, layout=layout)
  if variant is not None:
    spec = swin.SwinSpec.from_variant(variant, window_size=window or info["window_size"])
    pretrained.check_variant(flat, info, spec, where=src)
  source_window = info["window_size"]
  if window is not None:
    flat = relpos_resize.resize_tables(flat, window)
  sha = pretrained.file_sha256(info["source"]) if os.path.isfile(info["source"]) else None
  metadata = dict(
      variant=info["variant"], embed_dim=info["embed_dim"], depths=list(info["depths"]),
      num_heads=list(info["num_heads"]), window_size=window or source_window,
      source_window_size=source_window, patch_size=info["patch_size"],
      mlp_ratio=info["mlp_ratio"], layout=info["layout"],
      downsample_placement=info.get("downsample_placement"),
      source=os.path.abspath(info["source"]), source_sha256=sha,
      backbone_hash=checkpointing.backbone_hash(flat),
      num_weights=len(flat), num_params=int(sum(v.size for v in flat.values())),
      ignored_keys=list(info.get("ignored_keys", [])),
      skipped_buffers=len(info.get("skipped_buffers", [])))
  os.makedirs(out, exist_ok=True)
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): np.asarray(v, np.float32)
                                       for k, v in flat.items()})
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(os.path.abspath(out), pretrained.WEIGHTS_DIR), tree)
  ckpt.wait_until_finished()
  ckpt.close()
  with open(os.path.join(out, pretrained.METADATA_FILE), "w") as f:
    json.dump(metadata, f, indent=2)
  return metadata


def define_flags() -> None:
  flags.DEFINE_string("src", None, "Source checkpoint file (.pth/.bin/.safetensors) or dir.")
  flags.DEFINE_string("out", None, "Output directory (must not exist yet).")
  flags.DEFINE_enum("variant", None, sorted(swin.SWIN_VARIANTS),
                    "Expected variant; the conversion fails if the weights differ.")
  flags.DEFINE_enum("layout", None, ["ms", "timm", "hf"],
                    "Source layout (default: detected from the key names).")
  flags.DEFINE_integer("window", None,
                       "Resize every relative-position table to this window (bicubic).")
  flags.mark_flags_as_required(["src", "out"])


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  meta = convert(f.src, f.out, variant=f.variant, layout=f.layout, window=f.window)
  print(f"converted {meta['source']} ({meta['layout']}, sha256 {meta['source_sha256']})")
  print(f"  variant {meta['variant']}: embed {meta['embed_dim']}, depths {meta['depths']}, "
        f"heads {meta['num_heads']}, window {meta['source_window_size']} -> "
        f"{meta['window_size']}, {meta['num_params']:,} parameters in {meta['num_weights']} "
        "arrays")
  print(f"  ignored source keys (not backbone features): {meta['ignored_keys'] or 'none'}")
  print(f"  wrote {os.path.join(f.out, pretrained.WEIGHTS_DIR)} and "
        f"{pretrained.METADATA_FILE} (backbone_hash {meta['backbone_hash'][:16]}...)")


def run() -> None:
  """Console-script entry point (freesine-convert-swin)."""
  cli.run("freesine_jax.tools.convert_swin", define_flags, main)


if __name__ == "__main__":
  run()
