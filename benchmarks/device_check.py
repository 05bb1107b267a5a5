"""One prepared check of an accelerator: backend, the accelerator tests, the paper config's speed.

  benchmarks/device_check.sh                 # on the GPU/TPU machine (installs what it lacks)
  python -m benchmarks.device_check --dry-run   # here, on the CPU: the same path at toy sizes

(a) prints the jax backend and devices; (b) runs the tests marked `accelerator` (model, the
task-path lowerings against the direct form, the train step, sharding) on the device, with
fp32 matmuls at full precision (JAX_DEFAULT_MATMUL_PRECISION=highest: GPUs default to TF32,
which the tests' float32 tolerances are not written for); (c) for free_sinewich, mtlora and
full_ft on PASCAL-Context's config (Swin-T 448, 4 tasks, random weights), in float32 and
bfloat16: compile time, step time (median of --reps after a warm-up), XLA's FLOPs per step,
achieved TFLOP/s against the device's dense-GEMM roof measured in the same run (and the chip's
nominal peak where known), the compiled program's device memory (arguments + temporaries +
outputs - aliased, XLA's memory analysis) and the device's peak bytes in use so far; for the
train step at --batch (8) and at the largest batch that fits (extrapolated from the memory at
--batch and 2x --batch, then compiled and run; halved until it runs), and the merged eval
forward at --batch; (d) writes <out>/device_check.json and <out>/device_check.md.

--dry-run: toy sizes (a one-block-per-stage Swin at 64 px, batch 1, 1 rep, free_sinewich in
float32 only, no largest batch)
and the tests only collected, so the whole path is exercised in well under a minute on a CPU
(tests/test_device_check.py runs it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import run as bench  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import timing  # noqa: E402  pylint: disable=g-import-not-at-top

CASES = ("free_sinewich", "mtlora", "full_ft")
# Dense peak FLOP/s by jax device_kind (vendor datasheets, dense: no sparsity). float32 is the
# TF32 tensor-core peak (XLA:GPU's default precision for float32 matmuls).
NOMINAL_PEAK = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4e12, "float32": 494.7e12},
    "NVIDIA H100 PCIe": {"bfloat16": 756.5e12, "float32": 378.0e12},
    "NVIDIA H200": {"bfloat16": 989.4e12, "float32": 494.7e12},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312e12, "float32": 156e12},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312e12, "float32": 156e12},
}
GIB = 2.0 ** 30


def devices() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  devs = jax.devices()
  stats = devs[0].memory_stats() or {}
  return {"backend": jax.default_backend(), "count": len(devs),
          "kind": devs[0].device_kind, "devices": [str(d) for d in devs],
          "memory_gib": stats.get("bytes_limit", 0) / GIB or None,
          "jax": jax.__version__, "python": platform.python_version()}


def gemm_roof(dtype: str, n: int, reps: int) -> float:
  """Dense matmul FLOP/s of an n^3 product in `dtype` on the default device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(jnp.dot)
  seconds = statistics.median(timing.timed(lambda: matmul(a, b), max(reps, 3)))
  return 2.0 * n ** 3 / seconds


def peak_in_use_gib() -> float | None:
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in stats else None


def program_gib(stats: dict[str, float]) -> float:
  """Device memory a compiled program needs: arguments + temporaries + outputs - aliased."""
  return (stats["argument_gib"] + stats["temp_gib"] + stats["output_gib"]
          - stats.get("alias_gib", 0.0))


# --dry-run's toy Swin (the same code path, seconds to compile on a CPU): 2x2 windows divide
# its 64 px token grids (16, 8, 4, 2).
TOY = {"variant": "custom", "embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1),
       "window_size": 2}
DRY_RUN = {"on": False}


def case_config(case: str, size: int, batch: int, dtype: str):
  bench.BATCH = batch  # benchmarks.run builds its configs and batches at this batch size
  config = bench.case_config({c.name: c for c in bench.CASES}[case], size)
  config.model.dtype = dtype
  if DRY_RUN["on"]:
    config.model.update(TOY)
    config.model.lora.rank = 4
    config.model.decoder.head_channels = 32
    config.model.decoder.proj_channels = (4, 8, 8, 16)
  return config


