"""benchmarks/op_profile.py: the FLOPs it reads from the optimized HLO and the groups it forms."""
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import op_profile
from freesine_jax.models import adapters


def test_traced_flops_and_gemm_shapes_match_the_closed_form():
  """A matrix product (M, K, N), a batched one and a 3x3 'same' convolution, compiled and run
  under the profiler: every op is found in the trace (one group here), and the FLOPs read from
  the HLO are 2 M K N + 2 b q k d + 2 H W C_out (3 3 C_in), not XLA's estimate."""
  m, k, n = 64, 48, 40
  b, q, kk, d = 3, 5, 7, 16
  h, w, c_in, c_out = 8, 8, 4, 6

  def program(x, y, qs, ks, image, kernel):
    conv = jax.lax.conv_general_dilated(image, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return x @ y, jnp.einsum("bqd,bkd->bqk", qs, ks), conv

  keys = jax.random.split(jax.random.key(0), 6)
  args = (jax.random.normal(keys[0], (m, k)), jax.random.normal(keys[1], (k, n)),
          jax.random.normal(keys[2], (b, q, d)), jax.random.normal(keys[3], (b, kk, d)),
          jax.random.normal(keys[4], (1, h, w, c_in)),
          jax.random.normal(keys[5], (3, 3, c_in, c_out)))
  compiled = jax.jit(program).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  result = op_profile.profile_ops(lambda: compiled(*args), compiled.as_text(), 2,
                                  group=lambda module, name: "all")
  want = 2 * m * k * n + 2 * b * q * kk * d + 2 * h * w * c_out * 9 * c_in
  np.testing.assert_allclose(result["flops"], want, rtol=0)
  (group,) = result["groups"]
  assert group.seconds > 0 and result["op_s"] > 0
  assert group.gemms == {(m, k, n): 1}  # the plain product only; the batched one is not a GEMM


def test_train_group_finds_the_task_paths_named_scopes():
  """models/adapters.sine_awb_outputs names its kernel build and kernel application, forward and
  backward: the groups op_profile reports for a train step exist in a compiled gradient."""
  spec, lowering = adapters.SineAwbSpec(), adapters.TaskPathCompute()
  tasks, rank, c = 2, 4, 8
  keys = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(keys[0], (tasks, 1, 6, 6, c))
  factors = (jax.random.normal(keys[1], (c, rank)), jax.random.normal(keys[2], (3, 3, rank, rank)),
             jax.random.normal(keys[3], (rank, c)))
  omegas = jnp.array([0.5, 1.5])

  def loss(x, factors):
    return jnp.sum(jnp.square(adapters.sine_awb_outputs(x, factors, omegas, spec, lowering)))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, factors).compile()
  module = op_profile.Module(compiled.as_text())
  groups = {op_profile.train_group(module, name) for name in module.instructions}
  for what in ("task kernels: build", "task kernels: apply"):
    for direction in ("forward", "backward"):
      assert any(g.startswith(what) and g.endswith(direction) for g in groups), (what, groups)


def test_kinds_split_matmuls_random_bits_and_the_rest():
  """op_kind: a dropout mask drawn with threefry or rbg (train.mask_key) is 'random bits', every
  matrix product 'matmul' (whatever XLA fuses into it); the kinds' time-sliced seconds, as
  profile_ops reports them, add up to op_s."""
  from freesine_jax import train  # pylint: disable=g-import-not-at-top

  def program(key, x, y):
    keep = jax.random.bernoulli(key, 0.9, x.shape)
    return jnp.tanh(jnp.where(keep, x / 0.9, 0) @ y) + 1.0

  x, y = jnp.ones((256, 128)), jnp.ones((128, 64))
  for impl in ("threefry", "rbg"):
    key = train.mask_key(jax.random.PRNGKey(0), impl)
    compiled = jax.jit(program).lower(key, x, y).compile()
    module = op_profile.Module(compiled.as_text())
    kinds = {name: op_profile.op_kind(module, name) for name in module.instructions}
    assert "random bits" in kinds.values() and "matmul" in kinds.values(), (impl, kinds)
    dots = [n for n, i in module.instructions.items() if i.opcode == "dot"]
    assert dots and all(kinds[n] == "matmul" for n in dots)
    jax.block_until_ready(compiled(key, x, y))
    result = op_profile.profile_ops(lambda: compiled(key, x, y), compiled.as_text(), 2)
    assert result["kinds"].get("random bits", 0) > 0, (impl, result["kinds"])
    np.testing.assert_allclose(sum(result["kinds"].values()), result["op_s"], rtol=1e-9)
