"""Pretrained Swin weights: read the files users hold and place them into the model's variables.

Three source layouts are understood, plus our own converted directory:

  ms    Microsoft's release .pth: {'model': state_dict}, names like layers.0.blocks.0.attn.qkv.weight
        and layers.0.downsample.reduction.weight (patch merging at the END of stage 0).
  timm  a top-level state dict with the same names; timm >= 0.9 places patch merging at the START
        of the next stage (layers.1.downsample...). The placement is detected from the shapes.
  hf    Hugging Face transformers Swin (swin.embeddings..., separate query/key/value).
  converted  a directory written by `python -m freesine_jax.tools.convert_swin` (Orbax + metadata).

One path for every source file: its state dict is first rewritten into the canonical layout (the
Microsoft release's names and merge placement, PyTorch tensors: `_to_canonical`), then one table
maps canonical names to our module paths and Flax conventions (`_to_ours`, `_to_flax`), and
`load_into` places the weights in the variables.

Nothing here ever unpickles code: .pth/.bin files go through torch.load(weights_only=True) (torch is
an optional extra, imported lazily) and .safetensors through the safetensors package (numpy API).

Weights are returned flat, keyed by our module path ('layers_0_blocks_1/attn/qkv/kernel'), in Flax
conventions: linear kernels (in, out), the patch-embedding conv HWIO, LayerNorm 'scale'/'bias'.
See docs/pretrained.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import zipfile
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from freesine_jax import errors
from freesine_jax.models import relpos_resize
from freesine_jax.models import swin

Flat = dict[str, np.ndarray]

LAYOUTS = ("ms", "timm", "hf", "converted")
METADATA_FILE = "metadata.json"
WEIGHTS_DIR = "weights"
_MAX_LISTED = 10  # how many mismatches an error message lists

# The canonical layout: Microsoft's release names (layers.0.blocks.0.attn.qkv.weight), PyTorch
# tensors, each patch merging at the end of the stage whose output it merges. Every source layout
# is first rewritten into it (`_to_canonical`), then one mapping gives our paths (`_to_ours`).
_PATCH_EMBED_NAMES = {"patch_embed.proj.weight": "patch_embed_proj/kernel",
                      "patch_embed.proj.bias": "patch_embed_proj/bias",
                      "patch_embed.norm.weight": "patch_embed_norm/scale",
                      "patch_embed.norm.bias": "patch_embed_norm/bias"}
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "norm1.weight": "norm1/scale", "norm1.bias": "norm1/bias",
    "norm2.weight": "norm2/scale", "norm2.bias": "norm2/bias",
    "attn.qkv.weight": "attn/qkv/kernel", "attn.qkv.bias": "attn/qkv/bias",
    "attn.proj.weight": "attn/proj/kernel", "attn.proj.bias": "attn/proj/bias",
    "attn.relative_position_bias_table": "attn/relative_position_bias_table",
    "mlp.fc1.weight": "mlp/fc1/kernel", "mlp.fc1.bias": "mlp/fc1/bias",
    "mlp.fc2.weight": "mlp/fc2/kernel", "mlp.fc2.bias": "mlp/fc2/bias",
}
_MERGE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
_MERGE_NAMES = {"norm.weight": "norm/scale", "norm.bias": "norm/bias",
                "reduction.weight": "reduction/kernel"}
_OUR_BLOCK = re.compile(r"^layers_\d+_blocks_\d+/(.+)$")
_OUR_MERGE = re.compile(r"^layers_\d+_downsample/(.+)$")
_BUFFER = re.compile(r"^layers\.\d+\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)$")
_STAGE_WIDTH = re.compile(r"^layers\.(\d+)\.blocks\.0\.norm1\.weight$")


def is_pretrained_path(path: str) -> bool:
  """Whether `path` (relative to the Swin module) names a pretrained Swin weight."""
  if m := _OUR_BLOCK.match(path):
    return m.group(1) in _BLOCK_NAMES.values()
  if m := _OUR_MERGE.match(path):
    return m.group(1) in _MERGE_NAMES.values()
  return path in _PATCH_EMBED_NAMES.values()


# ------------------------------------------------------------------------------------------
# Raw file reading (no pickled code is ever executed).
# ------------------------------------------------------------------------------------------


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading the PyTorch checkpoint {path} needs torch, an optional extra: "
        "`pip install torch==2.13.0` (or `pip install freesine_jax[torch]`), or convert the file "
        "to .safetensors elsewhere") from e
  return torch


def _read_torch(path: str) -> tuple[dict[str, Any], str | None]:
  """A .pth/.bin state dict as numpy arrays, and the wrapper entry it came from."""
  torch = _import_torch(path)
  _check_torch_container(path)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError, RuntimeError, ... (torch varies)
    raise _torch_load_refusal(path, e) from None
  wrapper = None
  if isinstance(obj, Mapping):
    for entry in ("model", "state_dict", "module"):
      if entry in obj and isinstance(obj[entry], Mapping):
        obj, wrapper = obj[entry], entry
        break
  if not isinstance(obj, Mapping):
    raise errors.UserError(f"{path}: expected a state dict (or a dict with a 'model' entry), got "
                           f"{type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise errors.UserError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    if v.is_floating_point():
      v = v.float()
    out[k] = v.detach().cpu().numpy()
  return out, wrapper


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy (bfloat16 widened to float32 by hand)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  header_len, header = _safetensors_header(path)
  out = {}
  try:
    with safe_open(path, framework="numpy") as f:
      for key in f.keys():
        meta = header[key]
        if meta["dtype"] == "BF16":  # numpy has no bfloat16: the top 16 bits of a float32
          start, end = meta["data_offsets"]
          raw = np.fromfile(path, dtype="<u2", count=(end - start) // 2,
                            offset=8 + header_len + start)
          out[key] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(meta["shape"])
        else:
          out[key] = f.get_tensor(key)
  except Exception as e:  # safetensors.SafetensorError and what numpy raises on a bad layout
    raise errors.UserError(f"{path}: not a readable .safetensors file ({type(e).__name__}: "
                           f"{errors.first_line(e)})") from None
  return out


def _safetensors_header(path: str) -> tuple[int, dict]:
  """(header length, header) of a .safetensors file, checked against the file's size first.

  The format starts with an 8-byte little-endian header length; any other file (text, HTML, a
  .pth renamed) makes that length absurd, and reading it blindly asks for terabytes. A file cut
  short is caught here too, by comparing the tensors' data offsets with the bytes present.
  """
  size = os.path.getsize(path)
  if size < 8:
    raise errors.UserError(f"{path}: {'empty file' if size == 0 else 'only'} ({size} bytes), not a "
                           ".safetensors file (which starts with an 8-byte header length)")
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
      raise errors.UserError(
          f"{path}: not a .safetensors file: its first 8 bytes {_peek(path)!r} would announce a "
          f"{header_len}-byte header, but the file has {size} bytes")
    raw = f.read(header_len)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.UserError(f"{path}: not a .safetensors file: its {header_len}-byte header is "
                           f"not JSON ({errors.first_line(e)})") from None
  if not isinstance(header, dict):
    raise errors.UserError(f"{path}: not a .safetensors file: its header is a "
                           f"{type(header).__name__}, not a JSON object")
  data_bytes = size - 8 - header_len
  ends = [meta["data_offsets"][1] for key, meta in header.items()
          if key != "__metadata__" and isinstance(meta, dict)
          and isinstance(meta.get("data_offsets"), list) and len(meta["data_offsets"]) == 2
          and isinstance(meta["data_offsets"][1], int)]
  needed = max(ends, default=0)
  if needed > data_bytes:
    raise errors.UserError(
        f"{path}: truncated .safetensors file: its header places tensor data up to byte "
        f"{needed} of the data section, but only {data_bytes} bytes follow the header (file "
        f"{size} bytes, expected {8 + header_len + needed}); download or copy it again")
  return header_len, header


def _peek(path: str, count: int = 8) -> bytes:
  with open(path, "rb") as f:
    return f.read(count)


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container (a zip archive)
_PICKLE_OPCODE = b"\x80"  # torch.save's legacy container starts with a pickle (PROTO)


def _check_torch_container(path: str) -> None:
  """UserError naming the file unless it looks like something torch.save wrote.

  torch.save writes a zip archive (or, legacy, a pickle); an empty, truncated or foreign file
  is reported as such here instead of by torch.load's internal error.
  """
  size = os.path.getsize(path)
  head = _peek(path)
  if size == 0:
    raise errors.UserError(f"{path}: empty file (0 bytes), not a PyTorch checkpoint")
  if head.startswith(_ZIP_MAGIC):
    try:
      with zipfile.ZipFile(path) as archive:
        archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
      raise errors.UserError(
          f"{path}: truncated or damaged PyTorch checkpoint: a zip archive (torch.save's format) "
          f"whose directory cannot be read ({errors.first_line(e)}; {size} bytes); download or "
          "copy it again") from None
  elif not head.startswith(_PICKLE_OPCODE):
    raise errors.UserError(
        f"{path}: not a PyTorch checkpoint: it starts with {head!r}, neither a zip archive "
        "(torch.save) nor a legacy torch pickle; .safetensors files must end in .safetensors")


def _torch_load_refusal(path: str, exc: Exception) -> errors.UserError:
  """The one-line error for a file torch.load(weights_only=True) could not read."""
  detail = f"{type(exc).__name__}: {errors.first_line(exc)}"
  if "weights only" in str(exc).lower() or "weights_only" in str(exc):
    return errors.UserError(
        f"{path}: torch.load(weights_only=True) refused the file ({detail[:300]}). Only plain "
        "tensor state dicts are read, never pickled objects; in a trusted environment save just "
        "the weights, e.g. torch.save({'model': ckpt['model']}, 'weights.pth'), or export to "
        ".safetensors")
  return errors.UserError(
      f"{path}: torch.load could not read it ({detail[:300]}); the file is probably truncated or "
      "damaged: download or copy it again")


def _read_converted(path: str) -> tuple[Flat, dict]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  meta_path = os.path.join(path, METADATA_FILE)
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.UserError(f"{meta_path}: not valid JSON ({errors.first_line(e)}); convert the "
                           "weights again") from None
  weights = os.path.join(os.path.abspath(path), WEIGHTS_DIR)
  if not os.path.isdir(weights):
    raise errors.UserError(f"{path}: has {METADATA_FILE} but no {WEIGHTS_DIR}/ directory")
  try:
    tree = ocp.StandardCheckpointer().restore(weights)
  except Exception as e:  # Orbax/TensorStore errors of a damaged directory vary
    raise errors.UserError(f"{weights}: cannot be restored ({type(e).__name__}: "
                           f"{errors.first_line(e)[:300]}); convert the weights again") from None
  flat = {"/".join(k): np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(tree).items()}
  return flat, meta


# ------------------------------------------------------------------------------------------
# Layout detection and name mapping.
# ------------------------------------------------------------------------------------------


def detect_layout(keys, wrapper: str | None = None) -> str:
  """'hf', 'ms' (timm names inside a {'model': ...} wrapper) or 'timm' (top-level names)."""
  keys = list(keys)
  if any("embeddings.patch_embeddings." in k or ".attention.self." in k for k in keys):
    return "hf"
  if "patch_embed.proj.weight" in keys:
    return "ms" if wrapper == "model" else "timm"
  raise errors.UserError(
      "cannot tell the checkpoint layout: found neither 'patch_embed.proj.weight' (ms/timm) nor "
      "'...embeddings.patch_embeddings.projection.weight' (hf); first keys: "
      f"{sorted(keys)[:_MAX_LISTED]}")


# Hugging Face -> canonical: name prefixes (after an optional 'swin.'), then block-relative ones.
_HF_PREFIXES = ((re.compile(r"^embeddings\.patch_embeddings\.projection\."), "patch_embed.proj."),
                (re.compile(r"^embeddings\.norm\."), "patch_embed.norm."),
                (re.compile(r"^encoder\.layers\.(\d+)\.downsample\."), r"layers.\1.downsample."))
_HF_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_HF_BLOCK_PREFIXES = (
    ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
    ("attention.output.dense.", "attn.proj."), ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.self.relative_position_index", "attn.relative_position_index"))
_HF_QKV = re.compile(r"^attention\.self\.(query|key|value)\.(weight|bias)$")


def _ms_to_canonical(state: dict[str, np.ndarray], path: str
                     ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """Microsoft and timm names are canonical already (a timm merge is moved later, by shape)."""
  del path
  return dict(state), {}, []


def _hf_to_canonical(state: dict[str, np.ndarray], path: str
                     ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """Renames Hugging Face keys and stacks each block's query, key and value into qkv.

  Returns (canonical tensors, canonical name -> source key, source keys with no canonical name).
  """
  tensors, source_of, unknown, qkv = {}, {}, [], {}
  for key, value in state.items():
    name = key[len("swin."):] if key.startswith("swin.") else key
    if m := _HF_BLOCK.match(name):
      stage, block, rest = m.groups()
      prefix = f"layers.{stage}.blocks.{block}."
      if mq := _HF_QKV.match(rest):
        qkv.setdefault((prefix, mq.group(2)), {})[mq.group(1)] = (key, value)
        continue
      canonical = next((prefix + ours + rest[len(theirs):]
                        for theirs, ours in _HF_BLOCK_PREFIXES if rest.startswith(theirs)), None)
    else:
      canonical = next((pattern.sub(replacement, name)
                        for pattern, replacement in _HF_PREFIXES if pattern.match(name)), None)
    if canonical is None:
      unknown.append(key)
    else:
      tensors[canonical], source_of[canonical] = value, key
  for (prefix, param), parts in qkv.items():
    missing = [p for p in ("query", "key", "value") if p not in parts]
    if missing:
      some_key = next(iter(parts.values()))[0]
      raise errors.UserError(
          f"{path}: {some_key} has no matching attention.self.{missing[0]}.{param}")
    # PyTorch's qkv weight stacks q, k, v along the output dimension.
    canonical = f"{prefix}attn.qkv.{param}"
    tensors[canonical] = np.concatenate([parts[p][1] for p in ("query", "key", "value")], axis=0)
    source_of[canonical] = parts["query"][0]
  return tensors, source_of, unknown


# Per source layout: how it becomes canonical, and the keys it holds that the backbone never uses
# (final norm, classifier head, Hugging Face's pooler and backbone-output norms).
_LAYOUT_REWRITES = {
    "ms": (_ms_to_canonical, re.compile(r"^(norm\.(weight|bias)|head\..*|head_drop\..*)$")),
    "hf": (_hf_to_canonical, re.compile(
        r"^(swin\.)?(layernorm\.(weight|bias)|pooler\..*|hidden_states_norms\..*)$"
        r"|^classifier\..*$")),
}
_LAYOUT_REWRITES["timm"] = _LAYOUT_REWRITES["ms"]


def _to_ours(canonical: str) -> str | None:
  """Our path of a canonical weight name ('layers.0.blocks.1.norm1.weight' ->
  'layers_0_blocks_1/norm1/scale'); None if the name is not a Swin weight."""
  if canonical in _PATCH_EMBED_NAMES:
    return _PATCH_EMBED_NAMES[canonical]
  if (m := _BLOCK.match(canonical)) and m.group(3) in _BLOCK_NAMES:
    return f"layers_{m.group(1)}_blocks_{m.group(2)}/{_BLOCK_NAMES[m.group(3)]}"
  if (m := _MERGE.match(canonical)) and m.group(2) in _MERGE_NAMES:
    return f"layers_{m.group(1)}_downsample/{_MERGE_NAMES[m.group(2)]}"
  return None


def _to_flax(ours: str, value: np.ndarray) -> np.ndarray:
  """PyTorch tensor -> Flax convention: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
  if ours == "patch_embed_proj/kernel":
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if ours.endswith("/kernel"):
    return np.ascontiguousarray(value.T)
  return value


