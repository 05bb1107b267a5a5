"""Pretrains the proxy backbone (freesine_jax/pretrain.py): the synthetic default's small Swin.

  python -m freesine_jax.tools.pretrain --config=configs/pretrain_proxy.py[:tiny] [--out=DIR]
  # or: freesine-pretrain --config=...

Without --out the proxy goes to the cache that configs/synthetic.py's backbone_weights
('proxy:synthetic') reads, where the default job would otherwise make it on first use; with
--out, to DIR (a run killed mid-way resumes when given the same DIR and config). The last line
printed is the config.model.backbone_weights value that adapts it. docs/pretrained.md,
"The proxy backbone".
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from freesine_jax import cli
from freesine_jax import errors
from freesine_jax import pretrain

PROG = "freesine_jax.tools.pretrain"


def define_flags() -> None:
  cli.define_config_flag()
  flags.DEFINE_string("out", None, "Write the proxy here instead of the cache (a new directory, "
                      "or one this command was interrupted in).")


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  config = f.config
  if f.out:
    if os.path.exists(f.out) and not os.path.isdir(f.out):
      raise errors.UserError(f"--out={f.out} is a file; name a directory to create")
    if os.path.exists(os.path.join(f.out, pretrain.REPORT_FILE)):
      raise errors.UserError(f"--out={f.out} already holds a pretrained proxy; choose a new "
                             "directory or delete it")
    flat, report = pretrain.pretrain(config, work_dir=f.out)
    pretrain.write(flat, report, f.out)
    resume = pretrain.resume_path(config, f.out)
    if os.path.exists(resume):
      os.remove(resume)
    converted = os.path.join(f.out, pretrain.CONVERTED_DIR)
  else:
    converted = pretrain.ensure_pretrained(config)
  print(f"config.model.backbone_weights={converted}")


def run() -> None:
  """Console-script entry point (freesine-pretrain)."""
  cli.run(PROG, define_flags, main)


if __name__ == "__main__":
  run()
