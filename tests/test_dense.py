"""layers.dense, layers.per_task_dense and layers.Conv1x1: the values and gradients of jnp.dot,
the 't...c,tco' einsum and nn.Conv(k=1), and (on XLA:CPU) a weight gradient computed without
transposed copies of the activations, which is why they exist (docs/method.md, "The train
step's non-matmul work on the CPU")."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from freesine_jax.models import layers

KEYS = jax.random.split(jax.random.PRNGKey(0), 4)
X = jax.random.normal(KEYS[0], (2, 6, 5, 24))        # (B, H, W, C_in)
XT = jax.random.normal(KEYS[1], (3, 2, 6, 5, 24))    # (T, B, H, W, C_in)
W = jax.random.normal(KEYS[2], (24, 16)) / 5
WT = jax.random.normal(KEYS[3], (3, 24, 16)) / 5


def grads(fn, *args):
  return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args))))(*args)


def test_dense_and_per_task_dense_are_dot_and_einsum():
  for ours, ref, args in (
      (layers.dense, jnp.dot, (X, W)),
      (layers.per_task_dense, lambda x, w: jnp.einsum("t...c,tco->t...o", x, w), (XT, WT))):
    np.testing.assert_allclose(ours(*args), ref(*args), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(ours, *args), grads(ref, *args), strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert layers.dense(X[0, 0, 0], W).shape == (16,)  # a single row
  assert layers.per_task_dense(XT[:, 0, 0, 0], WT).shape == (3, 16)


@pytest.mark.parametrize("use_bias", [True, False])
def test_conv1x1_is_nn_conv_with_the_same_parameters(use_bias):
  """Same parameter tree, names, shapes and initial values as nn.Conv(features, (1, 1)) for the
  same key (checkpoints of either load into the other), the same outputs and gradients."""
  ref, ours = nn.Conv(16, (1, 1), use_bias=use_bias), layers.Conv1x1(16, use_bias=use_bias)
  v_ref, v_ours = ref.init(KEYS[1], X), ours.init(KEYS[1], X)
  assert jax.tree_util.tree_structure(v_ref) == jax.tree_util.tree_structure(v_ours)
  for a, b in zip(jax.tree_util.tree_leaves(v_ref), jax.tree_util.tree_leaves(v_ours)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(ours.apply(v_ref, X), ref.apply(v_ref, X), rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.tree_util.tree_leaves(grads(lambda v: ours.apply(v, X), v_ref)),
                       jax.tree_util.tree_leaves(grads(lambda v: ref.apply(v, X), v_ref))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU layout property")
def test_weight_gradients_copy_no_activation_transposed():
  """The optimized HLO of the weight gradient: N-D jnp.dot and the 't...c' einsum transpose
  activation-sized arrays (what cost 3-4x on the train step); dense / per_task_dense do not."""
  big = lambda shape: int(np.prod(shape)) >= 6 * 5 * 16

  def transposed_copies(fn, w, x):
    text = jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(fn(x, w))))).lower(w).compile().as_text()
    shapes = re.findall(r"= f32\[([\d,]*)\]\{[^}]*\} (?:transpose|copy)\(", text)
    return [s for s in shapes if big([int(d) for d in s.split(",") if d])]

  assert transposed_copies(jnp.dot, W, X)  # the XLA behaviour the helpers avoid
  assert not transposed_copies(layers.dense, W, X)
  assert transposed_copies(lambda x, w: jnp.einsum("t...c,tco->t...o", x, w), WT, XT)
  assert not transposed_copies(layers.per_task_dense, WT, XT)