def to_state_dict(flat: Flat) -> dict[str, np.ndarray]:
  """The inverse of reading: our flat weights under their canonical (Microsoft release / timm)
  names in PyTorch conventions, a state dict that `read_checkpoint` reads back unchanged (as a
  .safetensors file: freesine_jax/pretrain.py writes its backbone this way)."""
  names = {v: k for k, v in _PATCH_EMBED_NAMES.items()}
  block_names = {v: k for k, v in _BLOCK_NAMES.items()}
  merge_names = {v: k for k, v in _MERGE_NAMES.items()}
  out = {}
  for ours, value in flat.items():
    stage, _, rest = ours.partition("/")
    if ours in names:
      canonical = names[ours]
    elif (m := re.match(r"^layers_(\d+)_blocks_(\d+)$", stage)) and rest in block_names:
      canonical = f"layers.{m.group(1)}.blocks.{m.group(2)}.{block_names[rest]}"
    elif (m := re.match(r"^layers_(\d+)_downsample$", stage)) and rest in merge_names:
      canonical = f"layers.{m.group(1)}.downsample.{merge_names[rest]}"
    else:
      raise ValueError(f"{ours} is not a pretrained Swin weight")
    value = np.asarray(value, np.float32)
    if ours == "patch_embed_proj/kernel":
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif ours.endswith("/kernel"):
      value = value.T
    out[canonical] = np.ascontiguousarray(value)
  return out


