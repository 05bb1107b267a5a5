"""Swin Transformer backbone with Free Sinewich adapters, in Flax linen.

Pretrained weights live in the 'backbone' collection (see layers.backbone_weight); module paths
mirror Microsoft's release (patch_embed/proj, layers_i/blocks_j/attn/qkv, .../mlp/fc1,
layers_i/downsample/reduction, ...) so that converted checkpoints map by name.

Task streams: in the last block of every stage, proj, fc1 and fc2 carry a per-task Sine-AWB
path; that block returns the shared stream (consumed by the next stage) and one stream per task
(sent to the decoders). Task prompt tokens (one per task) join every window's attention.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from freesine_jax.models import adapters
from freesine_jax.models.layers import (DropPath, FrozenDense, FrozenLayerNorm, backbone_weight,
                                         recompute_in_backward)

SWIN_VARIANTS = {
    # name: (embed_dim, depths, num_heads)
    "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin_l": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


@dataclasses.dataclass(frozen=True)
class SwinSpec:
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  patch_size: int = 4
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.2

  @classmethod
  def from_variant(cls, variant: str, **overrides) -> "SwinSpec":
    if variant not in SWIN_VARIANTS:
      raise ValueError(f"model.variant={variant!r}; known: {sorted(SWIN_VARIANTS)} or 'custom'")
    dim, depths, heads = SWIN_VARIANTS[variant]
    return cls(embed_dim=dim, depths=depths, num_heads=heads, **overrides)

  @property
  def stage_dims(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Everything about the adapters that the backbone needs (lora None: no shared LoRA)."""
  lora: adapters.LoraSpec | None = None
  lora_modules: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
  # adapters.TaskPath of the task streams: Sine-AWB, a baseline's (models/lora.py), or none.
  task_path: adapters.TaskPath = adapters.NO_TASK_PATH
  task_path_modules: tuple[str, ...] = ("proj", "fc1", "fc2")
  prompts: bool = False
  num_tasks: int = 0
  compute: adapters.TaskPathCompute = adapters.TaskPathCompute()  # model.compute: how, not what
  frozen_on_shared: bool = False  # fc1/fc2 task outputs: Phi(shared) + update (MTLoRA, TADFormer)
  prompt_norm_every_block: bool = False  # TADFormer declares a prompt LayerNorm in every block
  # Per task, the generation that added it (0: trained with the backbone's adapters; 1: added later by
  # config.train.new_tasks). () = all 0. See prompt_visibility.
  prompt_generations: tuple[int, ...] = ()

  def dense(self, name: str, features: int, trainable_backbone: str,
            dtype) -> adapters.AdaptedDense:
    """The block's linear layer `name` with the adapters these specs give it."""
    return adapters.AdaptedDense(
        features, self.lora if name in self.lora_modules else None,
        self.task_path if name in self.task_path_modules else adapters.NO_TASK_PATH,
        self.num_tasks, trainable_backbone=trainable_backbone, dtype=dtype,
        compute=self.compute, name=name)


def stage_windows(grid: int, window: int) -> tuple[int, bool]:
  """Window size and whether shifting is allowed for a stage grid (as the Swin authors do)."""
  if grid <= window:
    return grid, False
  return window, True


REMAT_MODES = ("none", "blocks", "recompute")


# ----------------------------------------------------------------------------- window helpers


