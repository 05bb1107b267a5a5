"""Speed, FLOPs and memory of the training and evaluation steps, as ratios measured in one run.

  python -m benchmarks.run            # every case at 448 and 224, writes docs/benchmarks.md
  python -m benchmarks.run --quick    # 2 timed repetitions instead of 5 (a smoke run)
  python -m benchmarks.run --sizes=224,448=free_sinewich+swin --out=/tmp/bench.md
  python -m benchmarks.run --json=/tmp/b.json ...; python -m benchmarks.run --resume=/tmp/b.json
                                      # an interrupted run continued: only what it lacks

Each measurement runs in its own Python process (so its peak resident memory, VmHWM, is its
own, and no compiled program or buffer of another case is kept around): the PASCAL-Context
model (4 tasks, Swin-T, random weights, float32, batch 2) for every row of CASES, at each size:
  - the train step (train.build_train_step, state donated as in training): lower + compile time,
    XLA's cost-analysis FLOPs and memory analysis, median step time over the repetitions after
    one warm-up step, achieved FLOP/s and its ratio to the dense GEMM roof;
  - the eval forward on weights merged for inference (evaluate.make_inference_merge), the same.
Then Swin-T alone (forward, and forward + backward of the sum of the stage outputs) against the
project's PyTorch reference Swin (tests/torch_swin_reference.py, optional torch extra), and
the input pipeline's examples/s against what the train step consumes.

The dense-GEMM roof (a 2048^3 float32 matmul) is measured at the start and at the end; the load
average is recorded before every case. The machine is shared: compare ratios, not seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2.0 ** 30
sys.path.insert(0, ROOT)
from benchmarks.timing import GEMM_N, measure_gemm, timed  # noqa: E402  pylint: disable=g-import-not-at-top,line-too-long
from configs import common  # noqa: E402  pylint: disable=g-import-not-at-top


@dataclasses.dataclass(frozen=True)
class Case:
  """One model configuration: a PASCAL-Context config arg plus config overrides."""
  name: str
  arg: str
  overrides: tuple[tuple[str, Any], ...] = ()
  note: str = ""
  kinds: tuple[str, ...] = ("eval", "train")  # cheaper first
  sizes: tuple[int, ...] | None = None  # None: every --sizes
  op_profile: bool = False  # also trace one train step op by op (benchmarks/op_profile.py)


FULL_FINE_TUNING = (("model.trainable_backbone", "all"), ("model.lora.rank", 0),
                    ("model.task_path", "none"), ("model.prompts", False),
                    ("model.clock_net", False), ("model.decoder.kind", "independent"))

# The compute choices that trade recomputation for memory (docs/method.md, Memory): what the
# real-data configs use for Free Sinewich since 2026-12-04 (configs/common.py LEAN_COMPUTE).
LEAN_MEMORY = tuple((f"model.compute.{k}", v) for k, v in common.LEAN_COMPUTE.items())
# The other cases keep configs/base.py's choices, with which they were measured.
STACKED = (("model.compute.block_remat", "none"), ("model.compute.task_loop", "stacked"))
# One line per case. A case whose config arg the config file does not (yet) accept is skipped
# with the reason recorded (e.g. the MTLoRA baseline config).
CASES = (
    Case("free_sinewich", "r64", STACKED, op_profile=True,
         note="Free Sinewich r64, full W (r x r x 3 x 3); block_remat='none', task_loop='stacked'"),
    Case("depthwise", "r64,depthwise", STACKED,
         note="Free Sinewich r64, depthwise W (r x 3 x 3)"),
    Case("k1", "r64", STACKED + (("model.sine_awb.kernel_size", 1),),
         note="Free Sinewich r64, k = 1"),
    Case("mtlora", "mtlora,r64", STACKED, op_profile=True, note="MTLoRA r64 baseline config"),
    Case("full_ft", "r64", STACKED + FULL_FINE_TUNING,
         note="full fine-tuning: all of Swin-T trained, per-task decoders, no adapters"),
    # Compute choices (model.compute), each against free_sinewich above.
    Case("winograd", "r64", STACKED + (("model.compute.task_conv", "winograd"),),
         kinds=("eval",),
         note="free_sinewich, task kernels applied by Winograd F(2x2, 3x3)"),
    Case("conv", "r64", STACKED + (("model.compute.task_conv", "conv"),), sizes=(224,),
         note="free_sinewich, task kernels as one grouped convolution (TPU/GPU choice)"),
    Case("no_task_remat", "r64", STACKED + (("model.compute.task_path_remat", False),),
         kinds=("train",), sizes=(224,),
         note="free_sinewich, task kernels kept for the backward pass"),
    Case("block_remat", "r64", STACKED + (("model.compute.block_remat", "blocks"),),
         kinds=("train",),
         note="free_sinewich, every Swin block recomputed in the backward pass (nn.remat)"),
    Case("block_recompute", "r64", STACKED + (("model.compute.block_remat", "recompute"),),
         kinds=("train",), note="free_sinewich, every Swin block recomputed in the backward "
         "pass, tied to its output's cotangent (layers.recompute_in_backward)"),
    Case("lean_memory", "r64", LEAN_MEMORY, kinds=("train",),
         note="the paper's config (configs/pascal_context.py:r64): free_sinewich with "
         "block_remat='recompute' and the task paths one task at a time (task_loop='scan'); "
         "XLA's cost analysis counts a scanned loop body once, so its GFLOP and % of roof "
         "columns undercount (the maths is block_recompute's)"),
)
BATCH = 2


# ----------------------------------------------------------------------------- measurements
# (run in the child processes)


def peak_resident_gib() -> float:
  """VmHWM: this process's peak resident set so far."""
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024 / GIB
  return float("nan")


def resident_gib() -> float:
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024 / GIB
  return float("nan")


