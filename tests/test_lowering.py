"""Every way of computing the task path is the same function: pinned against the direct form.

The direct form is the Sine-AWB maths as first written (docs/method.md): per task
K~_t = lowpass((rho/omega_0) sin(omega_0 omega_t A.W.B / rho)) smoothed over each tap's
C_in x C_out matrix, applied as k*k shifted matmuls, with the frozen linear applied separately:
y_t = Phi(x_t) + scale (K~_t * x_t). The rewrites under test (adapters.TaskPathCompute, config
model.compute) change how that is computed, never what: the low-pass moved onto the
activations, the frozen linear folded into the centre tap, GEMM / grouped-convolution /
Winograd F(2x2, 3x3) lowerings, rematerialisation; and, at inference, the finished kernels and
the merged shared LoRA evaluated once (models.merge_for_inference).

Tolerances. The truth is the direct form evaluated in float64. A rewrite reorders float32
sums (Winograd's transforms have coefficients 0, +-1, +-1/2, exact in binary); any evaluation
order of an n-term sum errs by at most about sqrt(n) u sum|terms| in practice (Higham & Mary's
probabilistic bound; u = 2^-24), and the kernels' entries carry a few ulps of their own (RMS,
sine, a 49-term positive blur). So every output element must be within
4 (sqrt(n) + 8) u sum|terms| of the truth, n = k*k*C_in (+ C_in for a frozen layer), the sum of
|terms| computed in float64 from |x| and the absolute kernels. Measured, the direct form and
every rewrite stay below 1.2 sqrt(n) u sum|terms|; a real mistake (a wrong tap, a missing term)
is off by order sum|terms| itself. Gradients sum over many more terms (every token, the RMS's
reduction), so they are compared with the direct form's own float32 gradients instead: each
leaf within 4x the direct form's error against the float64 truth plus one ulp of its scale.
Magnitudes are the model's (tests/test_sine_regime.py): A at its init scale, W identity plus
off-centre taps ~0.2, B with RMS 1e-4 (first steps), 1e-2 (trained, paper setting) and 1e-1,
activations of LayerNorm scale, frozen weights of pretrained Swin scale (std 0.02).
"""
import itertools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from freesine_jax import models
from freesine_jax.models import adapters
from freesine_jax.models import decoders
from freesine_jax.models import layers

# benchmarks/device_check.sh runs the lowerings against the direct form on the device.
pytestmark = pytest.mark.accelerator

EPS32 = float(np.finfo(np.float32).eps)
U32 = EPS32 / 2  # unit roundoff
T, B, H, W, C_IN, C_OUT, RANK = 3, 2, 7, 6, 24, 40, 8  # H odd: Winograd's padded last tile
OMEGAS = np.array([0.5, 1.0, 1.5], np.float32)  # the Clock Net's spread start (3 tasks)
CONVS = adapters.TASK_CONVS
SITES = ("kernel", "activations")