def _check_index_buffer(key: str, index: np.ndarray, table_len: int | None) -> None:
  """A stored relative_position_index must be the standard one (else our tables would be misread)."""
  n = int(round(math.sqrt(index.shape[0]))) if index.ndim == 2 else 0
  if index.ndim != 2 or index.shape[0] != index.shape[1] or n * n != index.shape[0]:
    raise errors.UserError(
        f"{key}: relative_position_index of shape {index.shape} is not (w^2, w^2)")
  if table_len is not None and table_len != (2 * n - 1) ** 2:
    raise errors.UserError(f"{key}: relative_position_index for window {n} does not fit a bias "
                           f"table of {table_len} rows")
  if not np.array_equal(index, swin.relative_position_index(n)):
    raise errors.UserError(f"{key}: relative_position_index differs from the Swin definition for "
                           f"window {n}; this checkpoint uses a different position convention")


def _merges_at_end_of_stage(tensors: dict[str, np.ndarray], source_of: Mapping[str, str]
                            ) -> tuple[dict[str, np.ndarray], str]:
  """Moves each patch merging to the stage whose output it merges; returns the placement found.

  The merge after stage i normalises 4*C_i channels; timm >= 0.9 stores it under stage i + 1,
  whose blocks have C_{i+1} = 2*C_i channels. Shapes decide, per merge.
  """
  widths = {int(m.group(1)): v.shape[0] for k, v in tensors.items()
            if (m := _STAGE_WIDTH.match(k))}
  merges = {k: m for k in tensors if (m := _MERGE.match(k))}
  out = {k: v for k, v in tensors.items() if k not in merges}
  placements = set()
  for stage in sorted({int(m.group(1)) for m in merges.values()}):
    norm_key = f"layers.{stage}.downsample.norm.weight"
    if norm_key not in tensors:  # named as the file would name it, after a sibling's key
      sibling = next(k for k, m in merges.items() if int(m.group(1)) == stage)
      source = source_of.get(sibling, sibling)
      missing = source[:-len(merges[sibling].group(2))] + "norm.weight"
      raise errors.UserError(
          f"{missing}: missing (the patch merging of that stage has other weights)")
    width = tensors[norm_key].shape[0]
    if widths.get(stage) is not None and width == 4 * widths[stage]:
      target, placement = stage, "end_of_stage"
    elif widths.get(stage - 1) is not None and width == 4 * widths[stage - 1]:
      target, placement = stage - 1, "start_of_next_stage"
    else:
      raise errors.UserError(f"{source_of.get(norm_key, norm_key)}: width {width} fits no stage "
                             f"(block widths per stage: {widths})")
    placements.add(placement)
    for key, m in merges.items():
      if int(m.group(1)) == stage:
        out[f"layers.{target}.downsample.{m.group(2)}"] = tensors[key]
  if len(placements) > 1:
    raise errors.UserError(
        f"inconsistent patch-merging placement across stages: {sorted(placements)}")
  return out, placements.pop() if placements else "none"


