"""Is the frequency switching switching? `python -m freesine_jax.tools.analyze --workdir=<run>`.

Reads the run's latest checkpoint (or --step) and its metrics.jsonl and writes to --out (default
<workdir>/analysis):

  analysis.json     per Sine-AWB layer (encoder and the decoder group's shared base): how far
                    each task's kernel is from its linear counterpart, numerical ranks of the base
                    and of each task's kernel, and how correlated the tasks' kernels are
                    (schema: docs/analysis.md); for a run with FAAR's rank selection
                    (config.train.pdrs), the LoRA ranks it kept per layer and task
  spectra.png       singular values of the base vs each task's kernel (centre tap), per layer
  correlations.png  task-by-task |Pearson correlation| of the kernels, per layer
  frequencies.png   the task frequencies over training, from metrics.jsonl

Everything is computed from the trained parameters with the model's own kernel code
(adapters.sine_awb_kernels / SineSpec.kernel), then in float64 numpy.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Mapping, Sequence

from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from freesine_jax import checkpointing
from freesine_jax import cli
from freesine_jax import errors
from freesine_jax import models
from freesine_jax import pdrs
from freesine_jax.models import adapters

RANK_RTOL = 1e-3  # numerical rank: singular values >= RANK_RTOL * the largest (float64 SVD)
FREQUENCY_KEY = "train/frequency/"  # metrics.jsonl keys written by train.py


@dataclasses.dataclass
class Layer:
  """One Sine-AWB layer's trained base and its task kernels, as the model applies them."""
  name: str
  kind: str                # 'encoder' | 'decoder'
  base: np.ndarray         # (k, k, C_in, C_out), or (T, k, k, C_in, C_out) for per-task bases
  kernels: np.ndarray      # (T, k', k', C_in, C_out): K_t
  linear: np.ndarray       # (T, k', k', C_in, C_out): L_t, the sine replaced by its argument


# ----------------------------------------------------------------------------- statistics


