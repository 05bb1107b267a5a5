"""Swin checkpoint conversion: parity with an independent PyTorch Swin in every layout.

A PyTorch Swin written from the paper (tests/torch_swin_reference.py) gets random weights, is
saved as a Microsoft release .pth, a timm state dict (old and >= 0.9 naming) and a Hugging Face
safetensors file; each is converted and loaded into our model, and the four stage outputs must
match the reference's to 1e-4 (float32). Fast tests use a tiny Swin with the same code paths
(shifted and unshifted windows, windows shrunk to the grid); one slow test uses Swin-T at 224.
"""
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Tests that need no torch live in tests/test_pretrained_numpy.py, so they run without it.
torch = pytest.importorskip(
    "torch", reason="torch is an optional extra (`pip install torch==2.13.0`); the PyTorch "
    "reference for the Swin converter parity tests needs it")

import torch_swin_reference as ref  # pylint: disable=g-import-not-at-top
from configs import base
from freesine_jax import checkpointing
from freesine_jax import modeling
from freesine_jax import models
from freesine_jax.models import pretrained
from freesine_jax.models import relpos_resize
from freesine_jax.models import swin
from freesine_jax.models.multitask import MultiTaskModel
from freesine_jax.tools import convert_swin

TOL = 1e-4
TINY = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window=4)
TINY_IMG = 64  # patch 4 -> grids 16, 8, 4, 2: shifted windows in stages 1-2, grid-sized in 3-4


def make_config(variant="custom", window=4, rank=0, sine_awb=False, clock_net=False,
                trainable_backbone="none", dims=TINY):
  config = base.get_config()
  config.tasks = ("semseg", "sal")
  config.num_classes.semseg = 3
  mc = config.model
  mc.lora.rank, mc.variant = rank, variant
  mc.embed_dim, mc.depths, mc.num_heads = dims["embed_dim"], dims["depths"], dims["num_heads"]
  mc.window_size = window
  mc.task_path = "sine_awb" if sine_awb else "none"
  mc.prompts = False
  mc.clock_net = clock_net
  mc.trainable_backbone = trainable_backbone
  mc.decoder.head_channels = 16
  config.dataset.image_size = (TINY_IMG, TINY_IMG)
  return config


def reference(img_size, dims, seed=0):
  model = ref.SwinReference(img_size=img_size, embed_dim=dims["embed_dim"],
                            depths=dims["depths"], num_heads=dims["num_heads"],
                            window=dims["window"], num_classes=5)
  return ref.randomize(model, seed).eval()


def ref_stages(model, images_nhwc):
  with torch.no_grad():
    outs = model.stages(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous())
  return [o.numpy() for o in outs]


def state_numpy(sd):
  return {k: v.detach().cpu().numpy().copy() for k, v in sd.items()}


def save_layout(model, layout, directory):
  """Writes the reference model as `layout`; returns the file path."""
  sd = model.state_dict()
  if layout == "ms":
    path = os.path.join(directory, "swin_ms.pth")
    torch.save({"model": sd}, path)
  elif layout == "timm_old":
    path = os.path.join(directory, "swin_timm_old.pth")
    torch.save(dict(sd), path)
  elif layout == "timm_new":
    path = os.path.join(directory, "swin_timm_new.safetensors")
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(state_numpy(ref.to_timm_new(sd)), path)
  elif layout == "hf":
    path = os.path.join(directory, "swin_hf.safetensors")
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(state_numpy(ref.to_hf(sd)), path)
  else:
    raise ValueError(layout)
  return path


def backbone_apply(spec):
  module = swin.SwinBackbone(spec, swin.AdapterSpec(), trainable_backbone="none")
  fn = jax.jit(lambda v, x: [s for s, _ in module.apply(v, x)])
  return module, fn


def zeros_like_variables(module, image_shape):
  """The module's variables as zeros, without running (or compiling) its init."""
  shapes = jax.eval_shape(lambda x: module.init({"params": jax.random.key(0)}, x),
                          jax.ShapeDtypeStruct(image_shape, jnp.float32))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.fixture(scope="module")