def _to_canonical(state: dict[str, np.ndarray], layout: str, path: str
                  ) -> tuple[dict[str, np.ndarray], dict]:
  """A source state dict in the canonical layout (weights only), and what was left out of it.

  Fails, naming the source keys, on any key that is not a Swin weight, buffer, final norm or
  classifier head, on a relative_position_index that is not Swin's, and on merges that fit no
  stage.
  """
  rewrite, ignored_pattern = _LAYOUT_REWRITES[layout]
  ignored = sorted(k for k in state if ignored_pattern.match(k))
  tensors, source_of, unknown = rewrite(
      {k: v for k, v in state.items() if not ignored_pattern.match(k)}, path)
  buffers = {k: v for k, v in tensors.items() if _BUFFER.match(k)}
  unknown += [source_of.get(k, k) for k in tensors if k not in buffers and _to_ours(k) is None]
  _fail_unknown(path, unknown)
  weights, placement = _merges_at_end_of_stage(
      {k: v for k, v in tensors.items() if k not in buffers}, source_of)
  for key, index in buffers.items():
    if key.endswith("relative_position_index"):
      table = weights.get(key.replace("relative_position_index", "relative_position_bias_table"))
      _check_index_buffer(source_of.get(key, key), index,
                          None if table is None else table.shape[0])
  return weights, dict(ignored_keys=ignored,
                       skipped_buffers=sorted(source_of.get(k, k) for k in buffers),
                       downsample_placement=placement)


