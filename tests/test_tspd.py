"""FAAR's task-spectral pyramidal decoder (models/tspd.py): the radial grids and bands, the global
filter against numpy's FFT, its identities (Delta = 0, alpha = 0), the cross-task term in closed
form, the donors' mean, and the decoder kind in the model (count, finite gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pascal_context, synthetic
from freesine_jax.models import decoders
from freesine_jax.models import tspd
from freesine_jax.tools import count_params
from tests import test_baselines

H = W = 56  # the finest decoder scale at 448 x 448, where FAAR runs it


def test_grids():
  code = tspd.SpectralGrid.build(H, W, "code")
  freq = tspd.SpectralGrid.build(H, W, "frequency")
  assert code.bins.shape == freq.bins.shape == (H, W // 2 + 1)
  # The true grid: the DC bin is the lowest, the Nyquist corner in the edge band.
  assert freq.bins[0, 0] == 0 and freq.low[0, 0] == 1 and freq.edge[0, 0] == 0
  assert freq.low[H // 2, 0] == 0 and freq.edge[H // 2, W // 2] > 0.9999  # (r-0.8)/(0.2+1e-6)
  # FAAR's grid: r = 0 at the middle rows (the highest vertical frequencies), r = 1 at row 0
  # (the DC row) for the last column.
  assert code.low[H // 2, 0] == 1 and code.low[0, -1] == 0 and code.edge[0, -1] > 0.9999
  # Bands: torch.bucketize(r, linspace(0, 1, 17)[1:-1]) is ceil(16 r) - 1 (0 at r = 0).
  y, x = np.meshgrid(np.linspace(-1, 1, H), np.linspace(0, 1, W // 2 + 1), indexing="ij")
  r = np.sqrt(np.clip(x * x + y * y, 0, 1))
  want = np.clip(np.ceil(16 * r - 1e-12) - 1, 0, 15)
  np.testing.assert_array_equal(code.bins, want)
  with pytest.raises(ValueError, match="tspd_grid"):
    tspd.SpectralGrid.build(H, W, "centred")


def _filter_params(channels, rng, alpha=0.6, zero_delta=False):
  delta = np.zeros((tspd.BINS, channels)) if zero_delta else 0.02 * rng.standard_normal(
      (tspd.BINS, channels))
  return {"bin_delta": jnp.asarray(delta, jnp.float32),
          "ssf_scale": jnp.asarray(1 + 0.02 * rng.standard_normal(channels), jnp.float32),
          "ssf_shift": jnp.asarray(0.02 * rng.standard_normal(channels), jnp.float32),
          "alpha": jnp.asarray(alpha, jnp.float32)}


@pytest.mark.parametrize("grid", tspd.GRIDS)
def test_filter_against_numpy(grid):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, H, W, 18)).astype(np.float32)
  params = _filter_params(18, rng)
  got = tspd.SpectralFilter(grid).apply({"params": params}, jnp.asarray(x))
  g = tspd.SpectralGrid.build(H, W, grid)
  f = np.fft.rfft2(x.astype(np.float64), axes=(1, 2), norm="ortho")
  weight = 1.0 + np.asarray(params["bin_delta"], np.float64)[g.bins]  # (H, W/2+1, C)
  y = np.fft.irfft2(f * weight, s=(H, W), axes=(1, 2), norm="ortho")
  want = x + 0.6 * (y * np.asarray(params["ssf_scale"]) + np.asarray(params["ssf_shift"]))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  # Initialised as FAAR: Delta ~ N(0, 0.02), SSF ~ N(1, 0.02) / N(0, 0.02), alpha 0.6.
  init = tspd.SpectralFilter(grid).init(jax.random.key(0), jnp.asarray(x))["params"]
  assert float(init["alpha"]) == np.float32(0.6)
  assert 0.01 < float(jnp.std(init["bin_delta"])) < 0.03
  assert abs(float(jnp.mean(init["ssf_scale"])) - 1) < 0.02


def test_filter_identities():
  """Delta = 0, scale 1, shift 0: irfft2(rfft2(x)) = x, so the filter gives (1 + alpha) x;
  alpha = 0: x whatever the filter."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, H, W, 36)), jnp.float32)
  params = _filter_params(36, rng, zero_delta=True)
  params["ssf_scale"], params["ssf_shift"] = jnp.ones(36), jnp.zeros(36)
  got = tspd.SpectralFilter().apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(got), 1.6 * np.asarray(x), atol=1e-5)
  off = _filter_params(36, rng, alpha=0.0)
  np.testing.assert_array_equal(np.asarray(tspd.SpectralFilter().apply({"params": off}, x)),
                                np.asarray(x))


