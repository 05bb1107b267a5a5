"""Weight files as a new user tries them: every broken or wrong file ends in ONE line naming the
file and what is wrong, exit code 2, and nothing written (issue 14).

The converter (python -m freesine_jax.tools.convert_swin) and training with
config.model.backbone_weights read files through the same code (models/pretrained.py). Every
case runs in-process through convert_swin.convert (an errors.UserError, which the command lines
print as one line with exit code 2: freesine_jax/cli.py); four of them also run as command lines.
"""
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import run_clis_in_pairs
from freesine_jax import errors
from freesine_jax.models import pretrained
from freesine_jax.tools import convert_swin

CONVERT = ["-m", "freesine_jax.tools.convert_swin"]
TRAIN = ["-m", "freesine_jax.main", "--config=configs/synthetic.py:tiny"]


def one_stage_swin(seed: int = 0) -> dict[str, np.ndarray]:
  """A whole (one stage, one block) Swin in the Microsoft release's names: embed 16, 2 heads,
  window 2, patch 4."""
  rng = np.random.default_rng(seed)
  shapes = {"patch_embed.proj.weight": (16, 3, 4, 4), "patch_embed.proj.bias": (16,),
            "patch_embed.norm.weight": (16,), "patch_embed.norm.bias": (16,)}
  block = "layers.0.blocks.0."
  shapes.update({block + k: v for k, v in {
      "norm1.weight": (16,), "norm1.bias": (16,), "norm2.weight": (16,), "norm2.bias": (16,),
      "attn.qkv.weight": (48, 16), "attn.qkv.bias": (48,), "attn.proj.weight": (16, 16),
      "attn.proj.bias": (16,), "attn.relative_position_bias_table": (9, 2),
      "mlp.fc1.weight": (64, 16), "mlp.fc1.bias": (64,), "mlp.fc2.weight": (16, 64),
      "mlp.fc2.bias": (16,)}.items()})
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _write_cut(src: str, dst: str, keep: int) -> None:
  with open(src, "rb") as f:
    data = f.read()
  with open(dst, "wb") as f:
    f.write(data[:keep])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
  """name -> path of each file a new user might hand over."""
  d = str(tmp_path_factory.mktemp("weight_files"))
  p = {name: os.path.join(d, name) for name in (
      "notes.safetensors", "empty.safetensors", "cut.safetensors", "whole.safetensors",
      "unknown_keys.safetensors", "embed_only.safetensors", "empty.pth", "cut.pth", "notes.pth")}
  with open(p["notes.safetensors"], "w", encoding="utf-8") as f:
    f.write("<html><body>Please log in to download this model</body></html>\n")
  with open(p["notes.pth"], "w", encoding="utf-8") as f:  # a Git LFS pointer, not the weights
    f.write("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 113\n")
  for name in ("empty.safetensors", "empty.pth"):
    open(p[name], "wb").close()
  save_file(one_stage_swin(), p["whole.safetensors"])
  _write_cut(p["whole.safetensors"], p["cut.safetensors"],
             int(os.path.getsize(p["whole.safetensors"]) * 0.7))
  save_file({"encoder.weight": np.ones((4, 4), np.float32)}, p["unknown_keys.safetensors"])
  save_file({k: v for k, v in one_stage_swin().items() if k.startswith("patch_embed.")},
            p["embed_only.safetensors"])
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:  # an optional extra: the .pth cases are skipped without it
    del p["cut.pth"]
    return p
  whole_pth = os.path.join(d, "whole.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in one_stage_swin().items()}}, whole_pth)
  _write_cut(whole_pth, p["cut.pth"], os.path.getsize(whole_pth) // 2)
  return p


# name -> (source file, extra convert() arguments, fragments the message must contain).
CASES = {
    "text file named .safetensors": (
        "notes.safetensors", {}, ["not a .safetensors file", "b'<html><b'", "the file has"]),
    "empty .safetensors": ("empty.safetensors", {}, ["empty file (0 bytes)"]),
    "truncated .safetensors": (
        "cut.safetensors", {}, ["truncated .safetensors file", "download or copy it again"]),
    "empty .pth": ("empty.pth", {}, ["empty file (0 bytes), not a PyTorch checkpoint"]),
    "truncated .pth": ("cut.pth", {}, ["truncated or damaged PyTorch checkpoint"]),
    "text file named .pth": ("notes.pth", {}, ["not a PyTorch checkpoint: it starts with"]),
    "keys of no Swin": ("unknown_keys.safetensors", {}, ["cannot tell the checkpoint layout"]),
    "patch embedding alone": ("embed_only.safetensors", {}, ["not a whole Swin backbone"]),
    "another variant than asked for": (
        "whole.safetensors", {"variant": "swin_t"},
        ["weights are custom (embed 16", "but the model is configured as embed 96"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_convert_refuses_in_one_line_naming_the_file_and_writes_nothing(name, files, tmp_path):
  src_name, kwargs, fragments = CASES[name]
  if src_name not in files:
    pytest.skip("writing a .pth needs torch (the optional extra)")
  src, out = files[src_name], str(tmp_path / "out")
  with pytest.raises(errors.UserError) as e:
    convert_swin.convert(src, out, **kwargs)
  message = str(e.value)
  assert message.startswith(f"{src}: "), message
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  assert not os.path.exists(out)


@pytest.mark.parametrize("where,message", [
    ("in the length prefix", "only (5 bytes), not a .safetensors file"),
    ("in the header", "would announce a"),
    ("in the tensor data", "truncated .safetensors file")])
def test_every_truncation_of_a_safetensors_file_is_named(files, tmp_path, where, message):
  """Cut anywhere, the file is refused naming it and saying why; the whole file reads back."""
  whole = files["whole.safetensors"]
  with open(whole, "rb") as f:
    header_end = 8 + int.from_bytes(f.read(8), "little")
  keep = {"in the length prefix": 5, "in the header": header_end - 10,
          "in the tensor data": (header_end + os.path.getsize(whole)) // 2}[where]
  cut = str(tmp_path / "cut.safetensors")
  _write_cut(whole, cut, keep)
  with pytest.raises(errors.UserError) as e:
    pretrained.read_checkpoint(cut)
  assert str(e.value).startswith(f"{cut}: ") and message in str(e.value), str(e.value)
  flat, info = pretrained.read_checkpoint(whole)
  assert info["depths"] == (1,) and info["window_size"] == 2
  np.testing.assert_array_equal(flat["layers_0_blocks_0/mlp/fc1/kernel"],
                                one_stage_swin()["layers.0.blocks.0.mlp.fc1.weight"].T)


def test_command_lines_print_one_line_exit_2_and_write_nothing(files, cli_env, tmp_path):
  """The converter and training, as a user runs them, two processes at a time (training has
  created its workdir's log files by then; the converter writes nothing)."""
  out = str(tmp_path / "out")
  kept = tmp_path / "kept"
  (kept / pretrained.WEIGHTS_DIR).mkdir(parents=True)
  (kept / pretrained.WEIGHTS_DIR / "mine").write_text("mine")
  runs = {
      "text .safetensors": (CONVERT + [f"--src={files['notes.safetensors']}", f"--out={out}"],
                            [files["notes.safetensors"], "not a .safetensors file"]),
      "variant": (CONVERT + [f"--src={files['whole.safetensors']}", f"--out={out}",
                             "--variant=swin_t"],
                  [files["whole.safetensors"], "but the model is configured as embed 96"]),
      "existing --out": (CONVERT + [f"--src={files['whole.safetensors']}", f"--out={kept}"],
                         [f"--out={kept} already holds weights/; choose a new directory"]),
      "training": (TRAIN + [f"--workdir={tmp_path / 'run'}",
                            f"--config.model.backbone_weights={files['empty.safetensors']}"],
                   [files["empty.safetensors"], "empty file (0 bytes)"]),
  }
  outcomes = run_clis_in_pairs({name: argv for name, (argv, _) in runs.items()}, cli_env)
  for name, (argv, fragments) in runs.items():
    code, stderr = outcomes[name]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (name, stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f"{argv[1]}: "), (name, stderr[-3000:])
    for fragment in fragments:
      assert fragment in lines[0], (name, fragment, lines[0])
  assert not os.path.exists(out)
  assert sorted(p.name for p in kept.rglob("*")) == ["mine", pretrained.WEIGHTS_DIR]