def reset_peak_resident() -> None:
  """Restarts VmHWM at the current resident set (Linux clear_refs 5), so the peak read next is
  that of what runs from now on (the steps), not of the compilation before."""
  with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
    f.write("5")


def timed_beside_roof(fn: Callable[[], Any], reps: int) -> dict[str, Any]:
  """{times: timed(fn, reps), roof_before/roof_after: the dense-GEMM FLOP/s measured in this
  process right before and right after}: the shared machine's load changes over a run of
  hours, so each case's % of the roof is taken against the roof measured beside it."""
  before = measure_gemm(0)["flops_per_s"]
  times = timed(fn, reps)
  return {"times": times, "roof_before": before, "roof_after": measure_gemm(0)["flops_per_s"]}


def compiled_stats(compiled) -> dict[str, float]:
  """XLA's cost analysis (FLOPs) and memory analysis of a compiled program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  stats = {"flops": float(cost.get("flops", float("nan")))}
  for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                "alias_size_in_bytes", "generated_code_size_in_bytes"):
    stats[field.replace("_size_in_bytes", "_gib")] = getattr(memory, field, 0) / GIB
  return stats


def lower_and_compile(lower: Callable[[], Any], compiler_options: dict | None = None
                      ) -> tuple[Any, dict[str, float]]:
  """The compiled program and {compile_s (tracing + lowering + XLA), lower_s (tracing +
  lowering alone), hlo_ops (StableHLO ops of the lowered program: the graph size)};
  compiler_options: XLA options of this compilation only."""
  start = time.perf_counter()
  lowered = lower()
  lower_s = time.perf_counter() - start
  compiled = lowered.compile(compiler_options=compiler_options or None)
  compile_s = time.perf_counter() - start
  ops = sum(1 for line in lowered.as_text().splitlines() if " = " in line
            and not line.lstrip().startswith("#"))
  return compiled, {"compile_s": compile_s, "lower_s": lower_s, "hlo_ops": ops}


def release_after_compile() -> dict[str, float]:
  """Resident GiB after the compilation, then after giving glibc's freed heap back to the OS
  (distributed.release_freed_host_memory, as the training loop does after its first step)."""
  from freesine_jax import distributed  # pylint: disable=g-import-not-at-top
  kept = resident_gib()
  distributed.release_freed_host_memory()
  return {"resident_compiled_gib": kept, "resident_released_gib": resident_gib()}


def case_config(case: Case, size: int):
  """The case's PASCAL-Context config at size x size, batch BATCH, random weights."""
  from configs import pascal_context  # pylint: disable=g-import-not-at-top
  config = pascal_context.get_config(case.arg)
  for key, value in case.overrides:
    section = config
    *parents, leaf = key.split(".")
    for parent in parents:
      section = section[parent]
    section[leaf] = value
  config.dataset.image_size = (size, size)
  config.input.batch_size = config.input.eval_batch_size = BATCH
  config.model.backbone_weights = ""
  return config


def random_batch(config, with_labels: bool):
  """A batch of BATCH random images (and labels of every task) at the config's size."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from freesine_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  h, w = config.dataset.image_size
  batch = {"image": jnp.asarray(rng.standard_normal((BATCH, h, w, 3)), jnp.float32)}
  if with_labels:
    for task in config.tasks:
      spec = tasks_lib.get_task(task)
      classes = config.num_classes[task] if task in config.num_classes else None
      dtype = np.dtype(spec.kind.label.batch_dtype)
      if np.issubdtype(dtype, np.integer):
        label = rng.integers(0, max(classes or 2, 2), (BATCH, h, w))
      else:  # unit vectors (B, H, W, 3) or positive values (B, H, W), as the task stores them
        label = rng.standard_normal((BATCH, *spec.kind.label.shape(h, w)))
        if spec.kind.label.channels:
          label = label / np.linalg.norm(label, axis=-1, keepdims=True)
        else:
          label = np.abs(label) + 0.1
      batch[task] = jnp.asarray(label.astype(dtype))
  return batch


@dataclasses.dataclass
class TrainCase:
  """What a train-step measurement needs, built as the training loop builds it."""
  config: Any
  model: Any
  tx: Any
  state: Any
  backbone: Any
  batch: dict[str, Any]
  step: Any  # train.make_train_step's jitted step (state donated)


def build_train_case(config) -> TrainCase:
  """The case's model, optimizer, sharded state and backbone, a random batch and the step."""
  from freesine_jax import modeling  # pylint: disable=g-import-not-at-top
  from freesine_jax import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from freesine_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from freesine_jax import train  # pylint: disable=g-import-not-at-top
  model = modeling.build_model(config)
  variables = modeling.init_variables(model, config)
  schedule = optimizer_lib.make_schedule(1e-4, 1e-6, 1e-6, 10, 100)
  setup = train.build_train_step(  # as the training loop builds it
      config, model, variables, schedule, donate_state=True)
  del variables
  batch = sharding_lib.shard_batch(random_batch(config, True), setup.mesh,
                                   ("image",) + tuple(config.tasks))
  return TrainCase(config, model, setup.tx, setup.state, setup.backbone, batch,
                   setup.train_step)