def _fail_unknown(path: str, unknown: list[str]) -> None:
  if unknown:
    unknown = sorted(unknown)
    raise errors.UserError(
        f"{path}: {len(unknown)} key(s) are not part of a Swin backbone this project knows "
        f"(not a weight, buffer, final norm or classifier head), e.g. {unknown[:_MAX_LISTED]}. "
        "Refusing to guess what they do.")


# ------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------


def describe(flat: Flat) -> dict:
  """Architecture read from the shapes: embed dim, depths, heads, window, patch size, variant."""
  if "patch_embed_proj/kernel" not in flat:
    raise errors.UserError("no patch_embed_proj/kernel among the weights: not a Swin backbone")
  p, _, in_chans, embed_dim = flat["patch_embed_proj/kernel"].shape
  depths, heads, windows = [], [], []
  stage = 0
  while f"layers_{stage}_blocks_0/norm1/scale" in flat:
    depth = 0
    while f"layers_{stage}_blocks_{depth}/norm1/scale" in flat:
      table = flat.get(f"layers_{stage}_blocks_{depth}/attn/relative_position_bias_table")
      if table is not None:
        side = int(round(math.sqrt(table.shape[0])))
        if side * side != table.shape[0] or side % 2 == 0:
          raise errors.UserError(
              f"layers_{stage}_blocks_{depth}/attn/relative_position_bias_table: "
              f"{table.shape[0]} rows is not (2w-1)^2")
        windows.append((side + 1) // 2)
        if depth == 0:
          heads.append(int(table.shape[1]))
      depth += 1
    depths.append(depth)
    stage += 1
  if not depths:
    raise errors.UserError("no layers_0_blocks_0 weights among the patch embedding's: not a whole "
                           "Swin backbone")
  if len(heads) != len(depths):
    raise errors.UserError("a stage's first block has no relative_position_bias_table")
  fc1 = flat.get("layers_0_blocks_0/mlp/fc1/kernel")
  mlp_ratio = float(fc1.shape[1]) / embed_dim if fc1 is not None else None
  window = max(windows) if windows else None
  variant = "custom"
  for name, (dim, ds, hs) in swin.SWIN_VARIANTS.items():
    if (dim, tuple(ds), tuple(hs)) == (embed_dim, tuple(depths), tuple(heads)) and p == 4:
      variant = name
  return dict(variant=variant, embed_dim=int(embed_dim), depths=tuple(depths),
              num_heads=tuple(heads), window_size=window, patch_size=int(p),
              in_chans=int(in_chans), mlp_ratio=mlp_ratio)


@contextlib.contextmanager
def _naming(path: str):
  """Prefixes `path: ` to a UserError that does not name the file yet (one about a key or a
  shape), so every refusal a user sees says which file it is about."""
  try:
    yield
  except errors.UserError as e:
    if path in str(e):
      raise
    raise errors.UserError(f"{path}: {e}") from None


def read_checkpoint(path: str, layout: str | None = None) -> tuple[Flat, dict]:
  """Reads a Swin checkpoint into ({our_path: float32 array}, info).

  info: layout, source, the architecture (see `describe`), ignored_keys (final norm, classifier
  head: reported, never used), skipped_buffers (relative_position_index, attn_mask: recomputed),
  downsample_placement. Every refusal is an errors.UserError naming the file.
  """
  with _naming(path):
    return _read_checkpoint(path, layout)


def _read_checkpoint(path: str, layout: str | None) -> tuple[Flat, dict]:
  if layout is not None and layout not in LAYOUTS:
    raise errors.UserError(f"layout={layout!r} is not one of {LAYOUTS}")
  if not os.path.exists(path):
    raise errors.UserError(f"Swin checkpoint {path!r} does not exist")
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, METADATA_FILE)):
      if layout not in (None, "converted"):
        raise errors.UserError(
            f"{path} is a converted directory, but layout={layout!r} was requested")
      flat, meta = _read_converted(path)
      info = dict(meta, layout="converted", source=path, converted_from=meta.get("layout"))
      info.update(describe(flat))
      return flat, info
    candidate = os.path.join(path, "model.safetensors")
    if not os.path.exists(candidate):
      raise errors.UserError(f"{path} is a directory with neither {METADATA_FILE} (a converted "
                             "checkpoint) nor model.safetensors (a Hugging Face model)")
    path = candidate
  if path.endswith(".safetensors"):
    sd, wrapper = _read_safetensors(path), None
  else:
    sd, wrapper = _read_torch(path)
  if wrapper == "module" or any(k.startswith("module.") for k in sd):
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
  found = detect_layout(sd.keys(), wrapper)
  if layout == "converted":
    raise errors.UserError(f"{path} is a file; layout='converted' expects a directory")
  if layout is not None and {layout, found} != {"ms", "timm"} and layout != found:
    raise errors.UserError(f"{path}: layout={layout!r} was requested but the keys are {found!r} "
                           f"names, e.g. {sorted(sd)[:3]}")
  canonical, extra = _to_canonical(sd, found, path)
  flat = {}
  for name, value in canonical.items():
    ours = _to_ours(name)
    flat[ours] = np.asarray(_to_flax(ours, value), np.float32)
  info = dict(layout=layout or found, source=path, **extra)
  info.update(describe(flat))
  for key in info["ignored_keys"]:
    logging.info("%s: ignoring %s (not part of the backbone features)", path, key)
  return flat, info