def realistic_inputs(b_rms, k=3, c_in=C_IN, c_out=C_OUT, depthwise=False, seed=0):
  """(x, (A, W, B), (W_0, b_0)) at the magnitudes the model has (module docstring)."""
  ka, kw, kb, kx, k0, kb0 = jax.random.split(jax.random.key(seed), 6)
  a = adapters.lora_a_init(ka, (c_in, RANK))
  off_centre = np.ones((k, k) + (1,) * (1 if depthwise else 2), np.float32)
  off_centre[k // 2, k // 2] = 0.0
  shape = (k, k, RANK) if depthwise else (k, k, RANK, RANK)
  centre = jnp.ones((RANK,)) if depthwise else jnp.eye(RANK)
  w = jnp.zeros(shape).at[k // 2, k // 2].set(centre)
  w = w + off_centre * (0.2 / np.sqrt(RANK)) * jax.random.normal(kw, shape)
  b = b_rms * jax.random.normal(kb, (RANK, c_out))
  x = jax.random.normal(kx, (T, B, H, W, c_in))
  w0 = 0.02 * jax.random.truncated_normal(k0, -2, 2, (c_in, c_out))
  b0 = 0.01 * jax.random.normal(kb0, (c_out,))
  return x, (a, w, b), (w0, b0)


def shifted_matmuls(x, kernels):
  """The direct application: sum over taps of the shifted input times the tap's matrix."""
  k = kernels.shape[1]
  h, w = x.shape[2:4]
  half = k // 2
  xp = jnp.pad(x, ((0, 0), (0, 0), (half, half), (half, half), (0, 0)))
  out = 0.0
  for u in range(k):
    for v in range(k):
      out = out + jnp.einsum("tbhwc,tco->tbhwo", xp[:, :, u:u + h, v:v + w], kernels[:, u, v])
  return out


def reference_kernels(factors, omegas, spec):
  """K~_t as the model first computed them: one task at a time, SineSpec.kernel of the fused
  base (modulate, then low-pass), per-task bases fused separately."""
  a, w, b = factors
  if spec.independent_bases:
    return jnp.stack([spec.sine.kernel(adapters.fuse_awb(a[t], w[t], b[t]), omegas[t])
                      for t in range(len(omegas))])
  m = adapters.fuse_awb(a, w, b)
  return jnp.stack([spec.sine.kernel(m, omegas[t]) for t in range(len(omegas))])


def direct_form(x, factors, omegas, spec, frozen=None):
  """y_t = Phi(x_t) + scale (K~_t * x_t), the kernels smoothed, nothing folded or moved."""
  y = spec.scale * shifted_matmuls(x, reference_kernels(factors, omegas, spec))
  if frozen is not None:
    y = y + jnp.einsum("tbhwc,co->tbhwo", x, frozen[0]) + frozen[1]
  return y


def in_float64(fn, *args):
  with jax.enable_x64(True):
    cast = lambda tree: jax.tree_util.tree_map(lambda z: jnp.asarray(z, jnp.float64), tree)
    return jax.tree_util.tree_map(np.asarray, fn(*cast(args)))


def ulps(got, want) -> float:
  """max |got - want| in float32 ulps of want's scale (max |want|)."""
  scale = float(np.abs(want).max())
  return float(np.abs(np.asarray(got, np.float64) - want).max()) / (EPS32 * scale)


def assert_as_accurate(got, direct32, want, what):
  """got (a rewrite, float32) is as close to the float64 truth as the direct form in float32,
  within a factor 4 plus one ulp of the scale (module docstring)."""
  bound = 4.0 * ulps(direct32, want) + 1.0
  assert ulps(got, want) <= bound, f"{what}: {ulps(got, want):.2f} ulps > {bound:.2f}"


def variants(spec):
  for conv, site in itertools.product(CONVS, SITES):
    if conv == "winograd" and spec.applied_kernel_size != 3:
      continue
    yield adapters.TaskPathCompute(task_conv=conv, lowpass_site=site)


SPECS = {
    "default": adapters.SineAwbSpec(),
    "depthwise": adapters.SineAwbSpec(w_mode="depthwise"),
    "linear": adapters.SineAwbSpec(sine=adapters.SineSpec(modulation="linear")),
    "taps": adapters.SineAwbSpec(sine=adapters.SineSpec(lowpass="taps")),
    "taps_full": adapters.SineAwbSpec(sine=adapters.SineSpec(lowpass="taps_full")),
    "no_lowpass": adapters.SineAwbSpec(sine=adapters.SineSpec(lowpass="none")),
    "k1": adapters.SineAwbSpec(kernel_size=1),
}


def term_magnitudes(x, factors, omegas, spec, frozen=None):
  """sum |terms| of every output element of the direct form (float64 by in_float64)."""
  kernels = jnp.abs(reference_kernels(factors, omegas, spec))
  y = spec.scale * shifted_matmuls(jnp.abs(x), kernels)
  if frozen is not None:
    y = y + jnp.einsum("tbhwc,co->tbhwo", jnp.abs(x), jnp.abs(frozen[0])) + jnp.abs(frozen[1])
  return y


def assert_within_rounding(got, want, magnitude, n, what):
  """|got - want| <= 4 (sqrt(n) + 8) u sum|terms| elementwise (module docstring)."""
  err = np.abs(np.asarray(got, np.float64) - want) / (U32 * magnitude)
  worst = float(err.max())
  assert worst <= 4.0 * (np.sqrt(n) + 8.0), f"{what}: {worst:.1f} u sum|terms| (n = {n})"


def check_outputs(spec, x, factors, frozen=None):
  """Every lowering of task_path against the direct form in float64."""
  args = (x, factors, OMEGAS, frozen)
  want = in_float64(lambda x, f, om, fz: direct_form(x, f, om, spec, fz), *args)
  magnitude = in_float64(lambda x, f, om, fz: term_magnitudes(x, f, om, spec, fz), *args)
  n = spec.applied_kernel_size ** 2 * x.shape[-1] + (0 if frozen is None else x.shape[-1])
  assert_within_rounding(direct_form(*args[:3], spec, frozen), want, magnitude, n, "direct")
  for lowering in variants(spec):
    got = adapters.sine_awb_outputs(x, factors, OMEGAS, spec, lowering, frozen)
    assert_within_rounding(got, want, magnitude, n, f"{lowering}, frozen={frozen is not None}")


# C_in < C_out: the GEMM lowering stacks the taps on the input (qkv, fc1), and its kernels are
# built (k, k, C_in, C_out); C_in > C_out: on the output (fc2), built (C_in, k, k, C_out).
CHANNELS = [(C_IN, C_OUT), (C_OUT, C_IN)]


@pytest.mark.parametrize("b_rms", [1e-4, 1e-2, 1e-1])
@pytest.mark.parametrize("c_in,c_out", CHANNELS)
def test_task_path_equals_the_direct_form_at_trained_magnitudes(b_rms, c_in, c_out):
  x, factors, frozen = realistic_inputs(b_rms, c_in=c_in, c_out=c_out)
  check_outputs(SPECS["default"], x, factors)
  check_outputs(SPECS["default"], x, factors, frozen)  # fc1 / fc2: the frozen layer folds in


@pytest.mark.parametrize("name", ["depthwise", "linear", "taps", "taps_full", "no_lowpass", "k1"])
@pytest.mark.parametrize("c_in,c_out", CHANNELS)
def test_task_path_equals_the_direct_form_for_every_reading(name, c_in, c_out):
  spec = SPECS[name]
  x, factors, frozen = realistic_inputs(1e-2, k=spec.kernel_size, c_in=c_in, c_out=c_out,
                                        depthwise=spec.w_mode == "depthwise")
  check_outputs(spec, x, factors, frozen)


@pytest.mark.parametrize("c_in,c_out", CHANNELS)
def test_task_path_equals_the_direct_form_with_independent_bases(c_in, c_out):
  per_task = [realistic_inputs(1e-2, c_in=c_in, c_out=c_out, seed=s) for s in range(T)]
  factors = tuple(jnp.stack([p[1][i] for p in per_task]) for i in range(3))
  check_outputs(adapters.SineAwbSpec(independent_bases=True), per_task[0][0], factors)


@pytest.mark.parametrize("c_in,c_out", CHANNELS)
def test_task_path_gradients_equal_the_direct_form(c_in, c_out):
  """d/d(x, A, W, B, omegas, W_0, b_0) of <probe, y> for every lowering, and without the
  rematerialisation of the task path (it changes what the backward pass keeps, not its value)."""
  spec = SPECS["default"]
  x, factors, frozen = realistic_inputs(1e-2, c_in=c_in, c_out=c_out)
  probe = jax.random.normal(jax.random.key(11), (T, B, H, W, c_out))
  names = ["x", "A", "W", "B", "omegas", "W_0", "b_0"]

  def grads(fn):  # d/d(x, (A, W, B), omegas, (W_0, b_0))
    return jax.grad(lambda *args: jnp.sum(probe.astype(args[0].dtype) * fn(*args)),
                    argnums=(0, 1, 2, 3))

  for fz in (None, frozen):
    direct = grads(lambda x, f, om, fz: direct_form(x, f, om, spec, fz))
    want = jax.tree_util.tree_leaves(in_float64(direct, x, factors, OMEGAS, fz))
    direct32 = jax.tree_util.tree_leaves(direct(x, factors, jnp.asarray(OMEGAS), fz))
    lowerings = list(variants(spec)) + [adapters.TaskPathCompute(task_path_remat=False)]
    for lowering in lowerings:
      path = lambda x, f, om, fz: adapters.sine_awb_outputs(x, f, om, spec, lowering, fz)
      got = jax.tree_util.tree_leaves(grads(path)(x, factors, jnp.asarray(OMEGAS), fz))
      for name, g, d, w in zip(names, got, direct32, want, strict=False):
        assert_as_accurate(g, d, w, f"d{name}, {lowering}, frozen={fz is not None}")


def test_lowpass_site_auto_picks_the_smaller_array():
  """At 448 x 448, batch 2, 4 tasks, Swin-T: the kernels are smaller at stages 1-2, the
  activations at stages 3-4 (proj, fc1 and fc2 of each stage decide alike)."""
  spec, auto = SPECS["default"], adapters.TaskPathCompute(lowpass_site="auto")
  for stage, (grid, dim) in enumerate(((112, 96), (56, 192), (28, 384), (14, 768))):
    for c_in, c_out in ((dim, dim), (dim, 4 * dim), (4 * dim, dim)):
      kernels, inputs = (4, 3, 3, c_in, c_out), (4, 2, grid, grid, c_in)
      assert adapters.lowpass_on_activations(spec, auto, kernels, inputs) == (stage >= 2)
  for site in ("kernel", "activations"):
    fixed = adapters.TaskPathCompute(lowpass_site=site)
    assert adapters.lowpass_on_activations(spec, fixed, kernels, inputs) == (
        site == "activations")
  assert not adapters.lowpass_on_activations(SPECS["taps"], adapters.TaskPathCompute("gemm",
                                                                             "activations"),
                                             kernels, inputs)


def test_apply_kernel_lowerings_on_plain_and_odd_shapes():
  """The lowerings alone (no sine): 1x1, 3x3 and 5x5 kernels, C_in above and below C_out (both
  GEMM layouts), odd grids (Winograd pads its last tile), against shifted matmuls in float64."""
  rng = np.random.default_rng(3)
  for k, c_in, c_out, h, w in ((1, 5, 7, 4, 3), (3, 6, 11, 5, 7), (3, 11, 6, 3, 3),
                               (5, 4, 9, 6, 5)):
    x = rng.standard_normal((2, 3, h, w, c_in)).astype(np.float32)
    kernels = rng.standard_normal((2, k, k, c_in, c_out)).astype(np.float32)
    want = in_float64(shifted_matmuls, x, kernels)
    magnitude = in_float64(lambda x, k: shifted_matmuls(jnp.abs(x), jnp.abs(k)), x, kernels)
    for conv in CONVS:
      if conv == "winograd" and k == 5:
        with pytest.raises(ValueError, match="3x3"):
          adapters.prepare_task_kernels(jnp.asarray(kernels), conv)
        continue
      got = adapters.apply_task_kernels(jnp.asarray(x), jnp.asarray(kernels), conv)
      assert_within_rounding(got, want, magnitude, k * k * c_in,
                             f"{conv}, k={k}, {c_in}->{c_out}, {h}x{w}")


def test_winograd_needs_3x3_kernels_at_config_time():
  mc = base.get_config().model
  mc.compute.task_conv = "winograd"
  mc.sine_awb.lowpass = "taps_full"
  with pytest.raises(ValueError, match="winograd"):
    models.task_path_compute(mc)
  mc.sine_awb.lowpass = "matrix"
  assert models.task_path_compute(mc).task_conv == "winograd"
  mc.compute.task_conv = "fft"
  with pytest.raises(ValueError, match="task_conv"):
    models.task_path_compute(mc)


# ----------------------------------------------------------------------------- the whole model


SMALL_DEPTHS = (1, 2)


def small_config(**compute):
  """A small Swin, 2 tasks, shared by the whole-model tests (one init program): two stages (the
  decoder reads two scales), 3 blocks, the last stage with a plain block before its task block.
  Stage 1 (8 x 8 tokens) has its low-pass on the kernels, stage 2 (4 x 4) on the activations
  under lowpass_site='auto', so both sites and a patch merging are in every program; more
  stages would repeat the same layers at other sizes and only lengthen the compiles."""
  cfg = base.get_config()
  cfg.tasks, cfg.num_classes.semseg = ("semseg", "normals"), 5
  mc = cfg.model
  mc.lora.rank, mc.variant = 4, "custom"
  mc.embed_dim, mc.depths, mc.num_heads, mc.window_size = 16, SMALL_DEPTHS, (1, 2), 4
  mc.decoder.proj_channels = (18, 36)
  mc.decoder.head_channels = 32
  for field, value in compute.items():
    mc.compute[field] = value
  return cfg


SMALL_IMAGES = jax.random.normal(jax.random.key(21), (2, 32, 32, 3))


def trained_variables(model, seed=0):
  """Init, then every zero-initialised adapter weight (LoRA B, independent B, gates) moved to a
  trained magnitude (RMS 1e-2), so the task paths and the LoRA contribute to the outputs."""
  variables = jax.jit(lambda k: model.init({"params": k}, SMALL_IMAGES))(jax.random.key(seed))

  def move(path, x):
    name = jax.tree_util.keystr(path)
    if "lora_b" in name or "prompt_gate" in name:
      key = jax.random.fold_in(jax.random.key(seed + 1), zlib.crc32(name.encode()))
      return x + 1e-2 * jax.random.normal(key, x.shape)
    return x
  return {**variables, "params": jax.tree_util.tree_map_with_path(move, variables["params"])}


def relative_gap(a, b):
  leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  return max(float(jnp.abs(x - y).max() / jnp.abs(y).max()) for x, y in leaves)


def test_merged_inference_is_the_same_model():
  """merge_for_inference evaluates the task kernels (frozen linear folded in), the merged shared
  LoRA and the decoder's kernels once; the model then reads them: same outputs, no sine left.

  Tolerance 2e-6 of each output's scale (~17 ulps): the merged weights are rounded once more
  (W_0 + scale A B, the fold) and the layers pass that on; measured ~1e-6 (on a 4-stage model).
  The adapters move the outputs by > 1e-3 of their scale at these magnitudes, so a wrong or
  missing merged weight cannot hide in it."""
  cfg = small_config()
  model = models.builtin_model(cfg)
  variables = trained_variables(model)
  forward = jax.jit(lambda v: model.apply(v, SMALL_IMAGES))
  want = forward(variables)
  frozen_only = {**variables, "params": jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(p) else x,
      variables["params"])}
  assert relative_gap(forward(frozen_only), want) > 1e-3

  merged = jax.jit(lambda v: models.merge_for_inference(model, v, SMALL_IMAGES.shape))(variables)
  names = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(merged[adapters.MERGED])]
  # qkv, proj, fc1, fc2 of every block (also the last block's proj, fc1, fc2, whose shared
  # output is never read: tools/export writes every merged kernel); the task kernels of proj,
  # fc1, fc2 in the task block of each stage and the decoder's.
  assert sum(n.endswith("['kernel']") for n in names) == 4 * sum(SMALL_DEPTHS)
  assert sum(n.endswith("['task_kernels']") for n in names) == 3 * len(SMALL_DEPTHS) + 1
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, SMALL_IMAGES))(merged))
  assert "sin(" not in jaxpr and " sin " not in jaxpr
  assert relative_gap(forward(merged), want) <= 2e-6


