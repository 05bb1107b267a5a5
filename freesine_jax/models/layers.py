"""Building blocks whose weights live in the frozen 'backbone' collection unless made trainable.

Every pretrained Swin weight is declared through `backbone_weight`: it lands in the 'backbone'
collection (never differentiated, no optimizer state) or, when the configured fine-tuning policy
says its category is trainable, in 'params'. The module path is identical in both cases, so a
converted checkpoint maps onto either collection by path.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BACKBONE = "backbone"

# Categories of pretrained weights, and which ones each fine-tuning policy trains.
CATEGORIES = ("patch_embed", "norm", "relpos", "merge_reduction", "linear")
TRAINABLE_POLICIES = {
    # Frozen backbone: only adapters, prompts, Clock Net and decoders train.
    "none": (),
    # TADFormer / Free Sinewich: LayerNorms, relative-position tables and patch_embed train.
    "norms_relpos_embed": ("patch_embed", "norm", "relpos"),
    # MTLoRA: additionally the patch-merging reductions.
    "mtlora": ("patch_embed", "norm", "relpos", "merge_reduction"),
    # Full fine-tuning.
    "all": CATEGORIES,
}


def is_trainable(trainable_backbone: str, category: str) -> bool:
  if trainable_backbone not in TRAINABLE_POLICIES:
    raise ValueError(
        f"model.trainable_backbone={trainable_backbone!r} is not one of {sorted(TRAINABLE_POLICIES)}")
  if category not in CATEGORIES:
    raise ValueError(f"unknown backbone weight category {category!r}")
  return category in TRAINABLE_POLICIES[trainable_backbone]


def backbone_weight(module: nn.Module, name: str, init_fn: Callable, shape: Sequence[int],
                    category: str, trainable_backbone: str) -> jax.Array:
  """Declares a pretrained weight in 'params' (trainable) or 'backbone' (frozen)."""
  shape = tuple(shape)
  if is_trainable(trainable_backbone, category):
    return module.param(name, init_fn, shape, jnp.float32)
  var = module.variable(BACKBONE, name, lambda: init_fn(module.make_rng("params"), shape,
                                                        jnp.float32))
  return var.value


class FrozenDense(nn.Module):
  """A Dense layer whose kernel (in, out) and bias are pretrained backbone weights."""
  features: int
  use_bias: bool = True
  category: str = "linear"
  trainable_backbone: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = backbone_weight(self, "kernel", nn.initializers.truncated_normal(0.02),
                             (x.shape[-1], self.features), self.category, self.trainable_backbone)
    y = dense(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = backbone_weight(self, "bias", nn.initializers.zeros, (self.features,),
                             self.category, self.trainable_backbone)
      y = y + bias.astype(self.dtype)
    return y


class FrozenLayerNorm(nn.Module):
  """LayerNorm (eps 1e-5, as PyTorch) with pretrained scale/bias; statistics in float32."""
  category: str = "norm"
  trainable_backbone: str = "none"
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = backbone_weight(self, "scale", nn.initializers.ones, (features,), self.category,
                            self.trainable_backbone)
    bias = backbone_weight(self, "bias", nn.initializers.zeros, (features,), self.category,
                           self.trainable_backbone)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (..., C_in) @ kernel (C_in, C_out) -> (..., C_out), computed on x viewed as a matrix.

  Why not jnp.dot(x, kernel) on x as it is: for x with more than one leading axis, XLA:CPU
  computes the kernel's gradient (a contraction over every leading axis) after copying the
  (..., C_out) cotangent and the input transposed, element by element: measured on the shared
  LoRA of a stage-1 layer at 448 (x (2, 12544, 96), rank 64, C_out 384), 0.24 s per
  forward + backward against 0.065 s with x flattened (docs/method.md, "The train step's
  non-matmul work on the CPU").
  The reshape is free (row-major), and the values are those of jnp.dot.
  """
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


def per_task_dense(x: jax.Array, kernels: jax.Array) -> jax.Array:
  """x (T, ..., C_in) @ kernels (T, C_in, C_out) -> (T, ..., C_out) per task t, computed on
  x viewed as (T, rows, C_in) (why: `dense`; einsum 't...c,tco->t...o' copied the cotangent
  transposed, 3.8x the time of this form on MTLoRA's task LoRA at stage 1)."""
  y = jnp.einsum("tnc,tco->tno", x.reshape(x.shape[0], -1, x.shape[-1]), kernels)
  return y.reshape(*x.shape[:-1], kernels.shape[-1])