def run_train(case: Case, size: int, reps: int) -> dict[str, Any]:
  from freesine_jax import modeling  # pylint: disable=g-import-not-at-top
  built = build_train_case(case_config(case, size))
  state, backbone, batch, step = built.state, built.backbone, built.batch, built.step
  del built
  resident_before = resident_gib()
  compiled, timings = lower_and_compile(lambda: step.lower(state, batch, backbone))
  stats = compiled_stats(compiled)
  compile_peak = peak_resident_gib()
  memory = release_after_compile()
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch, backbone)
    return metrics["loss"]
  reset_peak_resident()
  timing = timed_beside_roof(one_step, reps)
  out = {**timings, **timing, "resident_before_gib": resident_before,
         "peak_resident_gib": peak_resident_gib(), "compile_peak_gib": compile_peak, **stats,
         **memory, "trainable": modeling.count_parameters(holder["state"].params)}
  if case.op_profile:  # after the timed steps and the peak reading: one more step, traced
    from benchmarks import op_profile  # pylint: disable=g-import-not-at-top
    out["op_profile"] = op_profile.as_json(op_profile.profile_ops(
        one_step, compiled.as_text(), 1, group=op_profile.train_group))
  return out


def run_eval(case: Case, size: int, reps: int) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from freesine_jax import evaluate  # pylint: disable=g-import-not-at-top
  from freesine_jax import modeling  # pylint: disable=g-import-not-at-top
  config = case_config(case, size)
  model = modeling.build_model(config)
  variables = modeling.init_variables(model, config)
  images = random_batch(config, False)["image"]
  forward = evaluate.make_eval_forward(model)
  merge = evaluate.make_inference_merge(model)
  unmerged = forward.lower(variables, images).cost_analysis()  # HLO cost analysis, no compile
  unmerged = unmerged[0] if isinstance(unmerged, (list, tuple)) else unmerged
  if merge is not None:
    variables = jax.block_until_ready(merge(variables, image_shape=(1, size, size, 3)))
  resident_before = resident_gib()
  compiled, timings = lower_and_compile(lambda: forward.lower(variables, images))
  stats = compiled_stats(compiled)
  compile_peak = peak_resident_gib()
  memory = release_after_compile()
  reset_peak_resident()
  timing = timed_beside_roof(lambda: compiled(variables, images), reps)
  return {**timings, **timing, "resident_before_gib": resident_before,
          "peak_resident_gib": peak_resident_gib(), "compile_peak_gib": compile_peak, **stats,
          **memory, "unmerged_flops": float(unmerged["flops"])}


def run_swin(size: int, reps: int) -> dict[str, Any]:
  """Our Swin-T (no adapters) against the PyTorch reference Swin-T: forward and backward."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import op_profile  # pylint: disable=g-import-not-at-top
  forward, (params, images) = op_profile.swin_forward(size, BATCH)
  backbone = op_profile.swin_backbone()
  features = lambda p, x: sum(jnp.sum(shared) for shared, _ in backbone.apply(p, x))
  backward = jax.jit(jax.grad(features)).lower(params, images).compile()
  out = {"jax_forward": {**timed_beside_roof(lambda: forward(params, images), reps),
                         **compiled_stats(forward)},
         "jax_backward": {**timed_beside_roof(lambda: backward(params, images), reps),
                          **compiled_stats(backward)}}
  # Where the forward's time goes, and its linear layers' GEMMs alone at their shapes.
  profile = op_profile.profile_ops(lambda: forward(params, images), forward.as_text(), reps)
  out["op_profile"] = {**op_profile.as_json(profile),
                       "linear_alone": op_profile.linear_alone(profile, reps),
                       "roof": measure_gemm(reps)["flops_per_s"]}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  except ImportError:
    out["torch"] = "torch is not installed (pip install '.[torch]')"
    return out
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import torch_swin_reference as ref  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  model = ref.randomize(ref.SwinReference(img_size=size))
  x = torch.randn(BATCH, 3, size, size)

  def torch_forward():
    with torch.no_grad():
      return model.stages(x)

  def torch_backward():
    model.zero_grad(set_to_none=True)
    sum(s.sum() for s in model.stages(x)).backward()

  counts = {}
  for name, fn in (("forward", torch_forward), ("backward", torch_backward)):
    with FlopCounterMode(display=False) as counter:
      fn()
    counts[name] = float(counter.get_total_flops())
  out["torch_forward"] = {"times": timed(torch_forward, reps), "flops": counts["forward"]}
  out["torch_backward"] = {"times": timed(torch_backward, reps), "flops": counts["backward"]}
  out["torch_version"] = torch.__version__
  return out


def run_pipeline(size: int, reps: int) -> dict[str, Any]:
  """Examples/s of the train input pipeline (augmentation + batching, PASCAL-Context tasks) on
  decoded 375 x 500 synthetic scenes held in memory (decoding from disk excluded)."""
  from freesine_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from freesine_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  config = case_config(CASES[0], size)
  config.input.num_workers = 0
  source = [synthetic.generate_example(0, "train", i, 375, 500) for i in range(16)]
  loader = iter(pipeline.create_train_loader(config, data_source=source))
  next(loader)
  batches = 5 * reps
  start = time.perf_counter()
  for _ in range(batches):
    next(loader)
  seconds = time.perf_counter() - start
  return {"examples_per_s": batches * BATCH / seconds, "workers": 0}


def child(kind: str, case_name: str, size: int, reps: int) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  if kind == "gemm":
    return measure_gemm(reps)
  if kind == "swin":
    return run_swin(size, reps)
  if kind == "pipeline":
    return run_pipeline(size, reps)
  case = {c.name: c for c in CASES}[case_name]
  return (run_train if kind == "train" else run_eval)(case, size, reps)


# ----------------------------------------------------------------------------- orchestration


def load_average() -> float:
  return os.getloadavg()[0]


def spawn(kind: str, case: str, size: int, reps: int) -> dict[str, Any]:
  """Runs one measurement in a fresh process; its result (or its error) plus the load."""
  load = load_average()
  cmd = [sys.executable, "-m", "benchmarks.run", "--child", kind, case, str(size), str(reps)]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  print(f"[{time.strftime('%H:%M:%S')}] {kind} {case} {size} (load {load:.2f})", flush=True)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    said = [l for l in proc.stderr.splitlines() if l.strip().strip("*")]
    error = f"exit code {proc.returncode}" + (" (killed: out of memory?)"
                                              if proc.returncode == -9 else "")
    if said:
      error += f": {said[-1].strip()[:200]}"
    print(f"  failed: {error}", flush=True)
    return {"error": error, "load": load}
  result = json.loads(lines[-1][len("RESULT "):])
  result["load"] = load
  return result


def config_available(case: Case) -> str | None:
  """None if the case's config builds, else why not (the case is then skipped)."""
  try:
    case_config(case, 224)
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return None