def centre_tap(kernel: np.ndarray) -> np.ndarray:
  """The (C_in, C_out) matrix of the centre tap of a (k, k, C_in, C_out) kernel."""
  k = kernel.shape[0]
  return np.asarray(kernel[k // 2, k // 2], np.float64)


def numerical_rank(matrix: np.ndarray, rtol: float = RANK_RTOL) -> int:
  s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
  return int(np.sum(s >= rtol * s[0])) if s.size and s[0] > 0 else 0


def nonlinearity(kernels: np.ndarray, linear: np.ndarray) -> float:
  """Median over tasks of ||K_t - L_t||_F / ||L_t||_F (nan if every L_t is zero)."""
  ratios = []
  for k, l in zip(np.asarray(kernels, np.float64), np.asarray(linear, np.float64)):
    norm = np.linalg.norm(l)
    if norm > 0:
      ratios.append(np.linalg.norm(k - l) / norm)
  return float(np.median(ratios)) if ratios else float("nan")


def correlation_matrix(kernels: np.ndarray) -> np.ndarray:
  """(T, T) Pearson correlations of the tasks' flattened kernels (float64)."""
  flat = np.asarray(kernels, np.float64).reshape(len(kernels), -1)
  flat = flat - flat.mean(axis=1, keepdims=True)
  norms = np.linalg.norm(flat, axis=1)
  safe = np.where(norms > 0, norms, 1.0)
  unit = flat / safe[:, None]
  corr = unit @ unit.T
  corr[norms == 0, :] = np.nan
  corr[:, norms == 0] = np.nan
  return corr


def max_offdiagonal(corr: np.ndarray) -> float:
  """The largest |correlation| between two different tasks (nan for a single task)."""
  t = corr.shape[0]
  if t < 2:
    return float("nan")
  off = np.abs(corr[~np.eye(t, dtype=bool)])
  return float(np.nanmax(off)) if np.isfinite(off).any() else float("nan")


def layer_stats(layer: Layer, tasks: Sequence[str]) -> dict:
  """The analysis.json entry of one layer (docs/analysis.md)."""
  bases = layer.base if layer.base.ndim == 5 else layer.base[None]
  return {
      "name": layer.name,
      "kind": layer.kind,
      "nonlinearity": nonlinearity(layer.kernels, layer.linear),
      # Per-task bases (the "independent bases" ablation): the largest of their ranks.
      "rank_base": max(numerical_rank(centre_tap(b)) for b in bases),
      "rank_task": {t: numerical_rank(centre_tap(k)) for t, k in zip(tasks, layer.kernels)},
      "task_correlation": max_offdiagonal(correlation_matrix(layer.kernels)),
      "task_correlation_linear": max_offdiagonal(correlation_matrix(layer.linear)),
      "base_rms": float(np.sqrt(np.mean(np.square(np.asarray(bases, np.float64))))),
  }


def summarize(entries: Iterable[dict], tasks: Sequence[str]) -> dict:
  """Per kind: medians over layers (what the acceptance reads: the median encoder layer)."""
  summary = {}
  for kind in ("encoder", "decoder"):
    rows = [e for e in entries if e["kind"] == kind]
    if not rows:
      continue
    median = lambda xs: float(np.nanmedian(np.asarray(xs, np.float64)))
    summary[kind] = {
        "layers": len(rows),
        "nonlinearity": median([e["nonlinearity"] for e in rows]),
        "rank_base": median([e["rank_base"] for e in rows]),
        "rank_task": {t: median([e["rank_task"][t] for e in rows]) for t in tasks},
        "rank_gain_layers": sum(all(r > e["rank_base"] for r in e["rank_task"].values())
                                for e in rows),
        "task_correlation": median([e["task_correlation"] for e in rows]),
        "task_correlation_linear": median([e["task_correlation_linear"] for e in rows]),
    }
  return summary


# ----------------------------------------------------------------------------- from a model


def sine_awb_layers(params: Mapping, config: ml_collections.ConfigDict,
                    omegas: jax.Array) -> list[Layer]:
  """Every Sine-AWB layer of a trained model (encoder task paths and the shared decoder base)."""
  mc = config.model
  tasks = tuple(config.tasks)
  flat = traverse_util.flatten_dict(params)
  layers = []
  spec = models.adapter_spec(mc, len(tasks)).task_path
  if isinstance(spec, adapters.SineAwbSpec):
    for path in sorted(p for p in flat if len(p) >= 2 and p[-2:] == ("sine_awb", "w")):
      owner = path[:-2]  # the AdaptedDense holding the shared LoRA
      if spec.independent_bases:
        a, b = flat[path[:-1] + ("a",)], flat[path[:-1] + ("b",)]
      else:
        a, b = flat[owner + ("lora_a",)], flat[owner + ("lora_b",)]
      w = flat[path]
      base = (jax.vmap(adapters.fuse_awb)(a, w, b) if spec.independent_bases
              else adapters.fuse_awb(a, w, b))
      layers.append(Layer(
          name="/".join(owner), kind="encoder", base=np.asarray(base),
          kernels=np.asarray(spec.scale * adapters.sine_awb_kernels(a, w, b, omegas, spec)),
          linear=np.asarray(spec.scale * adapters.sine_awb_kernels(a, w, b, omegas, spec,
                                                                   "linear"))))
  base_path = ("head", "base_kernel")
  if base_path in flat:
    decoder = models.decoder_spec(mc)
    base = flat[base_path]
    layers.append(Layer(
        name="head/base_kernel", kind="decoder", base=np.asarray(base),
        kernels=np.asarray(jax.vmap(lambda om: decoder.sine.kernel(base, om))(omegas)),
        linear=np.asarray(jax.vmap(lambda om: decoder.sine.kernel(base, om, "linear"))(omegas))))
  return layers


def frequencies_of(params: Mapping, config: ml_collections.ConfigDict) -> np.ndarray | None:
  """The task frequencies omega_t; None for a baseline (no task frequencies)."""
  model = models.builtin_model(config)
  omegas = model.apply({"params": params}, method=model.frequencies)
  return None if omegas is None else np.asarray(omegas)


def frequency_history(metrics_path: str, tasks: Sequence[str]) -> dict[str, list]:
  """{'step': [...], task: [...]} from the run's metrics.jsonl (empty lists if none logged)."""
  history = {"step": [], **{t: [] for t in tasks}}
  if not os.path.exists(metrics_path):
    return history
  with open(metrics_path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a crash
      if all(f"{FREQUENCY_KEY}{t}" in row for t in tasks):
        history["step"].append(int(row["step"]))
        for t in tasks:
          history[t].append(row[f"{FREQUENCY_KEY}{t}"])
  return history


def rank_selection(params: Mapping, saved_opt_state) -> dict | None:
  """FAAR's ranks as the run's rank selection left them (pdrs.py): per LoRA pair the ranks
  kept (a list per task for a task LoRA), and the LoRA parameters built and kept; None for a
  run without it."""
  ranks = pdrs.saved_ranks(saved_opt_state)
  if ranks is None:
    return None
  built, kept = pdrs.trained_count(params, ranks)
  return {"kept_ranks": pdrs.kept_ranks(ranks), "lora_params_built": built,
          "lora_params_kept": kept}


def analyze(params: Mapping, config: ml_collections.ConfigDict, step: int,
            metrics_path: str | None = None, saved_opt_state=None
            ) -> tuple[dict, list[Layer], dict]:
  """(analysis.json content, the layers, the frequency history)."""
  tasks = tuple(config.tasks)
  omegas = frequencies_of(params, config)
  layers = [] if omegas is None else sine_awb_layers(params, config, jnp.asarray(omegas))
  entries = [layer_stats(layer, tasks) for layer in layers]
  result = {
      "step": int(step),
      "frequencies": {} if omegas is None else {t: float(o) for t, o in zip(tasks, omegas)},
      "omega_0": {"encoder": float(config.model.sine_awb.omega_0),
                  "decoder": float(config.model.decoder.omega_0)},
      "rank_rtol": RANK_RTOL,
      "layers": entries,
      "summary": summarize(entries, tasks),
  }
  ranks = rank_selection(params, saved_opt_state)
  if ranks is not None:
    result["rank_selection"] = ranks
  history = frequency_history(metrics_path, tasks) if metrics_path else {"step": []}
  return result, layers, history


# ----------------------------------------------------------------------------- plots


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _grid(n: int) -> tuple[int, int]:
  cols = min(n, 4)
  return (n + cols - 1) // cols, cols


def plot_spectra(layers: Sequence[Layer], tasks: Sequence[str], path: str) -> None:
  plt = _pyplot()
  rows, cols = _grid(len(layers))
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for ax, layer in zip(axes.flat, layers):
    bases = layer.base if layer.base.ndim == 5 else layer.base[None]
    s = np.linalg.svd(centre_tap(bases[0]), compute_uv=False)
    ax.semilogy(np.maximum(s / max(s[0], 1e-300), 1e-12), "k-", lw=2, label="base")
    for task, kernel in zip(tasks, layer.kernels):
      s = np.linalg.svd(centre_tap(kernel), compute_uv=False)
      ax.semilogy(np.maximum(s / max(s[0], 1e-300), 1e-12), lw=1, label=task)
    ax.axhline(RANK_RTOL, color="grey", ls=":", lw=1)
    ax.set_title(layer.name.replace("backbone/", ""), fontsize=8)
    ax.set_xlabel("index", fontsize=7)
    ax.set_ylim(1e-7, 2)
  for ax in list(axes.flat)[len(layers):]:
    ax.axis("off")
  axes.flat[0].set_ylabel("singular value / largest", fontsize=7)
  axes.flat[0].legend(fontsize=6)
  fig.suptitle("centre-tap singular values: shared base vs each task's kernel "
               f"(dotted: rank threshold {RANK_RTOL:g})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_correlations(layers: Sequence[Layer], tasks: Sequence[str], path: str) -> None:
  plt = _pyplot()
  rows, cols = _grid(len(layers))
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
  image = None
  for ax, layer in zip(axes.flat, layers):
    image = ax.imshow(np.abs(correlation_matrix(layer.kernels)), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=6)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=6)
    ax.set_title(layer.name.replace("backbone/", ""), fontsize=8)
  for ax in list(axes.flat)[len(layers):]:
    ax.axis("off")
  if image is not None:
    fig.colorbar(image, ax=axes, shrink=0.6, label="|Pearson correlation| of task kernels")
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_frequencies(history: Mapping[str, list], tasks: Sequence[str], path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for task in tasks:
    ax.plot(history["step"], history[task], label=task)
  ax.set_xlabel("step")
  ax.set_ylabel("ω_t (Clock Net output)")
  ax.set_title("task frequencies over training")
  if history["step"]:
    ax.legend(fontsize=7)
  else:
    ax.text(0.5, 0.5, "no frequencies in metrics.jsonl", ha="center", transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ----------------------------------------------------------------------------- command line


def load_saved(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict,
                                                                   int]:
  """(config, saved TrainState as nested dicts, step) of a run's checkpoint
  (checkpointing.load_saved_run), refusing a config.model.factory model in one line."""
  config, saved, step = checkpointing.load_saved_run(workdir, step)
  if config.model.factory:
    raise errors.UserError(
        f"{workdir} trains config.model.factory={config.model.factory!r}, not a Free "
        "Sinewich model: there are no Sine-AWB layers or task frequencies to analyse")
  return config, saved, step


def load_run(workdir: str, step: int | None = None):
  """(config, params, step) of a run's checkpoint; a one-line UserError if it has none."""
  config, saved, step = load_saved(workdir, step)
  return config, saved["params"], step


def _fmt(x) -> str:
  return "nan" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.3f}"


def report(result: Mapping) -> str:
  lines = [f"step {result['step']}: frequencies " +
           (", ".join(f"{t} {o:.3f}" for t, o in result["frequencies"].items()) or
            "none (a baseline without task frequencies)")]
  if result["layers"]:
    lines.append(f"{'layer':<40} {'kind':<8} {'nonlin':>7} {'rank base':>9} "
                 f"{'rank task (min)':>15} {'corr':>6} {'corr lin':>8}")
  for e in result["layers"]:
    lines.append(f"{e['name'].replace('backbone/', ''):<40} {e['kind']:<8} "
                 f"{_fmt(e['nonlinearity']):>7} {e['rank_base']:>9d} "
                 f"{min(e['rank_task'].values()):>15d} {_fmt(e['task_correlation']):>6} "
                 f"{_fmt(e['task_correlation_linear']):>8}")
  ranks = result.get("rank_selection")
  if ranks:
    lines.append(f"rank selection (FAAR): {ranks['lora_params_kept']:,} of "
                 f"{ranks['lora_params_built']:,} LoRA parameters kept; ranks kept per layer:")
    for name, cap in ranks["kept_ranks"].items():
      lines.append(f"  {name.replace('backbone/', ''):<52} {cap}")
  for kind, s in result["summary"].items():
    lines.append(f"median {kind} layer: nonlinearity {_fmt(s['nonlinearity'])}, rank base "
                 f"{s['rank_base']:g} -> task {min(s['rank_task'].values()):g}..."
                 f"{max(s['rank_task'].values()):g}, task correlation "
                 f"{_fmt(s['task_correlation'])} (linear {_fmt(s['task_correlation_linear'])}); "
                 f"{s['rank_gain_layers']}/{s['layers']} layers raise every task's rank")
  return "\n".join(lines)


def define_flags() -> None:
  cli.define_run_flags("analyse")
  flags.DEFINE_string("out", None, "Output directory (default: <workdir>/analysis).")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  f = flags.FLAGS
  config, saved, step = load_saved(f.workdir, f.step)
  params = saved["params"]
  out = f.out or os.path.join(f.workdir, "analysis")
  os.makedirs(out, exist_ok=True)
  result, layers, history = analyze(params, config, step,
                                    os.path.join(f.workdir, "metrics.jsonl"),
                                    saved.get("opt_state"))
  with open(os.path.join(out, "analysis.json"), "w", encoding="utf-8") as fh:
    json.dump(result, fh, indent=2, allow_nan=True)
  tasks = tuple(config.tasks)
  if layers:
    plot_spectra(layers, tasks, os.path.join(out, "spectra.png"))
    plot_correlations(layers, tasks, os.path.join(out, "correlations.png"))
  plot_frequencies(history, tasks, os.path.join(out, "frequencies.png"))
  print(report(result))
  print(f"wrote {out}/analysis.json and plots")


def run():
  cli.run("freesine_jax.tools.analyze", define_flags, main)


if __name__ == "__main__":
  run()
