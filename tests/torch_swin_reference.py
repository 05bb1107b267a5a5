"""A small PyTorch Swin Transformer (v1), written from the paper, for converter parity tests.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (2021):
4x4 patch embedding (conv) + LayerNorm; pre-norm blocks x + W-MSA(LN(x)), x + MLP(LN(x)) with
exact-erf GELU; window attention with a ((2w-1)^2, heads) relative-position bias table; odd
blocks shift the grid cyclically by w // 2 and mask (-100) token pairs from different regions;
patch merging concatenates the 2x2 neighbours (x[0::2,0::2], x[1::2,0::2], x[0::2,1::2],
x[1::2,1::2]), then LayerNorm(4C) and a bias-free Linear(4C, 2C). When a stage's token grid is no
larger than the window, the window becomes the grid and there is no shift.

State-dict names follow Microsoft's release (patch_embed.proj, layers.i.blocks.j.attn.qkv,
layers.i.downsample.reduction, norm, head, relative_position_index and attn_mask buffers).
Kept independent of freesine_jax on purpose: only torch is imported.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def _relative_index(ws: int) -> torch.Tensor:
  ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
  coords = torch.stack([ys.flatten(), xs.flatten()])            # (2, N)
  rel = coords[:, :, None] - coords[:, None, :]                 # (2, N, N): query - key
  dy, dx = rel[0] + ws - 1, rel[1] + ws - 1
  return dy * (2 * ws - 1) + dx                                 # (N, N)


def _windows(x: torch.Tensor, ws: int) -> torch.Tensor:
  b, h, w, c = x.shape
  x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, ws * ws, c)


def _unwindows(win: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
  x = win.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, -1)


def _shift_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
  """(num_windows, N, N): 0 within a region of the rolled image, -100 across regions."""
  region = torch.zeros(1, h, w, 1)
  label = 0
  bounds = ((0, h - ws), (h - ws, h - shift), (h - shift, h))
  wbounds = ((0, w - ws), (w - ws, w - shift), (w - shift, w))
  for y0, y1 in bounds:
    for x0, x1 in wbounds:
      region[:, y0:y1, x0:x1] = label
      label += 1
  win = _windows(region, ws).squeeze(-1)                        # (nW, N)
  same = win[:, :, None] == win[:, None, :]
  return torch.where(same, 0.0, -100.0)


class WindowAttention(nn.Module):

  def __init__(self, dim: int, window: int, heads: int):
    super().__init__()
    self.heads, self.window = heads, window
    self.scale = (dim // heads) ** -0.5
    self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
    self.register_buffer("relative_position_index", _relative_index(window))
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    bw, n, c = x.shape
    qkv = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q * self.scale) @ k.transpose(-2, -1)             # (bw, heads, N, N)
    bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
    logits = logits + bias.view(n, n, self.heads).permute(2, 0, 1)[None]
    if mask is not None:
      nw = mask.shape[0]
      logits = logits.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]
      logits = logits.view(bw, self.heads, n, n)
    out = logits.softmax(-1) @ v                                # (bw, heads, N, d)
    return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class SwinBlock(nn.Module):

  def __init__(self, dim: int, heads: int, grid: int, window: int, shift: int,
               mlp_ratio: float = 4.0):
    super().__init__()
    self.grid, self.window, self.shift = grid, window, shift
    self.norm1 = nn.LayerNorm(dim)
    self.attn = WindowAttention(dim, window, heads)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.register_buffer("attn_mask", _shift_mask(grid, grid, window, shift) if shift else None)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    h = w = self.grid
    y = self.norm1(x).view(b, h, w, c)
    if self.shift:
      y = torch.roll(y, (-self.shift, -self.shift), dims=(1, 2))
    y = self.attn(_windows(y, self.window), self.attn_mask)
    y = _unwindows(y, self.window, b, h, w)
    if self.shift:
      y = torch.roll(y, (self.shift, self.shift), dims=(1, 2))
    x = x + y.reshape(b, n, c)
    return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):

  def __init__(self, dim: int, grid: int):
    super().__init__()
    self.grid = grid
    self.norm = nn.LayerNorm(4 * dim)
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

  def forward(self, x):
    b, _, c = x.shape
    x = x.view(b, self.grid, self.grid, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class Stage(nn.Module):

  def __init__(self, dim, depth, heads, grid, window, merge: bool):
    super().__init__()
    if grid <= window:
      window, shift = grid, 0
    else:
      shift = window // 2
    self.blocks = nn.ModuleList(
        [SwinBlock(dim, heads, grid, window, shift if j % 2 else 0) for j in range(depth)])
    self.downsample = PatchMerging(dim, grid) if merge else None

  def forward(self, x):
    for blk in self.blocks:
      x = blk(x)
    return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):

  def __init__(self, dim: int, patch: int):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, stride=patch)
    self.norm = nn.LayerNorm(dim)

  def forward(self, x):
    return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinReference(nn.Module):
  """Swin v1 classifier; `stages(images)` gives the features after each stage's patch merging."""

  def __init__(self, img_size=224, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
               window=7, patch=4, num_classes=1000):
    super().__init__()
    self.patch_embed = PatchEmbed(embed_dim, patch)
    grid = img_size // patch
    layers = []
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
      layers.append(Stage(embed_dim * 2**i, depth, heads, grid, window,
                          merge=i < len(depths) - 1))
      grid = grid // 2 if i < len(depths) - 1 else grid
    self.layers = nn.ModuleList(layers)
    final = embed_dim * 2 ** (len(depths) - 1)
    self.norm = nn.LayerNorm(final)
    self.head = nn.Linear(final, num_classes)

  def stages(self, images: torch.Tensor) -> list[torch.Tensor]:
    """images (B, 3, H, W) -> per stage (B, h, w, C) after that stage's patch merging."""
    x = self.patch_embed(images)
    outs = []
    for layer in self.layers:
      x = layer(x)
      side = int(round(x.shape[1] ** 0.5))
      outs.append(x.view(x.shape[0], side, side, -1))
    return outs

  def forward(self, images):
    x = self.patch_embed(images)
    for layer in self.layers:
      x = layer(x)
    return self.head(self.norm(x).mean(1))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
  """Random weights everywhere (LayerNorm gains near 1), so no mapping error can hide."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("relative_position_bias_table"):
        p.copy_(0.5 * noise)  # large enough that a misplaced bias changes the output
      elif p.ndim == 1:
        p.copy_(0.1 * noise)
      else:
        fan_in = p[0].numel()
        p.copy_(noise / fan_in**0.5)
  return model


def to_timm_new(sd: dict) -> dict:
  """timm >= 0.9 names: the patch merging after stage i is stored as layers.{i+1}.downsample,
  the classifier is head.fc, and the index / mask buffers are not saved (non-persistent)."""
  out = {}
  for k, v in sd.items():
    if k.endswith(("relative_position_index", "attn_mask")):
      continue
    parts = k.split(".")
    if parts[0] == "layers" and parts[2] == "downsample":
      parts[1] = str(int(parts[1]) + 1)
    if parts[0] == "head":
      parts.insert(1, "fc")
    out[".".join(parts)] = v
  return out


def to_hf(sd: dict) -> dict:
  """Hugging Face transformers SwinForImageClassification names (q, k, v split)."""
  out = {}
  for k, v in sd.items():
    if k.endswith("attn_mask"):
      continue
    if k.startswith("patch_embed.proj."):
      out["swin.embeddings.patch_embeddings.projection." + k.split(".")[-1]] = v
    elif k.startswith("patch_embed.norm."):
      out["swin.embeddings.norm." + k.split(".")[-1]] = v
    elif k.startswith("norm."):
      out["swin.layernorm." + k.split(".")[-1]] = v
    elif k.startswith("head."):
      out["classifier." + k.split(".")[-1]] = v
    elif ".downsample." in k:
      out["swin.encoder." + k] = v
    else:
      _, i, _, j, rest = k.split(".", 4)
      pre = f"swin.encoder.layers.{i}.blocks.{j}."
      if rest.startswith("attn.qkv."):
        kind = rest.split(".")[-1]
        for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
          out[pre + f"attention.self.{name}.{kind}"] = part.clone()
        continue
      rename = {"norm1": "layernorm_before", "norm2": "layernorm_after",
                "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                "mlp.fc2": "output.dense",
                "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
                "attn.relative_position_index": "attention.self.relative_position_index"}
      for old, new in rename.items():
        if rest == old or rest.startswith(old + "."):
          out[pre + new + rest[len(old):]] = v
          break
      else:
        raise KeyError(k)
  return out