def machine() -> dict[str, str]:
  model = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    model = names[0] if names else model
  except OSError:
    pass
  with open("/proc/meminfo", encoding="utf-8") as f:
    total = int(f.readline().split()[1]) * 1024 / GIB
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {"cpu": model, "cores": str(os.cpu_count()), "ram": f"{total:.1f} GiB",
          "platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "device": str(jax.devices()[0].platform)}


def median(result: dict[str, Any]) -> float:
  return statistics.median(result["times"])


def case_roof(r: dict[str, Any], run_roof: float) -> tuple[float, bool]:
  """(roof, steady) for a measurement: the mean of the GEMM FLOP/s measured beside it (in its
  process, right before and after its timed steps) and whether those two agree within 20 %;
  a result without them (an older run) falls back to the run's roof, never judged steady."""
  if "roof_before" in r and "roof_after" in r:
    a, b = r["roof_before"], r["roof_after"]
    return (a + b) / 2, abs(a - b) <= 0.2 * max(a, b)
  return run_roof, False


def fmt(value: float, digits: int = 2) -> str:
  return "—" if value != value else f"{value:.{digits}f}"


def render(meta: dict[str, Any], results: dict[str, Any]) -> str:
  """docs/benchmarks.md's measured part (tables + the machine)."""
  nan = float("nan")
  gemms = [results[k]["flops_per_s"] for k in ("gemm_start", "gemm_end")
           if "flops_per_s" in results.get(k, {})]
  roof = statistics.mean(gemms) if gemms else float("nan")
  gemm_end = results.get("gemm_end", {}).get("flops_per_s", float("nan"))
  lines = ["<!-- Generated by `python -m benchmarks.run`; do not edit by hand. -->", "",
           "# Benchmarks", "",
           f"Measured {meta['date']} by `{meta['command']}`"
           + (" (an interrupted run continued)" if ", resumed by" in meta["command"]
              else " in one run") + ": "
           f"{meta['reps']} timed repetitions after one warm-up, median reported; every "
           f"measurement in a fresh process. PASCAL-Context model (4 tasks), Swin-T, random "
           f"weights, float32, batch {BATCH}.", "",
           "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()) + ".", "",
           f"Dense float32 GEMM roof ({GEMM_N}^3 matmul, same run): "
           f"{results['gemm_start']['flops_per_s'] / 1e9:.1f} GFLOP/s at the start, "
           + (f"{gemm_end / 1e9:.1f} GFLOP/s at the end " if gemm_end == gemm_end
              else "not measured at the end (run interrupted) ") +
           f"(each case's % of roof is against the roof measured beside it, column 'roof GFLOP/s'; "
           f"a case without one uses their mean, {roof / 1e9:.1f} GFLOP/s). Load average (1 min) before each "
           "measurement in the last column: the machine is shared, so the ratios are the "
           "figures to compare.", ""]
  for kind, title in (("train", "Train step (forward + backward + AdamW)"),
                      ("eval", "Eval forward (weights merged for inference)")):
    lines += [f"## {title}", "",
              "| case | size | step s | compile s (of it tracing) | StableHLO ops | GFLOP/step | "
              "GFLOP/image | GFLOP/s | roof GFLOP/s | % of roof | peak RSS GiB, steps | "
              "peak RSS GiB, compile | RSS GiB after compile -> freed heap released | "
              "XLA temp GiB | XLA args+out GiB | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results[kind].items():
      name, size = key.rsplit("@", 1)
      if "error" in r:
        lines.append(f"| {name} | {size} | {r['error']} |||||||||||||| {fmt(r['load'])} |")
        continue
      seconds = median(r)
      rate = r["flops"] / seconds
      roof_here, steady = case_roof(r, roof)
      lines.append(
          f"| {name} | {size} | {fmt(seconds)} | {fmt(r['compile_s'], 1)} "
          f"({fmt(r.get('lower_s', nan), 1)}) | {r.get('hlo_ops', '—')} | "
          f"{fmt(r['flops'] / 1e9, 1)} | {fmt(r['flops'] / 1e9 / BATCH, 1)} | "
          f"{fmt(rate / 1e9, 1)} | {fmt(roof_here / 1e9, 1)} | "
          f"{fmt(100 * rate / roof_here, 0)}{'' if steady else ' (roof unsteady)'} | "
          f"{fmt(r['peak_resident_gib'])} | {fmt(r['compile_peak_gib'])} | "
          f"{fmt(r.get('resident_compiled_gib', nan))} -> "
          f"{fmt(r.get('resident_released_gib', nan))} | {fmt(r['temp_gib'])} | "
          f"{fmt(r['argument_gib'] + r['output_gib'] - r['alias_gib'])} | {fmt(r['load'])} |")
    if kind == "eval":
      merged = [f"{key}: {r['unmerged_flops'] / 1e9 / BATCH:.1f} -> "
                f"{r['flops'] / 1e9 / BATCH:.1f}" for key, r in results[kind].items()
                if "error" not in r]
      lines += ["", "GFLOP per image without -> with the inference merge: " + "; ".join(merged)
                + "."]
    lines.append("")
  if results["skipped"]:
    lines += ["Skipped cases: " + "; ".join(f"{n} ({why})" for n, why in
                                            results["skipped"].items()) + ".", ""]
  lines += targets(results, roof)
  lines += ["## Swin-T alone: ours (JAX) vs the PyTorch reference Swin-T", "",
            "Forward: the four stage outputs; backward: the gradient of their sum with respect "
            "to every weight. PyTorch FLOPs by torch.utils.flop_counter, ours by XLA's cost "
            "analysis.", "",
            "| size | pass | ours s | PyTorch s | ours / PyTorch | ours GFLOP | PyTorch GFLOP | "
            "roof GFLOP/s | ours % of roof | load |", "|---|---|---|---|---|---|---|---|---|---|"]
  for key, r in results["swin"].items():
    if "error" in r:
      lines.append(f"| {key} | {r['error']} |||||||| {fmt(r['load'])} |")
      continue
    for pass_ in ("forward", "backward"):
      ours = r[f"jax_{pass_}"]
      theirs = r.get(f"torch_{pass_}")
      ours_s = median(ours)
      theirs_s = median(theirs) if isinstance(theirs, dict) else float("nan")
      roof_here, steady = case_roof(ours, roof)
      lines.append(
          f"| {key} | {pass_} | {fmt(ours_s, 3)} | {fmt(theirs_s, 3)} | "
          f"{fmt(ours_s / theirs_s)} | {fmt(ours['flops'] / 1e9, 1)} | "
          f"{fmt(theirs['flops'] / 1e9 if isinstance(theirs, dict) else float('nan'), 1)} | "
          f"{fmt(roof_here / 1e9, 1)} | {fmt(100 * ours['flops'] / ours_s / roof_here, 0)}"
          f"{'' if steady else ' (roof unsteady)'} | {fmt(r['load'])} |")
  lines += op_profile_tables(results)
  lines += ["", "## Input pipeline", "",
            "| size | examples/s (1 process, no workers) | train step consumes examples/s | "
            "ratio | load |", "|---|---|---|---|---|"]
  for key, r in results["pipeline"].items():
    train = results["train"].get(f"free_sinewich@{key}", {})
    consumed = BATCH / median(train) if "times" in train else float("nan")
    produced = r.get("examples_per_s", float("nan"))
    lines.append(f"| {key} | {fmt(produced, 1)} | {fmt(consumed, 2)} | "
                 f"{fmt(produced / consumed, 0)} | {fmt(r['load'])} |")
  lines.append("")
  return "\n".join(lines)


def op_profile_tables(results: dict[str, Any]) -> list[str]:
  """The per-op traces (benchmarks/op_profile.py) of the Swin-T forward and the train step."""
  traced = [(f"Swin-T forward, {key}, batch {BATCH}", r["op_profile"], r["op_profile"]["roof"])
            for key, r in results["swin"].items() if "op_profile" in r]
  traced += [(f"train step, {key}, batch {BATCH}", r["op_profile"], case_roof(r, float("nan"))[0])
             for key, r in results["train"].items() if "op_profile" in r]
  if not traced:
    return []
  lines = ["", "## Where the time goes (XLA's per-op trace)", "",
           "`benchmarks/op_profile.py`: the compiled program run under jax.profiler, each "
           "executed HLO op's traced duration attributed to what it computes (its metadata: the "
           "module path, the JAX primitive; the task path's scopes are named in "
           "models/adapters.sine_awb_outputs), FLOPs counted from the optimized HLO's dot and "
           "convolution shapes. The runtime runs independent ops on its threads at once (an op "
           "waiting for a thread counts as running): each instant is shared equally by the ops "
           "running at it, so the shares are of the time any op ran. GEMM roof: the Swin-T's, "
           "measured in its process right after the trace; the train step's, the one beside its "
           "timed steps."]
  for title, profile, roof in traced:
    if "summed_s" in profile:
      op_time = (f"{profile['op_s']:.3f} s of op time (time-sliced; {profile['summed_s']:.3f} s "
                 "of op durations added up)")
    else:  # traced before op_profile sliced overlapping ops (2026-12-04 08:50 UTC)
      op_time = (f"{profile['op_s']:.3f} s of op durations added up (this trace predates the "
                 "time slicing: overlapping ops count in full, shares are of that sum)")
    kinds = profile.get("kinds")  # traced before 2026-12-07: not split
    split = (" Of the op time: matrix products (with what XLA fused into them) "
             f"{100 * kinds.get('matmul', 0) / profile['op_s']:.0f} %, the rest (non-matmul) "
             f"{100 * (profile['op_s'] - kinds.get('matmul', 0)) / profile['op_s']:.0f} %, of "
             f"which ops computing random bits (dropout / drop-path masks, with what is fused "
             f"into them) {100 * kinds.get('random bits', 0) / profile['op_s']:.0f} %."
             if kinds else "")
    lines += ["", f"{title}: {profile['wall_s']:.3f} s per call under the profiler, {op_time}, "
              f"{profile['flops'] / 1e9:.1f} GFLOP.{split}", "",
              "| share of op time | ms | GFLOP | GFLOP/s | % of roof | what |",
              "|---|---|---|---|---|---|"]
    for g in profile["groups"]:
      rate = g["flops"] / g["seconds"] if g["seconds"] and g["flops"] else float("nan")
      lines.append(f"| {100 * g['seconds'] / profile['op_s']:.1f} % | "
                   f"{1e3 * g['seconds']:.1f} | {g['flops'] / 1e9:.1f} | {fmt(rate / 1e9, 1)} | "
                   f"{fmt(100 * rate / roof, 0)} | {g['name']} |")
    alone = profile.get("linear_alone")
    if alone:
      rate = alone["flops"] / alone["seconds"]
      lines += ["", f"The linear layers' {alone['count']} matrix products alone (a jitted "
                f"jnp.dot at each shape, median of the repetitions): {1e3 * alone['seconds']:.1f} "
                f"ms, {rate / 1e9:.1f} GFLOP/s, {100 * rate / roof:.0f} % of the roof "
                f"({roof / 1e9:.1f} GFLOP/s)."]
  return lines


def swin_forward_reason(results: dict[str, Any]) -> str:
  """Why the Swin-T forward is below the roof, from its per-op trace (448, else 224)."""
  key = next((k for k in ("448", "224") if "op_profile" in results["swin"].get(k, {})), None)
  if key is None:
    return ("- % of the GEMM roof, Swin-T forward: the work between the GEMMs (window "
            "partition and shifts, softmax, LayerNorm, GELU, adds) is memory-bound; no per-op "
            "trace in this run (benchmarks/op_profile.py).")
  p = results["swin"][key]["op_profile"]
  roof = p["roof"]
  linear = next(g for g in p["groups"] if g["name"].startswith("linear layers"))
  alone = p["linear_alone"]
  best = min(linear["seconds"], alone["seconds"])
  rest = 1 - linear["seconds"] / p["op_s"]
  bound = 100 * p["flops"] / best / roof
  others = [g for g in p["groups"] if g is not linear][:5]
  listed = ", ".join(f"{g['name'].split(' (')[0]} {100 * g['seconds'] / p['op_s']:.0f} %"
                     for g in others)
  alone_pct = 100 * alone["flops"] / alone["seconds"] / roof
  return (f"- % of the GEMM roof, Swin-T forward (per-op trace at {key}, section 'Where the time "
          f"goes'): the linear layers (qkv, proj, fc1, fc2, patch-merging reductions) are "
          f"{100 * linear['flops'] / p['flops']:.0f} % of the FLOPs and ran at "
          f"{100 * linear['flops'] / linear['seconds'] / roof:.0f} % of the roof inside the "
          f"program; the same matrix products alone, one jnp.dot per shape, reach "
          f"{alone_pct:.0f} %"
          + (" (their K and N, 96 to 3072, are not the roof's 2048^3)" if alone_pct < 90 else "")
          + f". The other {100 * rest:.0f} % of the op time ({listed}) runs at a few GFLOP/s "
          f"or does no matrix FLOPs. Even if all of that took no time, the forward's FLOPs in "
          f"the linear layers' best time would be {bound:.0f} % of the roof"
          + (": 80 % is out of reach for Swin-T's shapes on this CPU, whatever the code between "
             "the GEMMs does." if bound < 80 else
             ": the work between the GEMMs is what keeps the forward below 80 %."))


def train_step_reason(results: dict[str, Any]) -> str | None:
  """The train step's per-op split (448, else 224), when this run traced one."""
  key = next((k for k in ("free_sinewich@448", "free_sinewich@224")
              if "op_profile" in results["train"].get(k, {})), None)
  if key is None:
    return None
  p = results["train"][key]["op_profile"]
  task = [g for g in p["groups"] if g["name"].startswith("task kernels")]
  task_s = sum(g["seconds"] for g in task)
  task_flops = sum(g["flops"] for g in task)
  backward = sum(g["seconds"] for g in p["groups"] if g["name"].endswith("backward"))
  roof = case_roof(results["train"][key], float("nan"))[0]
  top = ", ".join(f"{g['name']} {100 * g['seconds'] / p['op_s']:.0f} % at "
                  f"{fmt(g['flops'] / g['seconds'] / roof * 100 if g['flops'] else 0, 0)} % "
                  "of the roof" for g in task)
  return (f"  Traced op by op ({key}, section 'Where the time goes'): the task kernels' build "
          f"and apply take {100 * task_s / p['op_s']:.0f} % of the op time for "
          f"{100 * task_flops / p['flops']:.0f} % of the FLOPs ({top}); the backward pass "
          f"{100 * backward / p['op_s']:.0f} %.")


def verdict(judged: bool, met: bool) -> str:
  if not judged:
    return "no verdict: the GEMM roof measured right before and after the timed steps " \
           "differs by > 20 % (the machine's load changed during the measurement)"
  return "met" if met else "NOT met"


def targets(results: dict[str, Any], roof: float) -> list[str]:
  """Issue 14's targets against this run's figures (the 448 figure; else 224, said so)."""
  def pick(kind, name):
    for size in ("448", "224"):
      r = results[kind].get(f"{name}@{size}") if kind in ("train", "eval") else \
          results[kind].get(size)
      if r and "error" not in r:
        return size, r
    return None, None

  rows = []

  def row(what, target, kind, name, value_of, limit, at_most, only_448=False, detail=None):
    size, r = pick(kind, name)
    if r is None or (only_448 and size != "448"):
      rows.append(f"| {what} | {target} | not measured{' at 448' if only_448 else ''} in this "
                  "run | — |")
      return
    value = value_of(r)
    met = value <= limit if at_most else value >= limit
    where = "" if size == "448" else " (at 224: 448 not measured in this run)"
    judged = case_roof(r, roof)[1] or "roof" not in what
    extra = f"; {detail(r)}" if detail else ""
    rows.append(f"| {what} | {target} | {value:.2f}{where}{extra} | {verdict(judged, met)} |")

  def rate(r):
    return 100 * r["flops"] / median(r) / case_roof(r, roof)[0]

  row("train step peak resident memory, 448, batch 2, block_remat='none', task_loop='stacked' "
      "(GiB)", "<= 6", "train", "free_sinewich",
      lambda r: r["peak_resident_gib"], 6.0, True,
      detail=lambda r: (f"XLA: {r['temp_gib']:.2f} temp + "
                        f"{r['argument_gib'] + r['output_gib'] - r['alias_gib']:.2f} args/out; "
                        f"resident after compile {r.get('resident_released_gib', float('nan')):.2f}"
                        " (freed heap released)"))
  row("train step peak resident memory, 448, batch 2, the paper's config (lean_memory; GiB)",
      "<= 6", "train",
      "lean_memory", lambda r: r["peak_resident_gib"], 6.0, True,
      detail=lambda r: (f"XLA: {r['temp_gib']:.2f} temp; "
                        + ", ".join(f"{k.split('.')[-1]}={v!r}" for k, v in LEAN_MEMORY)))
  row("train step, % of the GEMM roof", ">= 60", "train", "free_sinewich", rate, 60, False)
  row("eval forward, % of the GEMM roof", ">= 80", "eval", "free_sinewich", rate, 80, False)
  size, r = pick("swin", "")
  if r is not None:
    ours = r["jax_forward"]
    value = rate({**ours, "load": r["load"]})
    where = "" if size == "448" else " (at 224)"
    rows.append(f"| Swin-T forward, % of the GEMM roof | >= 80 | {value:.2f}{where} | "
                f"{verdict(case_roof(ours, roof)[1], value >= 80)} |")
  row("train step compile (s)", "<= 20", "train", "free_sinewich", lambda r: r["compile_s"],
      20, True, detail=lambda r: (f"{r.get('lower_s', float('nan')):.1f} s of it tracing, "
                                  f"{r.get('hlo_ops', '?')} StableHLO ops"))
  row("inference GFLOP per image (merged)", "<= 350 at 448", "eval", "free_sinewich",
      lambda r: r["flops"] / 1e9 / BATCH, 350, True, only_448=True)
  row("inference GFLOP per image, Winograd", "<= 200 at 448", "eval", "winograd",
      lambda r: r["flops"] / 1e9 / BATCH, 200, True, only_448=True)
  return ["## Targets (issue 14)", "",
          "FLOP targets are for 448 x 448; GFLOP per image scales with the pixel count, so a "
          "224 figure is about a quarter of the 448 one. Each % of the roof is against the GEMM "
          "roof measured in the same process right before and right after the timed steps "
          "(column 'roof GFLOP/s', their mean), and judged only when those two agree within "
          "20 %.", "",
          "| target | wanted | measured | verdict |", "|---|---|---|---|", *rows, "",
          *why_not_met(results), ""]


# Why a target the tables show NOT met is not met: what the measurements above point to (the
# figures are in the tables; docs/method.md, "Computation", has the choices).
SWIN_FORWARD_REASON = "(from the Swin-T rows' per-op trace)"
WHY_NOT_MET = [
    "Where a target above is NOT met (or has no verdict), the reason, from the figures in the "
    "tables:", "",
    "- Resident memory: the step's peak is what stays resident after the compilation plus "
    "XLA's temporaries (columns 'RSS after compile' and 'XLA temp'). glibc keeps the heap the "
    "XLA:CPU compilation freed (1-2 GiB); the benchmark, like the training loop after its first "
    "step, gives it back (distributed.release_freed_host_memory) before stepping. What remains is "
    "~1 GiB of runtime (Python, jaxlib, the compiled program, the frozen backbone) plus the "
    "temporaries XLA's buffer assignment asks for, which at 448 are the activations of the four "
    "task streams of each stage's last block and the k x k GEMM inputs of their task paths. "
    "block_remat='blocks' (nn.remat, i.e. jax.checkpoint, around every Swin block) does the "
    "recomputation (its GFLOP/step column) but does not lower XLA's temporaries on XLA:CPU "
    "(compare the block_remat and free_sinewich rows): XLA:CPU removes jax.checkpoint's "
    "optimisation barriers before its last common-subexpression pass (docs/method.md, "
    "Computation), which is why task_path_remat uses layers.recompute_in_backward instead. "
    "block_remat='recompute' is that cotangent-tied recomputation per block (block_recompute "
    "row) and task_loop='scan' runs each layer's task paths one task at a time; together they "
    "are the lean_memory row (the memory target's second row), the compute of the real-data "
    "configs (configs/common.py LEAN_COMPUTE) since 2026-12-04. On this machine its step was "
    "not slower than the stacked one's: compiled in one process and stepped alternately at 448 "
    "(2026-12-04, 3 pairs, the procedure of benchmarks/paired_steps.py), lean / stacked "
    "took 0.43, 0.59 and 0.64 of the time; on an Intel Xeon 2-core it was 1.2-1.3x slower "
    "(docs/method.md, Memory): the choice rests on the memory target. Rows measured hours "
    "apart differ by up to 2x on this shared machine even at a steady GEMM roof (the step is "
    "memory-bound, the GEMM is not), so compare rows by their measurement dates with care. "
    "Whether nn.remat saves memory on TPU/GPU is not measurable here.",
    "- Compile time: most of it is XLA:CPU's LLVM code generation, not tracing (the figure in "
    "brackets) nor XLA's HLO passes; measured with perf and per part with "
    "benchmarks/compile_parts.py (docs/method.md, Computation). It grows with the machine's "
    "load (the load column: the same-sized depthwise graph compiles several times faster at "
    "a lower load). Plain Swin-T full fine-tuning (full_ft) alone needs more than 20 s here, "
    "and so does the optimizer's update alone; packing AdamW into one vector per weight-decay "
    "group cut the op count but compiled 2.24x slower and was not kept.",
    "- % of the GEMM roof, train step: the backward through the task paths (k x k GEMMs on "
    "im2col copies, their shift-add transposes, the kernels rebuilt from the factors) moves "
    "more memory per FLOP than a dense GEMM; the 2-core CPU is memory-bound there. A row whose "
    "roof moved by > 20 % during its steps gets no verdict; the depthwise row (the same task "
    "path and FLOPs within 0.1 %) is the one to read then. Since 2026-12-04 freesine_jax "
    "keeps XLA:CPU's reductions out of YNNPACK "
    "(freesine_jax/__init__.py; the trace below showed YNNPACK's sums over the task axis of "
    "stage 4's kernel gradients among the slowest ops); rows measured before that date ran "
    "with XLA's default (docs/method.md, Computation, has the paired figures). Since "
    "2026-12-04 13:00 UTC the task path builds fc2's kernels in the order its GEMM reads them "
    "(adapters.kernel_layout; the trace had XLA copy them transposed element by element): the "
    "free_sinewich step at 224 took 0.67-0.68 of the time of the rows before (docs/method.md, "
    "Computation, paired on another 2-core machine).",
    SWIN_FORWARD_REASON,
    "- A run interrupted before the end (cases missing, no GEMM at the end) was cut to fit the "
    "session's time, the 448 cases first; `--resume` continues it from its --json.",
]


def why_not_met(results: dict[str, Any]) -> list[str]:
  """WHY_NOT_MET with the reasons that are computed from this run's per-op traces."""
  lines = []
  for line in WHY_NOT_MET:
    if line == SWIN_FORWARD_REASON:
      line = swin_forward_reason(results)
    elif line.startswith("- % of the GEMM roof, train step") and train_step_reason(results):
      line = f"{line}{train_step_reason(results)}"
    lines.append(line)
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="2 timed repetitions instead of 5")
  parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
  parser.add_argument("--sizes", default="448,224",
                      help="sizes in order; 448=a+b:eval measures only case a and b's eval at 448")
  parser.add_argument("--cases", default=",".join(c.name for c in CASES))
  parser.add_argument("--kinds", default="train,eval,swin,pipeline")
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
  parser.add_argument("--json", default=None, help="also write the raw results here")
  parser.add_argument("--from-json", default=None,
                      help="only re-render --out from the raw results a run wrote with --json")
  parser.add_argument("--resume", default=None,
                      help="continue the run whose --json this is: keep its measurements, measure "
                           "only what it lacks, write back to it")
  parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.from_json:
    with open(args.from_json, encoding="utf-8") as f:
      saved = json.load(f)
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(render(saved["meta"], saved["results"]))
    print(f"wrote {args.out} from {args.from_json}")
    return
  if args.child:
    kind, case, size, reps = args.child
    print("RESULT " + json.dumps(child(kind, case, int(size), int(reps))), flush=True)
    return
  reps = args.reps or (2 if args.quick else 5)
  sizes = parse_sizes(args.sizes)
  kinds = set(args.kinds.split(","))
  by_name = {c.name: c for c in CASES}
  unknown = [n for n in args.cases.split(",") if n not in by_name]
  if unknown:
    parser.error(f"--cases: unknown {unknown}; the cases are {sorted(by_name)}")
  chosen = [by_name[n] for n in args.cases.split(",")]  # measured in this order
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None
                                                           else argv),
          "reps": reps, "machine": machine()}
  results = {"train": {}, "eval": {}, "swin": {}, "pipeline": {}, "skipped": {}}
  if args.resume:
    try:
      with open(args.resume, encoding="utf-8") as f:
        saved = json.load(f)
      earlier, results = saved["meta"], saved["results"]
    except (OSError, ValueError, KeyError) as e:
      parser.error(f"--resume {args.resume}: not a run's --json ({type(e).__name__}: {e})")
    if earlier["reps"] != reps or earlier["machine"] != meta["machine"]:
      parser.error(f"--resume {args.resume}: measured with reps={earlier['reps']} on "
                   f"{earlier['machine']}; this run has reps={reps} on {meta['machine']}")
    # Failed measurements are measured again; the rest is kept as measured.
    for kind in ("train", "eval", "swin", "pipeline"):
      results[kind] = {k: r for k, r in results[kind].items() if "error" not in r}
    meta["date"] = f"{earlier['date']} to {meta['date']}"
    meta["command"] = f"{earlier['command']}, resumed by {meta['command']}"
    args.json = args.json or args.resume

  def record(key, value, *path):
    (results[path[0]] if path else results)[key] = value
    # Written after every measurement: an interrupted run still leaves what it measured.
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(render(meta, results))
    if args.json:
      with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)

  if "gemm_start" not in results:
    record("gemm_start", spawn("gemm", "-", 0, reps))
  for case in chosen:
    why = config_available(case)
    if why:
      record(case.name, why, "skipped")
  for size, only in sizes:
    for kind in ("swin", "pipeline"):
      if kind in kinds and (not only or kind in only) and str(size) not in results[kind]:
        record(str(size), spawn(kind, "-", size, reps), kind)
    for case in chosen:
      named = [o.partition(":")[2] for o in only if o.partition(":")[0] == case.name]
      if case.name in results["skipped"] or (only and not named):
        continue
      if case.sizes is not None and size not in case.sizes:
        continue
      for kind in case.kinds:
        if only and "" not in named and kind not in named:
          continue  # 'case:kind' at this size
        if kind in kinds and f"{case.name}@{size}" not in results[kind]:
          record(f"{case.name}@{size}", spawn(kind, case.name, size, reps), kind)
  record("gemm_end", spawn("gemm", "-", 0, reps))
  print(f"wrote {args.out}")


def parse_sizes(text: str) -> list[tuple[int, tuple[str, ...]]]:
  """'224,448=free_sinewich+swin' -> [(224, ()), (448, ('free_sinewich', 'swin'))]: each size,
  in order, with the cases (and 'swin', 'pipeline') measured at it (() = all); 'case:eval'
  measures only that kind of the case at that size."""
  out = []
  for token in filter(None, text.split(",")):
    size, _, only = token.partition("=")
    out.append((int(size), tuple(filter(None, only.split("+")))))
  return out


if __name__ == "__main__":
  main()