def tiny():
  """Reference model, input, its stage outputs, and a jitted backbone of the same config."""
  model = reference(TINY_IMG, TINY)
  images = np.random.default_rng(0).normal(size=(2, TINY_IMG, TINY_IMG, 3)).astype(np.float32)
  spec = models.swin_spec(make_config().model)
  module, fn = backbone_apply(spec)
  variables = jax.jit(module.init)({"params": jax.random.key(1)}, jnp.asarray(images))
  return dict(model=model, images=images, want=ref_stages(model, images), fn=fn,
              variables=variables, spec=spec)


def assert_stages_close(got, want):
  assert len(got) == len(want) == 4
  for i, (g, w) in enumerate(zip(got, want)):
    g = np.asarray(g)
    assert g.shape == w.shape, (i, g.shape, w.shape)
    err = float(np.max(np.abs(g - w)))
    assert err <= TOL, f"stage {i + 1}: max abs diff {err:.2e} > {TOL}"
    assert float(np.std(w)) > 0.1  # the comparison is not between near-zero tensors


# ------------------------------------------------------------------------------------------
# Parity in every layout.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,expected", [("ms", "ms"), ("timm_old", "timm"),
                                             ("timm_new", "timm"), ("hf", "hf")])
def test_layout_parity(tiny, tmp_path, layout, expected):
  src = save_layout(tiny["model"], layout, str(tmp_path))
  flat, info = pretrained.read_checkpoint(src)
  assert info["layout"] == expected
  assert info["variant"] == "custom"
  assert (info["embed_dim"], info["depths"], info["num_heads"], info["window_size"]) == (
      16, (2, 2, 2, 2), (2, 2, 4, 4), 4)
  want_placement = "start_of_next_stage" if layout == "timm_new" else "end_of_stage"
  assert info["downsample_placement"] == want_placement
  pretrained.check_variant(flat, info, tiny["spec"])

  out = str(tmp_path / "converted")
  meta = convert_swin.convert(src, out)
  flat_c, info_c = pretrained.read_checkpoint(out)
  assert info_c["layout"] == "converted" and info_c["converted_from"] == expected
  assert sorted(flat_c) == sorted(flat)
  assert all(np.array_equal(flat_c[k], flat[k]) for k in flat)
  assert meta["backbone_hash"] == checkpointing.backbone_hash(flat_c)

  variables, report = pretrained.load_into(tiny["variables"], flat_c, return_report=True)
  assert report["missing"] == [] and report["unexpected"] == []
  assert report["loaded"] == len(flat) and report["resized_tables"] == []
  assert_stages_close(tiny["fn"](variables, jnp.asarray(tiny["images"])), tiny["want"])