def assert_same_training(got_loss, got, want_loss, want):
  """Loss within 2e-6; gradients within 1e-5 of the step's gradient scale (the largest entry),
  entry by entry (see test_compute_choices_leave_training_unchanged for why not per leaf)."""
  assert abs(float(got_loss) - float(want_loss)) <= 2e-6 * abs(float(want_loss))
  scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(want))
  leaves = zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want),
               strict=True)
  for (path, g), w in leaves:
    assert float(jnp.abs(g - w).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)


def test_compute_choices_leave_training_unchanged():
  """Loss and parameter gradients of a training forward (dropout and drop-path on) are the same
  under other compute choices: another lowering and low-pass site, no task-path remat, the
  tasks one after another (task_loop='scan'), Swin blocks rematerialised (which must also keep
  every random stream). The loss within 2e-6; the
  gradients within 1e-5 of the step's gradient scale (the largest entry), entry by entry
  (measured 1.1e-6): they are sums over every pixel, and leaves whose sum cancels to ~0 (the
  decoder biases before BatchNorm, the stage gates) are pure rounding noise of the terms' size,
  so a per-leaf relative tolerance would compare noise with noise."""
  variables = trained_variables(models.builtin_model(small_config()))
  # The default ('auto') puts the low-pass on the kernels in stage 1 and on the activations in
  # stage 2, so the forced 'activations' below changes the site of stage 1's layers.
  auto = adapters.TaskPathCompute(lowpass_site="auto")
  assert [adapters.lowpass_on_activations(SPECS["default"], auto, (2, 3, 3, c, c),
                                          (2, 2, g, g, c)) for g, c in ((8, 16), (4, 32))] == [
                                              False, True]

  def loss_and_grads(**compute):
    model = models.builtin_model(small_config(**compute))

    def loss(params):
      out, _ = model.apply({**variables, "params": params}, SMALL_IMAGES, train=True,
                           rngs={"dropout": jax.random.key(2), "drop_path": jax.random.key(3)},
                           mutable=["batch_stats"])
      return sum(jnp.mean(jnp.square(v)) for v in out.values())
    return jax.jit(jax.value_and_grad(loss))(variables["params"])

  want_loss, want = loss_and_grads()
  got_loss, got = loss_and_grads(task_conv="conv", lowpass_site="activations",
                                 task_path_remat=False, block_remat="blocks", task_loop="scan")
  assert_same_training(got_loss, got, want_loss, want)