def test_cross_task_closed_form():
  g = tspd.SpectralGrid.build(8, 8, "frequency")
  own = np.zeros((1, 8, 5, 1), np.complex64)
  avg = np.zeros_like(own)
  own[0, 0, 1, 0], avg[0, 0, 1, 0] = 3 + 4j, 6 - 8j  # a low-band bin: |own| 5, |avg| 10
  own[0, 4, 4, 0], avg[0, 4, 4, 0] = 1 + 0j, 0 + 2j  # the Nyquist corner: edge weight ~1
  out = np.asarray(tspd.cross_task(jnp.asarray(own), jnp.asarray(avg), g, 0.0, 0.0, 1.0, 1.0))
  s_low, s_high = 0.5 * 0.5, 0.5 * 0.3  # sigmoid(0) times the caps
  np.testing.assert_allclose(out[0, 0, 1, 0], (3 + 4j) / 5 * (5 + s_low * (10 - 5)), rtol=1e-5)
  np.testing.assert_allclose(out[0, 4, 4, 0], 1 + s_high * g.edge[4, 4] * (2j - 1), rtol=1e-6)
  # The same spectrum as the donors' (gamma 1): unchanged.
  same = np.asarray(tspd.cross_task(jnp.asarray(own), jnp.asarray(own), g, 0.3, -0.2, 1.0, 1.0))
  np.testing.assert_allclose(same, own, atol=1e-5)


def test_donor_spectra_are_the_other_tasks_mean():
  rng = np.random.default_rng(2)
  branches = [[jnp.asarray(rng.standard_normal((1, 8, 8, 2)), jnp.float32)] for _ in range(3)]
  donors = tspd.donor_spectra(branches)
  spectra = [np.fft.rfft2(np.asarray(b[0]), axes=(1, 2), norm="ortho") for b in branches]
  np.testing.assert_allclose(np.asarray(donors[1][0]), (spectra[0] + spectra[2]) / 2, atol=1e-5)
  assert tspd.donor_spectra(branches[:1]) is None


def test_faar_decoder_counts_and_trains():
  """TS-PD adds per task and branch 16 C_b + 2 C_b + 1 (bins, SSF, alpha) and 4 x 4 consensus
  parameters: 18 * 270 + 4 + 16 = 4,880 per task at the 18/36/72/144 projections."""
  per_task = 18 * sum((18, 36, 72, 144)) + 4 + 16
  assert per_task == 4_880
  r = 16
  faar = test_baselines.trainable(f"faar,r{r}")[0]
  config = synthetic.get_config("tiny,faar")
  assert config.model.decoder.kind == "tspd"
  # Without TS-PD (independent heads) the same config counts T x 4,880 fewer.
  plain = pascal_context.get_config(f"faar,r{r}")
  plain.model.decoder.kind = "independent"
  assert faar - count_params.count(count_params.variable_shapes(plain)["params"]) == (
      test_baselines.T * per_task)
  # The decoder's loss has finite gradients everywhere, every TS-PD one non-zero (|.| of a zero
  # spectrum bin outside the low band included).
  decoder = decoders.MultiTaskDecoder(("semseg", "sal"), {"semseg": 5, "sal": 1},
                                      decoders.DecoderSpec(kind="tspd", head_channels=16))
  keys = jax.random.split(jax.random.key(0), 8)
  features = {task: [jax.random.normal(keys[4 * i + j], (2, 16 >> j, 16 >> j, 24))
                     for j in range(4)] for i, task in enumerate(("semseg", "sal"))}
  variables = decoder.init(jax.random.key(1), features, None, (32, 32), train=False)

  def loss(params):
    out = decoder.apply({**variables, "params": params}, features, None, (32, 32), train=False)
    return sum(jnp.mean(v ** 2) for v in out.values())

  grads = jax.grad(loss)(variables["params"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
  spectral = [g for p, g in jax.tree_util.tree_leaves_with_path(grads)
              if "spectral" in jax.tree_util.keystr(p)]
  assert len(spectral) == 2 * (4 * 4 + 4) and all(float(jnp.abs(g).max()) > 0 for g in spectral)