def expected_shapes(spec: swin.SwinSpec, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
  """Every pretrained weight of `spec` with its shape (tables at the configured window)."""
  out = {}
  c, p = spec.embed_dim, spec.patch_size
  out["patch_embed_proj/kernel"] = (p, p, in_chans, c)
  out["patch_embed_proj/bias"] = (c,)
  out["patch_embed_norm/scale"] = out["patch_embed_norm/bias"] = (c,)
  table_rows = (2 * spec.window_size - 1) ** 2
  n = len(spec.depths)
  for i, (depth, heads) in enumerate(zip(spec.depths, spec.num_heads)):
    d = spec.stage_dims[i]
    hidden = int(d * spec.mlp_ratio)
    for j in range(depth):
      b = f"layers_{i}_blocks_{j}/"
      for name in ("norm1", "norm2"):
        out[b + name + "/scale"] = out[b + name + "/bias"] = (d,)
      out[b + "attn/qkv/kernel"], out[b + "attn/qkv/bias"] = (d, 3 * d), (3 * d,)
      out[b + "attn/proj/kernel"], out[b + "attn/proj/bias"] = (d, d), (d,)
      out[b + "attn/relative_position_bias_table"] = (table_rows, heads)
      out[b + "mlp/fc1/kernel"], out[b + "mlp/fc1/bias"] = (d, hidden), (hidden,)
      out[b + "mlp/fc2/kernel"], out[b + "mlp/fc2/bias"] = (hidden, d), (d,)
    if i < n - 1:
      out[f"layers_{i}_downsample/norm/scale"] = out[f"layers_{i}_downsample/norm/bias"] = (4 * d,)
      out[f"layers_{i}_downsample/reduction/kernel"] = (4 * d, 2 * d)
  return out


def _mismatch_lines(have: Mapping[str, tuple], want: Mapping[str, tuple]) -> list[str]:
  """Shape mismatches first (the most telling), then missing, then unexpected weights."""
  lines = []
  for k in sorted(set(have) & set(want)):
    hs, ws = tuple(have[k]), tuple(want[k])
    if hs != ws and not (relpos_resize.is_table(k) and relpos_resize.resizable(hs, ws)):
      lines.append(f"shape {k}: checkpoint {hs} vs model {ws}")
  for k in sorted(want):
    if k not in have:
      lines.append(f"missing {k} {tuple(want[k])}")
  for k in sorted(have):
    if k not in want:
      lines.append(f"unexpected {k} {tuple(have[k])}")
  return lines


def check_variant(flat: Flat, info: dict, spec: swin.SwinSpec, where: str = "") -> None:
  """Fails, listing the first mismatches, unless the weights fit the configured Swin `spec`.

  Only the window may differ: relative-position tables are then resized (see load_into).
  """
  want = expected_shapes(spec, info.get("in_chans", 3))
  lines = _mismatch_lines({k: v.shape for k, v in flat.items()}, want)
  mlp_ok = info.get("mlp_ratio") in (None, spec.mlp_ratio)
  if lines or info.get("patch_size") != spec.patch_size or not mlp_ok:
    got = (f"{info.get('variant')} (embed {info.get('embed_dim')}, depths {info.get('depths')}, "
           f"heads {info.get('num_heads')}, patch {info.get('patch_size')}, mlp_ratio "
           f"{info.get('mlp_ratio')})")
    cfg = (f"embed {spec.embed_dim}, depths {tuple(spec.depths)}, heads {tuple(spec.num_heads)}, "
           f"patch {spec.patch_size}, mlp_ratio {spec.mlp_ratio}")
    raise errors.UserError(
        f"{where or info.get('source', 'checkpoint')}: weights are {got} but the model is "
        f"configured as {cfg}; {len(lines)} mismatch(es), first: "
        + "; ".join(lines[:_MAX_LISTED]))


# ------------------------------------------------------------------------------------------
# Placing weights into model variables.
# ------------------------------------------------------------------------------------------


def _find_prefix(flat_vars: Mapping[str, Mapping[tuple, Any]]) -> tuple[str, ...]:
  anchor = ("patch_embed_proj", "kernel")
  for coll in flat_vars.values():
    for path in coll:
      if path[-2:] == anchor:
        return path[:-2]
  raise errors.UserError("the model variables contain no Swin backbone (no patch_embed_proj/kernel "
                         "in 'backbone' or 'params')")


def load_into(variables: Mapping[str, Any], flat: Flat, *, strict: bool = True,
              return_report: bool = False):
  """Puts each pretrained weight into the collection ('backbone' or 'params') holding its path.

  Shapes must match, except relative-position tables, which are resized bicubically when the
  model's window differs (including stages whose window shrinks to the token grid). Adapters and
  every other variable are left untouched. strict: missing or unexpected weights are an error
  (listing the first ones); otherwise they are logged. Returns new variables (and a report).
  """
  colls = {name: traverse_util.flatten_dict(dict(tree))
           for name, tree in variables.items() if name in ("backbone", "params")}
  prefix = _find_prefix(colls)
  slots = {}
  for name, coll in colls.items():
    for path, leaf in coll.items():
      if path[:len(prefix)] == prefix:
        rel = "/".join(path[len(prefix):])
        if is_pretrained_path(rel):
          slots[rel] = (name, path, leaf)
  have = {k: v.shape for k, v in flat.items()}
  want = {k: tuple(leaf.shape) for k, (_, _, leaf) in slots.items()}
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  bad_shapes = [line for line in _mismatch_lines(have, want) if line.startswith("shape")]
  if bad_shapes or (strict and (missing or unexpected)):
    raise errors.UserError("cannot load the Swin weights: "
                           + "; ".join((bad_shapes + [f"missing {k}" for k in missing] +
                                  [f"unexpected {k}" for k in unexpected])[:_MAX_LISTED]))
  for k in missing:
    logging.warning("pretrained Swin: %s not in the checkpoint; keeps its initial value", k)
  for k in unexpected:
    logging.warning("pretrained Swin: %s has no place in the model; not loaded", k)
  resized = []
  new = {name: dict(coll) for name, coll in colls.items()}
  for rel, (name, path, leaf) in slots.items():
    if rel not in flat:
      continue
    value = flat[rel]
    if tuple(value.shape) != tuple(leaf.shape):
      value = relpos_resize.resize_relpos_table(value, leaf.shape[0])
      resized.append(rel)
    arr = jnp.asarray(value, dtype=leaf.dtype)
    sharding = getattr(leaf, "sharding", None)
    if isinstance(leaf, jax.Array) and sharding is not None:
      arr = jax.device_put(arr, sharding)
    new[name][path] = arr
  out = dict(variables)
  for name, coll in new.items():
    out[name] = traverse_util.unflatten_dict(coll)
  report = dict(loaded=len(slots) - len(missing), missing=missing, unexpected=unexpected,
                resized_tables=sorted(resized),
                collections={n: sum(1 for s in slots.values() if s[0] == n) for n in colls})
  return (out, report) if return_report else out


def load_pretrained(path: str, variables: Mapping[str, Any], spec: swin.SwinSpec,
                    layout: str | None = None) -> dict[str, Any]:
  """Loads the Swin weights at `path` (a source file or converted dir) into `variables`.

  The weights must fit `spec` (only the window may differ: tables are then resized); `layout`
  forces the source layout (None: detected). Called by train.init_variables.
  """
  flat, info = read_checkpoint(path, layout=layout)
  check_variant(flat, info, spec, where=path)
  with _naming(path):
    variables, report = load_into(variables, flat, strict=True, return_report=True)
  logging.info("loaded %d pretrained Swin weights from %s (layout %s, variant %s, window %s); "
               "resized tables: %d; ignored source keys: %s", report["loaded"], path,
               info["layout"], info["variant"], info["window_size"],
               len(report["resized_tables"]), info.get("ignored_keys"))
  return variables