def train_memory(case: str, size: int, batch: int, dtype: str) -> float:
  """The train step's program memory at `batch`, compiled only."""
  built = bench.build_train_case(case_config(case, size, batch, dtype))
  compiled, _ = bench.lower_and_compile(
      lambda: built.step.lower(built.state, built.batch, built.backbone))
  return program_gib(bench.compiled_stats(compiled))


def time_train(case: str, size: int, batch: int, dtype: str, reps: int) -> dict[str, Any]:
  built = bench.build_train_case(case_config(case, size, batch, dtype))
  state, backbone, data, step = built.state, built.backbone, built.batch, built.step
  del built
  compiled, timings = bench.lower_and_compile(lambda: step.lower(state, data, backbone))
  stats = bench.compiled_stats(compiled)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], data, backbone)
    return metrics["loss"]
  times = timing.timed(one_step, reps)
  return {"kind": "train", "batch": batch, "compile_s": timings["compile_s"],
          "step_s": statistics.median(times), "flops": stats["flops"],
          "program_gib": program_gib(stats), "peak_in_use_gib": peak_in_use_gib()}


def time_eval(case: str, size: int, batch: int, dtype: str, reps: int) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from freesine_jax import evaluate  # pylint: disable=g-import-not-at-top
  from freesine_jax import modeling  # pylint: disable=g-import-not-at-top
  config = case_config(case, size, batch, dtype)
  model = modeling.build_model(config)
  variables = modeling.init_variables(model, config)
  images = bench.random_batch(config, False)["image"]
  forward, merge = evaluate.make_eval_forward(model), evaluate.make_inference_merge(model)
  if merge is not None:
    variables = jax.block_until_ready(merge(variables, image_shape=(1, size, size, 3)))
  compiled, timings = bench.lower_and_compile(lambda: forward.lower(variables, images))
  stats = bench.compiled_stats(compiled)
  times = timing.timed(lambda: compiled(variables, images), reps)
  return {"kind": "eval (merged)", "batch": batch, "compile_s": timings["compile_s"],
          "step_s": statistics.median(times), "flops": stats["flops"],
          "program_gib": program_gib(stats), "peak_in_use_gib": peak_in_use_gib()}


def largest_batch(case: str, size: int, batch: int, dtype: str, memory_gib: float) -> int:
  """The largest multiple of `batch` whose train step's program memory, extrapolated linearly
  from `batch` and 2 x `batch`, stays under 90 % of the device's memory."""
  low = train_memory(case, size, batch, dtype)
  high = train_memory(case, size, 2 * batch, dtype)
  per_example = max((high - low) / batch, 1e-9)
  fits = int((0.9 * memory_gib - (low - per_example * batch)) / per_example)
  return max(batch, fits // batch * batch)


def run_tests(dry_run: bool) -> dict[str, Any]:
  """The accelerator-marked tests on the default device (collected only in a dry run)."""
  # XLA's own optimisation level (tests/conftest.py lowers it on the CPU to compile faster).
  env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest",
             FREESINE_TEST_XLA_CODEGEN="default",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if not dry_run:
    env.pop("JAX_PLATFORMS", None)  # the accelerator, not a CPU a caller may have pinned
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "accelerator",
         "tests"] + (["--collect-only"] if dry_run else [])
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  return {"command": " ".join(cmd[1:]), "exit_code": proc.returncode,
          "summary": lines[-1] if lines else proc.stderr.strip()[-300:],
          "seconds": time.perf_counter() - start,
          "failures": [l for l in proc.stdout.splitlines() if l.startswith("FAILED")]}