def test_recompute_in_backward_recomputes_and_is_the_same_gradient():
  """layers.recompute_in_backward: the gradient of a jax.vjp (frozen args: zero cotangent, no
  gradient computed), and XLA keeps the recomputation apart from the forward pass (two sin
  ops in the compiled program, where jax.checkpoint's recomputation is merged back on CPU)."""
  def fn(x, w, table):
    return jnp.sin(x @ w) * table

  x = jax.random.normal(jax.random.key(0), (8, 16))
  w = 0.3 * jax.random.normal(jax.random.key(1), (16, 4))
  table = jax.random.normal(jax.random.key(2), (4,))
  recomputed = layers.recompute_in_backward(fn, finish_with=(1,), frozen=(2,))
  loss = lambda f: lambda *args: jnp.sum(jnp.square(f(*args)))
  got = jax.jit(jax.grad(loss(recomputed), argnums=(0, 1, 2)))(x, w, table)
  want = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(x, w, table)
  for g, v in zip(got[:2], want):
    np.testing.assert_allclose(g, v, rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(got[2]).max()) == 0.0  # frozen: no gradient
  count_sin = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1))).lower(
      x, w, table).compile().as_text().count(" sine(")
  assert count_sin(recomputed) == 2


def test_block_recompute_and_task_scan_are_the_same_gradient():
  """block_remat='recompute' runs each Swin block as a pure function whose backward pass
  recomputes it, and task_loop='scan' computes the task paths one task at a time (with their
  own recomputation, task_path_remat): loss and gradients (dropout and drop-path on) as the
  same blocks run without the block recomputation, tasks stacked (the keys are drawn by the
  backbone in both), within the tolerances of test_compute_choices_leave_training_unchanged."""
  from freesine_jax.models import swin  # pylint: disable=g-import-not-at-top
  variables = trained_variables(models.builtin_model(small_config()))

  def loss_of(model):
    return lambda params: loss(params, model)

  def loss(params, model):
    out, _ = model.apply({**variables, "params": params}, SMALL_IMAGES, train=True,
                         rngs={"dropout": jax.random.key(2), "drop_path": jax.random.key(3)},
                         mutable=["batch_stats"])
    return sum(jnp.mean(jnp.square(v)) for v in out.values())

  model = models.builtin_model(small_config(block_remat="recompute", task_loop="scan"))
  got_loss, got = jax.jit(jax.value_and_grad(loss_of(model)))(variables["params"])
  model = models.builtin_model(small_config(block_remat="recompute"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(swin, "recompute_in_backward", lambda fn, **_: fn)
    want_loss, want = jax.jit(jax.value_and_grad(loss_of(model)))(variables["params"])
  assert_same_training(got_loss, got, want_loss, want)


def test_the_last_shared_stream_is_not_computed():
  """No decoder reads the last block's shared stream: without it the task streams are the same
  and the shared LoRA of its proj and the whole shared MLP (8 matmuls) are gone."""
  model = models.builtin_model(small_config())
  variables = trained_variables(model)
  stages = lambda v, last_shared: model.apply(v, SMALL_IMAGES, method=model.backbone_stages,
                                              last_shared=last_shared)[0]
  full, lean = jax.jit(lambda v: (stages(v, True), stages(v, False)))(variables)
  assert lean[-1][0] is None and full[-1][0] is not None
  assert relative_gap([t for _, t in lean], [t for _, t in full]) <= 2e-6
  dots = lambda last_shared: str(jax.make_jaxpr(lambda v: stages(v, last_shared))(
      variables)).count("dot_general")
  assert dots(True) - dots(False) == 8


def test_tap_gather_and_sum_are_each_others_transpose():
  """gather_taps (im2col) and sum_taps carry custom VJPs (each other, offsets flipped); check
  <gather(x), g> = <x, sum_flipped(g)> and <sum(z), y> = <z, gather_flipped(y)>, and that the
  VJPs are exactly those maps."""
  rng = np.random.default_rng(5)
  for k, (h, w) in ((3, (5, 4)), (5, (3, 6))):
    x = jnp.asarray(rng.standard_normal((2, h, w, 3)))
    g = jnp.asarray(rng.standard_normal((2, h, w, k * k, 3)))
    for flip in (False, True):
      lhs = jnp.vdot(adapters.gather_taps(x, k, flip), g)
      rhs = jnp.vdot(x, adapters.sum_taps(g, k, not flip))
      np.testing.assert_allclose(float(lhs), float(rhs), rtol=1e-5)
      _, vjp = jax.vjp(lambda x: adapters.gather_taps(x, k, flip), x)
      np.testing.assert_array_equal(vjp(g)[0], adapters.sum_taps(g, k, not flip))
      _, vjp = jax.vjp(lambda z: adapters.sum_taps(z, k, flip), g)
      np.testing.assert_array_equal(vjp(x)[0], adapters.gather_taps(x, k, not flip))


@pytest.mark.parametrize("shape,size", [((7, 7), (56, 56)), ((56, 56), (448, 448)),
                                        ((14, 28), (56, 56)), ((28, 28), (28, 56)),
                                        ((5, 3), (15, 12)), ((6, 6), (9, 9))])
def test_resize_bilinear_is_jax_image_resize(shape, size):
  """The decoders' bilinear upsampling (three broadcast products per axis for integer factors)
  is jax.image.resize (align_corners=False, no antialiasing), values and gradients, in
  float64; sizes of the model's resizes at 448 and non-integer ones (jax.image.resize used)."""
  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, *shape, 3))
  cot = rng.standard_normal((2, *size, 3))
  ref = lambda z: jax.image.resize(z, (2, *size, 3), "bilinear", antialias=False)
  ours = lambda z: decoders.resize_bilinear(z, size)
  value_and_grad = lambda f: lambda z, c: (f(z), jax.grad(lambda q: jnp.vdot(f(q), c))(z))
  got, want = in_float64(value_and_grad(ours), x, cot), in_float64(value_and_grad(ref), x, cot)
  chex.assert_shape(got[0], (2, *size, 3))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-12 * np.abs(w).max())