def window_partition(x: jax.Array, ws: int) -> jax.Array:
  b, h, w, c = x.shape
  x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * (h // ws) * (w // ws), ws * ws, c)


def window_reverse(windows: jax.Array, ws: int, h: int, w: int) -> jax.Array:
  c = windows.shape[-1]
  b = windows.shape[0] // ((h // ws) * (w // ws))
  x = windows.reshape(b, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def relative_position_index(ws: int) -> np.ndarray:
  coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
  return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
  """(num_windows, N, N) additive mask: -100 between tokens from different image regions."""
  img = np.zeros((h, w), np.int32)
  cnt = 0
  for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
    for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
      img[hs, wsl] = cnt
      cnt += 1
  win = img.reshape(h // ws, ws, w // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def prompt_visibility(generations, num_patches: int) -> np.ndarray | None:
  """(T + N, T + N) bool: which keys each query of a window may attend to (None: all).

  Tokens are [T prompts, N patches]; patches are of generation 0. A key is visible to a query
  of the same or a later generation: a task added to a trained model (generation 1) reads the
  patches and the old prompts, but neither the patches nor the old prompts read its prompt, so
  every old task computes exactly what it computed before the task was added
  (docs/method.md, "Adding a task").
  """
  if not any(generations):
    return None
  gen = np.concatenate([np.asarray(generations, np.int32), np.zeros(num_patches, np.int32)])
  return gen[None, :] <= gen[:, None]


# ----------------------------------------------------------------------------- modules


class WindowAttention(nn.Module):
  """(Shifted) window attention with relative-position bias; prompts join every window.

  Input: the normed token grid (B, H, W, C) and optional prompts (B, T, C). Prompts are prepended
  to each window's tokens, get no relative-position bias and are not masked by the shift (a task
  added to a trained model is masked as a key: prompt_visibility); their outputs are averaged
  over windows. proj runs on the grid after the windows are merged back, so its
  Sine-AWB path can convolve over the whole stage map.

  In a task block (last of a stage) each task gets its own proj input. With prompts, it is the
  prompt-conditioned x'_t = LN(x + a_t * x), a_t = GELU(raw q_t . k) of task t's prompt to each
  patch (per head), as in TADFormer; s_t = a_t * x is returned for the stage gate.
  Returns (y_shared, y_tasks, skips, prompt_out); y_shared is None without shared_output and
  prompt_out None without prompt_output (outputs nobody reads are not computed).
  """
  dim: int
  num_heads: int
  window_size: int
  shift: int
  adapter: AdapterSpec
  task_block: bool
  trainable_backbone: str
  dtype: Any
  shared_output: bool = True
  prompt_output: bool = True

  @nn.compact
  def __call__(self, x, prompts, omegas, *, deterministic):
    b, h, w, c = x.shape
    ws, heads = self.window_size, self.num_heads
    adapter = self.adapter
    trainable = self.trainable_backbone
    layer = lambda name, features: adapter.dense(name, features, trainable, self.dtype)
    qkv_layer, proj_layer = layer("qkv", 3 * c), layer("proj", c)
    table = backbone_weight(self, "relative_position_bias_table",
                            nn.initializers.truncated_normal(0.02),
                            ((2 * ws - 1) ** 2, heads), "relpos", self.trainable_backbone)

    if self.shift:
      x = jnp.roll(x, (-self.shift, -self.shift), axis=(1, 2))
    windows = window_partition(x, ws)  # (B*nW, N, C)
    n_win = windows.shape[0] // b
    n = ws * ws
    num_prompts = 0 if prompts is None else prompts.shape[1]
    if num_prompts:
      tiled = jnp.repeat(prompts.astype(windows.dtype), n_win, axis=0)  # (B*nW, T, C)
      windows = jnp.concatenate([tiled, windows], axis=1)
    tokens = windows.shape[1]

    qkv, _ = qkv_layer(windows, deterministic=deterministic)
    qkv = qkv.reshape(-1, tokens, 3, heads, c // heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    raw = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
    logits = raw * (c // heads) ** -0.5

    bias = table[relative_position_index(ws).reshape(-1)].reshape(n, n, heads)
    bias = jnp.pad(bias.transpose(2, 0, 1), ((0, 0), (num_prompts, 0), (num_prompts, 0)))
    logits = logits + bias[None]
    if self.shift:
      mask = np.pad(shifted_window_mask(h, w, ws, self.shift),
                    ((0, 0), (num_prompts, 0), (num_prompts, 0)))
      logits = logits.reshape(b, n_win, heads, tokens, tokens) + mask[None, :, None]
      logits = logits.reshape(-1, heads, tokens, tokens)
    visible = prompt_visibility(adapter.prompt_generations, n) if num_prompts else None
    if visible is not None:  # keys masked out get weight exactly 0
      logits = jnp.where(visible, logits, -jnp.inf)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bhkd->bqhd", attn, v).reshape(-1, tokens, c)

    def to_grid(win_tokens):
      grid = window_reverse(win_tokens, ws, h, w)
      return jnp.roll(grid, (self.shift, self.shift), axis=(1, 2)) if self.shift else grid

    prompt_out = None
    if num_prompts:
      prompt_out = out[:, :num_prompts]
      out = out[:, num_prompts:]
    grid = to_grid(out)

    task_inputs = skips = None
    t_count = adapter.num_tasks
    if self.task_block:
      if num_prompts:
        # a_t: raw prompt-to-patch scores (B*nW, heads, T, N) -> (T, B*nW, N, C), each head's
        # score repeated over its channels.
        a = nn.gelu(raw[:, :, :t_count, num_prompts:], approximate=False).astype(self.dtype)
        a = jnp.repeat(a.transpose(2, 0, 3, 1), c // heads, axis=-1)
        skips = jax.vmap(to_grid)(a * out[None])  # (T, B, H, W, C)
        norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="prompt_norm")
        task_inputs = (grid, norm(grid[None] + skips))
      else:
        task_inputs = (grid, jnp.broadcast_to(grid[None], (t_count, *grid.shape)))
    elif num_prompts and adapter.prompt_norm_every_block:
      # Declared (applied to an empty array, so it costs nothing) but never used, as TADFormer.
      nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="prompt_norm")(grid[:0])
    y, y_tasks = proj_layer(grid, task_inputs, omegas, deterministic=deterministic,
                            shared_output=self.shared_output)
    if prompt_out is not None and self.prompt_output:
      prompt_out, _ = proj_layer(prompt_out, deterministic=deterministic)
      prompt_out = prompt_out.reshape(b, n_win, num_prompts, c).mean(axis=1)
    else:
      prompt_out = None
    return y, y_tasks, skips, prompt_out


class Mlp(nn.Module):
  hidden: int
  adapter: AdapterSpec
  trainable_backbone: str
  dtype: Any

  @nn.compact
  def __call__(self, x, x_tasks, omegas, *, deterministic):
    """Shared stream x (None: task streams only) and optional stacked task streams
    (T, B, H, W, C); returns (y or None, y_tasks or None)."""
    adapter = self.adapter
    trainable = self.trainable_backbone
    layer = lambda name, features: adapter.dense(name, features, trainable, self.dtype)
    dim = (x if x is not None else x_tasks).shape[-1]
    fc1, fc2 = layer("fc1", self.hidden), layer("fc2", dim)
    gelu = lambda z: None if z is None else nn.gelu(z, approximate=False)
    # (frozen input, path input) of the task streams z for the shared stream s.
    pair = lambda s, z: None if z is None else ((s if adapter.frozen_on_shared else z), z)
    shared = x is not None
    h, h_tasks = fc1(x, pair(x, x_tasks), omegas, deterministic=deterministic,
                     shared_output=shared)
    h, h_tasks = gelu(h), gelu(h_tasks)
    return fc2(h, pair(h, h_tasks), omegas, deterministic=deterministic, shared_output=shared)


class SwinBlock(nn.Module):
  """A Swin block. A task block (last of a stage) also returns one stream per task.

  Without shared_output (the network's last task block, whose shared stream nobody reads) only
  the task streams are computed and the returned shared stream is None.
  """
  dim: int
  num_heads: int
  window_size: int
  shift: int
  mlp_ratio: float
  drop_path: float
  adapter: AdapterSpec
  task_block: bool
  update_prompts: bool  # False in the network's last block, whose prompts are never used
  trainable_backbone: str
  dtype: Any
  shared_output: bool = True

  @nn.compact
  def __call__(self, x, prompts, omegas, deterministic):
    def drop(z, batch_dims=1):
      # Constructed even when z is None (a skipped output), so every DropPath keeps its name
      # and hence its random stream whichever outputs are computed.
      layer = DropPath(self.drop_path, batch_dims=batch_dims)
      return None if z is None else layer(z, deterministic=deterministic)

    trainable = self.trainable_backbone
    norm1 = FrozenLayerNorm(trainable_backbone=trainable, dtype=self.dtype, name="norm1")
    norm2 = FrozenLayerNorm(trainable_backbone=trainable, dtype=self.dtype, name="norm2")
    attn = WindowAttention(self.dim, self.num_heads, self.window_size, self.shift, self.adapter,
                           self.task_block, self.trainable_backbone, self.dtype, self.shared_output,
                           self.update_prompts, name="attn")
    mlp = Mlp(int(self.dim * self.mlp_ratio), self.adapter, trainable, self.dtype, name="mlp")

    normed_prompts = None if prompts is None else norm1(prompts)
    a, a_tasks, skips, p_attn = attn(norm1(x), normed_prompts, omegas,
                                     deterministic=deterministic)
    a = drop(a)
    x1 = None if a is None else x + a
    x1_tasks = None if a_tasks is None else x[None] + drop(a_tasks, 2)
    m, m_tasks = mlp(None if x1 is None else norm2(x1),
                     None if x1_tasks is None else norm2(x1_tasks), omegas,
                     deterministic=deterministic)
    m = drop(m)
    out = None if m is None else x1 + m
    out_tasks = None if m_tasks is None else x1_tasks + drop(m_tasks, 2)
    if prompts is not None and self.update_prompts:
      # TADFormer: no residual around attention for prompts; MLP residual on the block input.
      p_mlp, _ = mlp(norm2(p_attn), None, omegas, deterministic=deterministic)
      prompts = prompts + drop(p_mlp)
    return out, out_tasks, skips, prompts


class PatchMerging(nn.Module):
  trainable_backbone: str
  dtype: Any
  lora: adapters.LoraSpec | None = None  # MTLoRA+: LoRA on the (frozen) reduction

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    b, h, w, c = x.shape
    if h % 2 or w % 2:
      raise ValueError(f"PatchMerging needs an even token grid, got {h}x{w}")
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    x = FrozenLayerNorm(trainable_backbone=self.trainable_backbone, dtype=self.dtype, name="norm")(x)
    if self.lora is not None:
      y, _ = adapters.AdaptedDense(2 * c, self.lora, use_bias=False,
                                   trainable_backbone=self.trainable_backbone,
                                   dtype=self.dtype, name="reduction")(
                                       x, deterministic=deterministic)
      return y
    return FrozenDense(2 * c, use_bias=False, category="merge_reduction",
                       trainable_backbone=self.trainable_backbone,
                       dtype=self.dtype, name="reduction")(x)


class PatchEmbed(nn.Module):
  embed_dim: int
  patch_size: int
  trainable_backbone: str
  dtype: Any

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    kernel = backbone_weight(self, "kernel", nn.initializers.truncated_normal(0.02),
                             (p, p, images.shape[-1], self.embed_dim), "patch_embed",
                             self.trainable_backbone)
    bias = backbone_weight(self, "bias", nn.initializers.zeros, (self.embed_dim,), "patch_embed",
                           self.trainable_backbone)
    x = jax.lax.conv_general_dilated(images.astype(self.dtype), kernel.astype(self.dtype), (p, p),
                                     "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = x + bias.astype(self.dtype)
    return x


class SwinBackbone(nn.Module):
  """Returns, per stage, the shared feature grid and (with task streams) one grid per task.

  Output: list over stages of (shared, stacked task grids (T, ...) or None), taken after each
  stage's patch
  merging as MTLoRA/TADFormer do (Swin-T: 192, 384, 768, 768 channels at strides 8, 16, 32, 32).
  Prompts (B, T, C) enter at stage 1 and are projected C -> 2C at each patch merge.
  With last_shared=False and task streams, the last stage's shared stream (which no decoder
  reads) is not computed and returned as None.
  block_remat (model.compute.block_remat): 'blocks' recomputes each Swin block's activations in the backward
  pass from the block's inputs instead of keeping them, with nn.remat (jax.checkpoint);
  'recompute' does the same with layers.recompute_in_backward, whose recomputation XLA cannot
  merge back into the forward pass (XLA:CPU does so with jax.checkpoint's: docs/method.md).
  """
  spec: SwinSpec
  adapter: AdapterSpec
  trainable_backbone: str = "none"
  dtype: Any = jnp.float32
  block_remat: str = "none"

  @nn.compact
  def __call__(self, images, prompts=None, omegas=None, *, train: bool = False,
               last_shared: bool = True):
    spec = self.spec
    deterministic = not train
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (B, H, W, 3), got {images.shape}")
    h, w = images.shape[1:3]
    p = spec.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = PatchEmbed(spec.embed_dim, p, self.trainable_backbone, self.dtype,
                   name="patch_embed_proj")(images)
    x = FrozenLayerNorm(trainable_backbone=self.trainable_backbone, category="patch_embed",
                        dtype=self.dtype, name="patch_embed_norm")(x)

    total_blocks = sum(spec.depths)
    rates = np.linspace(0.0, spec.drop_path_rate, total_blocks)
    task_streams = self.adapter.task_path != adapters.NO_TASK_PATH or self.adapter.prompts
    # MTLoRA/TADFormer task outputs add Phi(shared stream): then the last shared stream is read.
    adapter_reads_shared = self.adapter.frozen_on_shared
    if self.block_remat not in REMAT_MODES:
      raise ValueError(f"model.compute.block_remat={self.block_remat!r} is not one of "
                       f"{REMAT_MODES}")
    # deterministic (argument 4, counting self) is static: it selects Python branches.
    block_cls = nn.remat(SwinBlock, static_argnums=(4,)) if self.block_remat == "blocks" else SwinBlock
    block_id = 0
    outputs = []
    num_stages = len(spec.depths)
    for i, (depth, heads) in enumerate(zip(spec.depths, spec.num_heads)):
      gh, gw = x.shape[1:3]
      ws, can_shift = stage_windows(min(gh, gw), spec.window_size)
      if gh % ws or gw % ws:
        raise ValueError(
            f"stage {i + 1} token grid {gh}x{gw} is not divisible by the window size {ws}; "
            f"choose an input size whose stage grids are multiples of {ws} (e.g. 224, 448)")
      dim = spec.stage_dims[i]
      tasks_out = skips = None
      for j in range(depth):
        last_of_stage = j == depth - 1
        last_block = block_id == total_blocks - 1
        block = block_cls(dim, heads, ws, (ws // 2) if (j % 2 and can_shift) else 0,
                          spec.mlp_ratio, float(rates[block_id]), self.adapter,
                          task_block=last_of_stage and task_streams,
                          update_prompts=not last_block, trainable_backbone=self.trainable_backbone,
                          dtype=self.dtype,
                          shared_output=(last_shared or adapter_reads_shared
                                         or not (last_block and task_streams)),
                          name=f"layers_{i}_blocks_{j}")
        if self.block_remat == "recompute" and train and not self.is_initializing():
          x, tasks_out, skips, prompts = self._recomputed(block, x, prompts, omegas)
        else:
          x, tasks_out, skips, prompts = block(x, prompts, omegas, deterministic)
        block_id += 1
      if skips is not None:
        # Stage gate (zero-init, sigmoid): mixes each task's prompt-modulated attention skip in.
        g = jax.nn.sigmoid(self.param(f"prompt_gate_{i}", nn.initializers.zeros, ()))
        tasks_out = g * skips + (1 - g) * tasks_out
      if i < num_stages - 1:
        adapter = self.adapter
        merge_lora = adapter.lora if "reduction" in adapter.lora_modules else None
        merge = PatchMerging(self.trainable_backbone, self.dtype, merge_lora,
                             name=f"layers_{i}_downsample")
        x = merge(x, deterministic=deterministic)
        if tasks_out is not None:  # the task streams share the (frozen) patch merging
          merged = merge(tasks_out.reshape(-1, *tasks_out.shape[2:]), deterministic=deterministic)
          tasks_out = merged.reshape(*tasks_out.shape[:2], *merged.shape[1:])
        if prompts is not None:
          prompts = nn.Dense(2 * dim, use_bias=False, dtype=self.dtype,
                             kernel_init=nn.initializers.truncated_normal(0.02),
                             name=f"prompt_proj_{i}")(prompts)
      outputs.append((x, tasks_out))
    return outputs

  def _recomputed(self, block: SwinBlock, x, prompts, omegas):
    """block(x, prompts, omegas) in training, as a pure function of the block's variables and
    random keys whose backward pass recomputes the block (layers.recompute_in_backward): only
    the block's inputs are kept for the backward pass. Its dropout / drop-path keys are drawn
    here (not inside the block), so its random masks differ from block_remat='none''s."""
    name = block.name
    own = {col: tree[name] for col, tree in self.variables.items() if name in tree}
    params = own.pop("params", {})
    keys = {stream: self.make_rng(stream) for stream in ("dropout", "drop_path")
            if self.has_rng(stream)}
    unbound = block.clone(parent=None)

    def run(x, params, prompts, omegas, frozen, keys):
      return unbound.apply({"params": params, **frozen}, x, prompts, omegas, False, rngs=keys)

    # The input's gradient waits for the block's weight gradients (see recompute_in_backward).
    run = recompute_in_backward(run, finish_with=(1,), frozen=(4, 5))
    return run(x, params, prompts, omegas, own, keys)