def markdown(report: dict[str, Any]) -> str:
  d = report["device"]
  lines = [f"Device check, {report['date']}: {d['count']} x {d['kind']} ({d['backend']}, "
           f"{d['memory_gib'] or '?'} GiB), jax {d['jax']}{' (DRY RUN)' if report['dry_run'] else ''}",
           "", f"Tests (`{report['tests']['command']}`): {report['tests']['summary']}", ""]
  for dtype, roof in report["gemm_roof"].items():
    nominal = NOMINAL_PEAK.get(d["kind"], {}).get(dtype)
    lines.append(f"- dense GEMM roof, {dtype}: {roof / 1e12:.1f} TFLOP/s measured"
                 + (f" (nominal {nominal / 1e12:.0f})" if nominal else ""))
  lines += ["", "| case | dtype | program | batch | compile s | step s | TFLOP/s | % of roof "
            "| program GiB | peak in use GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in report["results"]:
    if "error" in r:
      lines.append(f"| {r['case']} | {r['dtype']} | {r.get('kind', '?')} | {r.get('batch', '?')} "
                   f"| failed: {r['error'][:120]} | | | | | |")
      continue
    tflops = r["flops"] / r["step_s"] / 1e12
    roof = report["gemm_roof"][r["dtype"]] / 1e12
    peak = r["peak_in_use_gib"]
    lines.append(f"| {r['case']} | {r['dtype']} | {r['kind']} | {r['batch']} | "
                 f"{r['compile_s']:.1f} | {r['step_s']:.4f} | {tflops:.2f} | "
                 f"{100 * tflops / roof:.1f} | {r['program_gib']:.2f} | "
                 f"{'–' if peak is None else f'{peak:.2f}'} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dry-run", action="store_true")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "device_check"))
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--size", type=int, default=448)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--skip_tests", action="store_true")
  parser.add_argument("--programs", default="train,eval", help="train and/or eval")
  args = parser.parse_args(argv)
  cases, dtypes = args.cases.split(","), args.dtypes.split(",")
  size, batch, reps, gemm_n = args.size, args.batch, args.reps, 8192
  if args.dry_run:
    cases, dtypes, size, batch, reps, gemm_n = cases[:1], dtypes[:1], 64, 1, 1, 512
    DRY_RUN["on"] = True
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dry_run": args.dry_run, "size": size, "device": devices(), "results": []}
  print(f"jax {report['device']['jax']}, backend {report['device']['backend']}: "
        f"{', '.join(report['device']['devices'])}", flush=True)
  report["tests"] = ({"command": "skipped", "summary": "skipped", "exit_code": 0}
                     if args.skip_tests else run_tests(args.dry_run))
  print(f"accelerator tests: {report['tests']['summary']}", flush=True)
  report["gemm_roof"] = {d: gemm_roof(d, gemm_n, reps) for d in dtypes}
  memory = report["device"]["memory_gib"]
  for case in cases:
    for dtype in dtypes:
      batches = [batch]
      if memory and not args.dry_run and "train" in args.programs:
        try:
          batches.append(largest_batch(case, size, batch, dtype, memory))
        except Exception as e:  # pylint: disable=broad-except
          report["results"].append({"case": case, "dtype": dtype, "kind": "largest batch",
                                    "error": f"{type(e).__name__}: {str(e)[:200]}"})
      programs = args.programs.split(",")
      jobs = ([(time_train, b) for b in dict.fromkeys(batches)] if "train" in programs else []) \
          + ([(time_eval, batch)] if "eval" in programs else [])
      for fn, b in jobs:
        while True:
          print(f"[{time.strftime('%H:%M:%S')}] {case} {dtype} {fn.__name__} batch {b}",
                flush=True)
          try:
            report["results"].append({"case": case, "dtype": dtype,
                                      **fn(case, size, b, dtype, reps)})
            break
          except Exception as e:  # pylint: disable=broad-except
            if "RESOURCE_EXHAUSTED" in str(e) and b > batch:
              b //= 2  # the extrapolation was optimistic
              continue
            report["results"].append({"case": case, "dtype": dtype, "batch": b,
                                      "error": f"{type(e).__name__}: {str(e)[:200]}"})
            break
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "device_check.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  text = markdown(report)
  with open(os.path.join(args.out, "device_check.md"), "w", encoding="utf-8") as f:
    f.write(text)
  print(text, flush=True)
  failed = report["tests"]["exit_code"] != 0 or any("error" in r for r in report["results"])
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