class Conv1x1(nn.Module):
  """nn.Conv(features, (1, 1)) with the same parameters ('kernel' (1, 1, C_in, features),
  lecun-normal; 'bias' zeros) and values, computed as a `dense` product: XLA:CPU computes the
  kernel gradient of a 1x1 nn.Conv as a convolution whose window is the whole feature map, on
  transposed copies (measured: 0.15 s per HRNet-head conv_in at 448, batch 2, ~8x its GEMM)."""
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (1, 1, x.shape[-1], self.features))
    y = dense(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


MASK_BITS = (8, 16, 32)


def bernoulli_mask(key: jax.Array, keep: float, shape: Sequence[int],
                   bits: int = 32) -> tuple[jax.Array, float]:
  """(mask, p): a boolean mask of `shape`, each entry True independently with probability p.

  bits = 32: jax.random.bernoulli(key, keep, shape), p = keep (one 32-bit random word per
  entry). bits = 8 or 16: each 32-bit word gives 32 / bits entries (its bytes / half-words),
  each compared with round(keep * 2^bits), so p = that / 2^bits, within 2^-(bits+1) of keep:
  4x / 2x fewer random words, whose generation is what a dropout mask costs (threefry or
  Philox: ~10 ns per word on a CPU core, 6x a memory pass; docs/method.md, "The train step's
  non-matmul work on the CPU").
  """
  if bits not in MASK_BITS:
    raise ValueError(f"mask bits {bits!r} is not one of {MASK_BITS}")
  if bits == 32:
    return jax.random.bernoulli(key, keep, shape), keep
  levels = 1 << bits
  threshold = min(int(round(keep * levels)), levels)
  if threshold in (0, levels):  # p = 0 or 1 after rounding: no random bits needed
    return jnp.full(shape, threshold == levels), 1.0
  count = math.prod(shape)
  words = jax.random.bits(key, (-(-count * bits // 32),), jnp.uint32)
  small = jax.lax.bitcast_convert_type(words, jnp.uint8 if bits == 8 else jnp.uint16)
  return small.reshape(-1)[:count].reshape(shape) < threshold, threshold / levels


class Dropout(nn.Module):
  """Inverted dropout (as nn.Dropout: kept entries scaled by 1/p) whose mask is drawn with
  `bits` random bits per entry (bernoulli_mask): bits = 32 is nn.Dropout bitwise; 8 draws a
  4x cheaper mask, each entry kept with probability round((1 - rate) 256) / 256."""
  rate: float
  bits: int = 32
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    mask, keep = bernoulli_mask(self.make_rng(self.rng_collection), 1.0 - self.rate, x.shape,
                                self.bits)
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class DropPath(nn.Module):
  """Stochastic depth: drops a whole residual branch per example (rng stream 'drop_path').

  batch_dims > 1 for stacked task streams (T, B, ...): each stream of each example is dropped
  independently.
  """
  rate: float
  batch_dims: int = 1

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask_shape = x.shape[:self.batch_dims] + (1,) * (x.ndim - self.batch_dims)
    mask = jax.random.bernoulli(self.make_rng("drop_path"), keep, mask_shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def _zero_tie(tree) -> jax.Array:
  """0 * sum(tree): a float32 zero that XLA can compute only after every leaf of tree (x * 0 is
  not folded to 0 for IEEE floats, so the dependency survives every optimisation)."""
  return 0.0 * sum(jnp.sum(leaf).astype(jnp.float32) for leaf in jax.tree_util.tree_leaves(tree))


def _tie(tree, zero: jax.Array):
  return jax.tree_util.tree_map(lambda a: a + zero.astype(jnp.result_type(a)), tree)


def _zero_cotangent(leaf):
  """The cotangent of an argument nothing differentiates: zeros (float0 for integer/key data)."""
  dtype = jnp.result_type(leaf)
  if jnp.issubdtype(dtype, jnp.inexact):
    return jnp.zeros_like(leaf)
  return np.zeros(np.shape(leaf), jax.dtypes.float0)


def recompute_in_backward(fn: Callable, finish_with: Sequence[int] = (),
                          frozen: Sequence[int] = ()) -> Callable:
  """fn(*args), whose backward pass recomputes fn's intermediates from args instead of keeping
  them from the forward pass (what jax.checkpoint means), on every backend.

  jax.checkpoint marks the recomputation with an optimization barrier, but XLA:CPU erases the
  barriers before its last CSE, which then merges the recomputation back into the forward
  computation: the intermediates are kept after all (measured: every im2col copy and task
  kernel of the step stayed alive until its backward). Here the recomputation runs on the
  args tied to the cotangent (_zero_tie), so it can neither run before the cotangent exists nor
  be merged with the forward. Only the args are saved. Reverse-mode differentiable only.

  finish_with: indices of args whose cotangents (weight gradients, typically) the cotangent of
  args[0] waits for. Weight gradients only feed the optimizer at the end of the step, so XLA's
  scheduler would otherwise postpone them and keep their large inputs alive meanwhile.
  frozen: indices of args that are not differentiated (frozen weights, random keys): they are
  not tied, no gradient is computed for them and their cotangent is zero.
  """
  frozen = frozenset(frozen)

  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def forward(*args):
    return fn(*args), args

  def backward(args, cotangent):
    zero = _zero_tie(cotangent)
    live = [i for i in range(len(args)) if i not in frozen]

    def of_live(*live_args):
      full = list(args)
      for i, a in zip(live, live_args):
        full[i] = a
      return fn(*full)

    live_grads = iter(jax.vjp(of_live, *[_tie(args[i], zero) for i in live])[1](cotangent))
    grads = [jax.tree_util.tree_map(_zero_cotangent, a) if i in frozen else next(live_grads)
             for i, a in enumerate(args)]
    if finish_with:
      done = _zero_tie([grads[i] for i in finish_with])
      grads[0] = _tie(grads[0], done)
    return tuple(grads)

  wrapped.defvjp(forward, backward)
  return wrapped