def test_all_layouts_give_identical_weights(tiny, tmp_path):
  flats = [pretrained.read_checkpoint(save_layout(tiny["model"], layout, str(tmp_path)))[0]
           for layout in ("ms", "timm_old", "timm_new", "hf")]
  hashes = {checkpointing.backbone_hash(f) for f in flats}
  assert len(hashes) == 1
  # And the mapping is exactly the transposition of the PyTorch tensors.
  sd = tiny["model"].state_dict()
  f = flats[0]
  np.testing.assert_array_equal(f["layers_1_blocks_1/attn/qkv/kernel"],
                                sd["layers.1.blocks.1.attn.qkv.weight"].numpy().T)
  np.testing.assert_array_equal(f["patch_embed_proj/kernel"],
                                sd["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(f["layers_2_downsample/reduction/kernel"],
                                sd["layers.2.downsample.reduction.weight"].numpy().T)


def test_multitask_model_with_zero_adapters_reproduces_reference(tiny, tmp_path):
  """LoRA (B = 0) and Sine-AWB task paths on, prompts off: every task sees the reference."""
  src = save_layout(tiny["model"], "ms", str(tmp_path))
  config = make_config(rank=4, sine_awb=True, clock_net=True, trainable_backbone="mtlora")
  config.model.backbone_weights = src
  model = models.builtin_model(config)
  images = jnp.asarray(tiny["images"])
  variables = dict(jax.jit(model.init)({"params": jax.random.key(3)}, images))
  variables = pretrained.load_pretrained(src, variables, models.swin_spec(config.model))
  # mtlora trains norms, tables, patch_embed, reductions: those sit in 'params' at the same paths.
  params = variables["params"]["backbone"]
  np.testing.assert_array_equal(
      params["layers_0_blocks_0"]["norm1"]["scale"],
      tiny["model"].state_dict()["layers.0.blocks.0.norm1.weight"].numpy())
  np.testing.assert_array_equal(
      variables["backbone"]["backbone"]["layers_0_blocks_0"]["attn"]["qkv"]["kernel"],
      tiny["model"].state_dict()["layers.0.blocks.0.attn.qkv.weight"].numpy().T)
  assert not np.any(np.asarray(params["layers_0_blocks_0"]["attn"]["qkv"]["lora_b"]))
  features, _ = jax.jit(lambda v, x: model.apply(v, x, method=MultiTaskModel.encode))(
      variables, images)
  for task in config.tasks:
    assert_stages_close(features[task], tiny["want"])


def test_init_variables_loads_config_model_backbone_weights(tiny, tmp_path):
  """modeling.init_variables passes the configured file, Swin spec and layout to
  load_pretrained."""
  src = save_layout(tiny["model"], "ms", str(tmp_path))
  config = make_config()
  config.model.backbone_weights = src
  config.model.backbone_layout = "timm"  # same names as ms: accepted
  model = models.builtin_model(config)
  variables = modeling.init_variables(model, config)
  np.testing.assert_array_equal(
      variables["backbone"]["backbone"]["layers_1_blocks_0"]["mlp"]["fc2"]["kernel"],
      tiny["model"].state_dict()["layers.1.blocks.0.mlp.fc2.weight"].numpy().T)
  config.model.backbone_layout = "hf"
  with pytest.raises(ValueError, match="layout='hf' was requested"):
    modeling.init_variables(model, config)


# ------------------------------------------------------------------------------------------
# Mismatches are reported, never silently accepted.
# ------------------------------------------------------------------------------------------


def test_wrong_variant_lists_first_mismatches(tiny, tmp_path):
  src = save_layout(tiny["model"], "ms", str(tmp_path))
  flat, info = pretrained.read_checkpoint(src)
  with pytest.raises(ValueError) as e:
    pretrained.check_variant(flat, info, swin.SwinSpec.from_variant("swin_t", window_size=4))
  msg = str(e.value)
  assert "swin_t" not in info["variant"] and "embed 16" in msg and "embed 96" in msg
  assert "shape layers_0_blocks_0/attn/proj/bias: checkpoint (16,) vs model (96,)" in msg
  deeper = swin.SwinSpec(embed_dim=16, depths=(2, 2, 4, 2), num_heads=(2, 2, 4, 4), window_size=4)
  with pytest.raises(ValueError, match=r"missing layers_2_blocks_2/attn/proj/bias"):
    pretrained.check_variant(flat, info, deeper)
  with pytest.raises(ValueError, match="weights are custom"):
    convert_swin.convert(src, str(tmp_path / "out"), variant="swin_t")


def test_missing_key_and_wrong_shape_are_errors(tiny, tmp_path):
  sd = dict(tiny["model"].state_dict())
  del sd["layers.1.blocks.0.attn.proj.weight"]
  path = str(tmp_path / "missing.pth")
  torch.save({"model": sd}, path)
  flat, info = pretrained.read_checkpoint(path)
  with pytest.raises(ValueError, match=r"missing layers_1_blocks_0/attn/proj/kernel"):
    pretrained.check_variant(flat, info, tiny["spec"])
  with pytest.raises(ValueError, match=r"missing layers_1_blocks_0/attn/proj/kernel"):
    pretrained.load_into(tiny["variables"], flat)
  # Non-strict: loads the rest and reports the hole.
  _, report = pretrained.load_into(tiny["variables"], flat, strict=False, return_report=True)
  assert report["missing"] == ["layers_1_blocks_0/attn/proj/kernel"]

  sd = dict(tiny["model"].state_dict())
  sd["layers.0.blocks.1.mlp.fc1.weight"] = sd["layers.0.blocks.1.mlp.fc1.weight"][:48]
  sd["layers.0.blocks.1.mlp.fc1.bias"] = sd["layers.0.blocks.1.mlp.fc1.bias"][:48]
  sd["layers.0.blocks.1.mlp.fc2.weight"] = sd["layers.0.blocks.1.mlp.fc2.weight"][:, :48]
  path = str(tmp_path / "shape.pth")
  torch.save({"model": sd}, path)
  flat, _ = pretrained.read_checkpoint(path)
  with pytest.raises(ValueError) as e:
    pretrained.load_into(tiny["variables"], flat, strict=False)
  assert "shape layers_0_blocks_1/mlp/fc1/bias: checkpoint (48,) vs model (64,)" in str(e.value)


def test_unknown_key_is_an_error(tiny, tmp_path):
  sd = dict(tiny["model"].state_dict())
  sd["absolute_pos_embed"] = torch.zeros(1, 256, 16)
  path = str(tmp_path / "ape.pth")
  torch.save({"model": sd}, path)
  with pytest.raises(ValueError, match=r"ape\.pth.*absolute_pos_embed"):
    pretrained.read_checkpoint(path)


@pytest.mark.parametrize("layout,ignored", [
    ("ms", ["head.bias", "head.weight", "norm.bias", "norm.weight"]),
    ("timm_new", ["head.fc.bias", "head.fc.weight", "norm.bias", "norm.weight"]),
    ("hf", ["classifier.bias", "classifier.weight", "swin.layernorm.bias",
            "swin.layernorm.weight"])])
def test_head_and_final_norm_are_reported_as_ignored(tiny, tmp_path, layout, ignored):
  src = save_layout(tiny["model"], layout, str(tmp_path))
  _, info = pretrained.read_checkpoint(src)
  assert info["ignored_keys"] == ignored
  meta = convert_swin.convert(src, str(tmp_path / "out"))
  assert meta["ignored_keys"] == ignored
  with open(tmp_path / "out" / "metadata.json") as f:
    assert json.load(f)["ignored_keys"] == ignored


def test_layout_flag_is_checked(tiny, tmp_path):
  src = save_layout(tiny["model"], "ms", str(tmp_path))
  assert pretrained.read_checkpoint(src, layout="timm")[1]["layout"] == "timm"
  with pytest.raises(ValueError, match="layout='hf' was requested"):
    pretrained.read_checkpoint(src, layout="hf")


def test_cli_writes_weights_and_metadata(tiny, tmp_path):
  src = save_layout(tiny["model"], "hf", str(tmp_path))
  out = tmp_path / "cli"
  proc = subprocess.run(
      [sys.executable, "-m", "freesine_jax.tools.convert_swin", f"--src={src}", f"--out={out}"],
      capture_output=True, text=True, check=False, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "classifier.weight" in proc.stdout and "variant custom" in proc.stdout
  with open(out / "metadata.json") as f:
    meta = json.load(f)
  assert meta["layout"] == "hf" and meta["window_size"] == 4 and meta["depths"] == [2, 2, 2, 2]
  assert meta["source_sha256"] == pretrained.file_sha256(src)


# ------------------------------------------------------------------------------------------
# Safety and file formats.
# ------------------------------------------------------------------------------------------


class _Payload:
  """Unpickling this would run os.system: weights_only=True must refuse it."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_executed(tmp_path):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "evil.pth")
  with open(path, "wb") as f:
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(2, 3, 4, 4)},
                "config": _Payload(str(marker))}, f, pickle_protocol=pickle.HIGHEST_PROTOCOL)
  with pytest.raises(ValueError, match="weights_only=True"):
    pretrained.read_checkpoint(path)
  assert not marker.exists()


def test_missing_torch_gives_install_hint(tiny, tmp_path, monkeypatch):
  pth = save_layout(tiny["model"], "ms", str(tmp_path))
  st = save_layout(tiny["model"], "hf", str(tmp_path))
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
    pretrained.read_checkpoint(pth)
  flat, _ = pretrained.read_checkpoint(st)  # safetensors needs no torch
  assert "patch_embed_proj/kernel" in flat


def test_bfloat16_safetensors(tiny, tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  sd = {k: v.to(torch.bfloat16).contiguous() if v.is_floating_point() else v.contiguous()
        for k, v in ref.to_hf(tiny["model"].state_dict()).items()}
  path = str(tmp_path / "bf16.safetensors")
  save_file(sd, path)
  flat, _ = pretrained.read_checkpoint(path)
  want = sd["swin.encoder.layers.0.blocks.0.intermediate.dense.weight"].float().numpy().T
  np.testing.assert_array_equal(flat["layers_0_blocks_0/mlp/fc1/kernel"], want)


# ------------------------------------------------------------------------------------------
# Relative-position table resizing.
# ------------------------------------------------------------------------------------------


def torch_resize(table, new_window):
  """The Swin authors' resize: each head's (2w-1)^2 table as an image, F.interpolate bicubic."""
  t = torch.from_numpy(table)
  rows, heads = t.shape
  s1, s2 = int(round(rows**0.5)), 2 * new_window - 1
  img = t.permute(1, 0).reshape(1, heads, s1, s1)
  out = torch.nn.functional.interpolate(img, size=(s2, s2), mode="bicubic", align_corners=False)
  return out.reshape(heads, s2 * s2).permute(1, 0).numpy()


@pytest.mark.parametrize("src_window,dst_window", [(7, 12), (12, 7), (4, 2), (7, 7)])
def test_resize_matches_torch_bicubic(src_window, dst_window):
  table = np.random.default_rng(src_window).normal(size=((2 * src_window - 1) ** 2, 4))
  table = table.astype(np.float32)
  got = relpos_resize.resize_relpos_table(table, (2 * dst_window - 1) ** 2)
  np.testing.assert_allclose(got, torch_resize(table, dst_window), rtol=0, atol=1e-5)
  if src_window == dst_window:
    np.testing.assert_array_equal(got, table)


def test_load_into_resizes_tables_for_another_window(tiny, tmp_path):
  src = save_layout(tiny["model"], "ms", str(tmp_path))
  flat, info = pretrained.read_checkpoint(src)
  spec = swin.SwinSpec(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), window_size=2)
  pretrained.check_variant(flat, info, spec)  # only the window differs: allowed
  module = swin.SwinBackbone(spec, swin.AdapterSpec(), trainable_backbone="none")
  variables = zeros_like_variables(module, (1, TINY_IMG, TINY_IMG, 3))
  new, report = pretrained.load_into(variables, flat, return_report=True)
  # Stages 1-3 had windows 4, 4, 4 (tables 49 rows) and now have 2 (9 rows); stage 4 stays 2.
  assert len(report["resized_tables"]) == 6
  key = "layers_0_blocks_1/attn/relative_position_bias_table"
  got = np.asarray(new["backbone"]["layers_0_blocks_1"]["attn"]["relative_position_bias_table"])
  np.testing.assert_allclose(got, torch_resize(flat[key], 2), atol=1e-5)

  meta = convert_swin.convert(src, str(tmp_path / "w12"), window=12)
  assert (meta["window_size"], meta["source_window_size"]) == (12, 4)
  flat12, _ = pretrained.read_checkpoint(str(tmp_path / "w12"))
  assert flat12[key].shape == (23 * 23, 2)


# ------------------------------------------------------------------------------------------
# True Swin-T dimensions at 224.
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_swin_t_224_parity_all_layouts(tmp_path):
  dims = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window=7)
  model = reference(224, dims, seed=5)
  images = np.random.default_rng(5).normal(size=(1, 224, 224, 3)).astype(np.float32)
  want = ref_stages(model, images)
  assert [w.shape[-1] for w in want] == [192, 384, 768, 768]
  config = make_config(variant="swin_t", window=7, dims=dims)
  spec = models.swin_spec(config.model)
  module, fn = backbone_apply(spec)
  variables = zeros_like_variables(module, images.shape)
  for layout in ("ms", "timm_new", "hf"):
    src = save_layout(model, layout, str(tmp_path))
    out = str(tmp_path / f"conv_{layout}")
    meta = convert_swin.convert(src, out, variant="swin_t")
    assert meta["variant"] == "swin_t" and meta["window_size"] == 7
    flat, info = pretrained.read_checkpoint(out)
    pretrained.check_variant(flat, info, spec)
    loaded = pretrained.load_into(variables, flat)
    assert_stages_close(fn(loaded, jnp.asarray(images)), want)
