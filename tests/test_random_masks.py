"""The random masks of training: layers.bernoulli_mask / layers.Dropout (bits per entry) and
train.mask_key (the PRNG implementation), against jax.random.bernoulli / nn.Dropout and the
binomial statistics of their keep rates."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freesine_jax import train
from freesine_jax.models import adapters
from freesine_jax.models import layers

N = 1_000_000


def within_sigmas(count: float, n: int, p: float, sigmas: float = 5.0) -> bool:
  """|count - n p| within `sigmas` binomial standard deviations."""
  return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_32_bits_is_jax_bernoulli_and_dropout_is_flax_dropout_bitwise():
  key = jax.random.PRNGKey(3)
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 7, 13))
  mask, p = layers.bernoulli_mask(key, 0.95, x.shape)
  np.testing.assert_array_equal(mask, jax.random.bernoulli(key, 0.95, x.shape))
  assert p == 0.95
  ours = layers.Dropout(0.05).apply({}, x, deterministic=False, rngs={"dropout": key})
  flax = nn.Dropout(0.05).apply({}, x, deterministic=False, rngs={"dropout": key})
  np.testing.assert_array_equal(ours, flax)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("keep", [0.95, 0.9, 0.5, 0.018])
def test_packed_bits_keep_at_the_rounded_rate_and_stay_unbiased(bits, keep):
  """bits = 8 / 16: p = round(keep 2^bits) / 2^bits (within 2^-(bits+1) of keep); over 1e6
  entries the kept count is within 5 binomial sigmas of N p, neighbouring entries (bytes of one
  random word) are uncorrelated within 5 / sqrt(N), and Dropout's output is unbiased: the sum of
  dropout(1) is N within 5 sigmas of the scaled count."""
  key = jax.random.PRNGKey(11)
  mask, p = layers.bernoulli_mask(key, keep, (N // 1000, 1000), bits)
  assert mask.shape == (N // 1000, 1000) and mask.dtype == jnp.bool_
  assert p == round(keep * 2 ** bits) / 2 ** bits and abs(p - keep) <= 2.0 ** -(bits + 1)
  flat = np.asarray(mask).reshape(-1).astype(np.float64)
  assert within_sigmas(flat.sum(), N, p)
  a, b = flat[:-1] - flat.mean(), flat[1:] - flat.mean()
  assert abs(np.mean(a * b) / np.var(flat)) < 5 / math.sqrt(N)
  y = layers.Dropout(1 - keep, bits).apply({}, jnp.ones((N,)), deterministic=False,
                                           rngs={"dropout": key})
  assert set(np.unique(np.asarray(y))) <= {0.0, np.float32(1 / p)}
  assert within_sigmas(float(jnp.sum(y)) * p, N, p)
  # A count that is not a multiple of the entries per word, and another key: other bits.
  odd, _ = layers.bernoulli_mask(key, keep, (3, 5, 7), bits)
  assert odd.shape == (3, 5, 7)
  other, _ = layers.bernoulli_mask(jax.random.PRNGKey(12), keep, mask.shape, bits)
  assert not np.array_equal(mask, other)


def test_dropout_edges_and_bad_bits():
  x = jnp.arange(12.0).reshape(3, 4)
  key = {"dropout": jax.random.PRNGKey(0)}
  for bits in layers.MASK_BITS:
    np.testing.assert_array_equal(
        layers.Dropout(0.3, bits).apply({}, x, deterministic=True, rngs=key), x)
    np.testing.assert_array_equal(
        layers.Dropout(0.0, bits).apply({}, x, deterministic=False, rngs=key), x)
    np.testing.assert_array_equal(
        layers.Dropout(1.0, bits).apply({}, x, deterministic=False, rngs=key), 0 * x)
  # keep rounds to 1 at 8 bits: nothing dropped, nothing scaled.
  np.testing.assert_array_equal(
      layers.Dropout(0.001, 8).apply({}, x, deterministic=False, rngs=key), x)
  with pytest.raises(ValueError, match=r"model.lora.dropout_bits=12 is not one of \(8, 16, 32\)"):
    adapters.LoraSpec(8, dropout_bits=12)


def test_mask_keys_are_deterministic_and_draw_the_right_rate():
  """train.mask_key: for 'threefry' the state's key itself; for rbg / unsafe_rbg a key of that
  implementation seeded from it, so the same key gives the same masks and different keys
  different ones, and a Bernoulli(0.9) mask's kept count is within 5 binomial sigmas."""
  key = jax.random.PRNGKey(7)
  assert train.mask_key(key, "threefry") is key
  for impl in ("rbg", "unsafe_rbg"):
    assert str(jax.random.key_impl(train.mask_key(key, impl))) == impl
    for bits in (8, 32):
      draw = lambda k: np.asarray(layers.bernoulli_mask(train.mask_key(k, impl), 0.9, (N,),
                                                        bits)[0])
      first = draw(key)
      np.testing.assert_array_equal(first, draw(jax.random.PRNGKey(7)))
      assert not np.array_equal(first, draw(jax.random.fold_in(key, 1)))
      assert within_sigmas(first.sum(), N, round(0.9 * 2 ** bits) / 2 ** bits), first.mean()