def test_shared_decoder_base_applied_scale_by_scale():
  """ScaleProjections(features, M) = concat_i(upsample(proj_i(f_i))) . M, computed as
  sum_i upsample(proj_i(f_i) . M_i) at each scale's resolution: the Swin-T channels and the
  paper's 270 -> 1080 base at its init scale, modulated; against the direct form in float64."""
  rng = np.random.default_rng(8)
  dims, grids = (192, 384, 768, 768), (16, 8, 4, 2)
  features = [jnp.asarray(rng.standard_normal((1, g, g, d)), jnp.float32)
              for d, g in zip(dims, grids)]
  module = lambda dtype: decoders.ScaleProjections((18, 36, 72, 144), dtype)
  params = module(jnp.float32).init(jax.random.key(0), features)
  base_kernel = jax.random.normal(jax.random.key(1), (1, 1, 270, 1080)) / np.sqrt(270)
  matrix = adapters.SineSpec().kernels(base_kernel, jnp.array([0.6]))[0, 0, 0]
  direct = lambda dtype: lambda p, f, m: jnp.dot(module(dtype).apply(p, f), m)
  ours = lambda dtype: lambda p, f, m: module(dtype).apply(p, f, m)
  want = in_float64(direct(jnp.float64), params, features, matrix)
  chex.assert_shape(want, (1, 16, 16, 1080))
  # Exact: in float64 the two orders agree to float64 rounding (1e-6 float32 ulps).
  assert ulps(in_float64(ours(jnp.float64), params, features, matrix), want) <= 1e-6
  assert_as_accurate(ours(jnp.float32)(params, features, matrix),
                     direct(jnp.float32)(params, features, matrix), want, "scale by scale")
