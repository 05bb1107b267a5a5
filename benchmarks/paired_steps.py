"""Train steps of two or more compute settings, compiled in one process and stepped alternately.

  python -m benchmarks.paired_steps [--size=448] [--settings=stacked,lean] [--rounds=3]
  python -m benchmarks.paired_steps --arg=mtlora,r64 --settings=threefry,rbg,unsafe_rbg

On a shared machine a memory-bound step's time drifts by up to 2x over hours even when a GEMM
runs at a steady rate, so settings measured in separate processes (benchmarks.run's rows) can
differ by more than their settings do. Here every setting is compiled first, warmed up once,
then each round steps each setting once (the order reversed every other round) and the ratio
to the first setting is taken per round: both members of a pair see the same machine.
PASCAL-Context (4 tasks, --arg: the config arg, r64 = Free Sinewich), Swin-T, random weights,
batch 2, as benchmarks.run. The PRNG settings (threefry, rbg, unsafe_rbg) are the stacked compute
with config.train.dropout_rng set (the mask bits of dropout and drop-path); mask8 / mask16 /
mask32 with config.model.lora.dropout_bits set (random bits per LoRA-dropout mask entry).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from benchmarks import run as bench  # noqa: E402

SETTINGS = {"stacked": bench.STACKED, "lean": bench.LEAN_MEMORY,
            "recompute": bench.STACKED + (("model.compute.block_remat", "recompute"),),
            **{impl: bench.STACKED + (("train.dropout_rng", impl),)
               for impl in ("threefry", "rbg", "unsafe_rbg")},
            **{f"mask{bits}": bench.STACKED + (("model.lora.dropout_bits", bits),)
               for bits in (8, 16, 32)},
            "rbg_mask8": bench.STACKED + (("train.dropout_rng", "rbg"),
                                          ("model.lora.dropout_bits", 8))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=448)
  parser.add_argument("--settings", default="stacked,lean",
                      help=f"comma-separated, from {sorted(SETTINGS)}; the first is the reference")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--arg", default="r64", help="the PASCAL-Context config arg")
  args = parser.parse_args()
  names = args.settings.split(",")
  unknown = sorted(set(names) - set(SETTINGS))
  if unknown or len(names) < 2:
    parser.error(f"--settings: two or more of {sorted(SETTINGS)}, got {args.settings!r}")
  steps = {}
  for name in names:
    case = bench.build_train_case(bench.case_config(bench.Case(name, args.arg, SETTINGS[name]),
                                                    args.size))
    compiled, timings = bench.lower_and_compile(
        lambda c=case: c.step.lower(c.state, c.batch, c.backbone))
    print(f"{name}: compiled in {timings['compile_s']:.0f} s, XLA temporaries "
          f"{bench.compiled_stats(compiled)['temp_gib']:.2f} GiB", flush=True)
    state, metrics = compiled(case.state, case.batch, case.backbone)  # warm-up
    jax.block_until_ready(metrics["loss"])
    steps[name] = [compiled, state, case.batch, case.backbone]
  times = {name: [] for name in names}
  for r in range(args.rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      compiled, state, batch, backbone = steps[name]
      start = time.perf_counter()
      state, metrics = compiled(state, batch, backbone)
      jax.block_until_ready(metrics["loss"])
      times[name].append(time.perf_counter() - start)
      steps[name][1] = state
    print(f"round {r + 1} (load {os.getloadavg()[0]:.2f}): "
          + "  ".join(f"{name} {times[name][-1]:.1f} s" for name in names), flush=True)
  for name in names[1:]:
    ratios = [a / b for a, b in zip(times[name], times[names[0]])]
    print(f"{name} / {names[0]}: median {statistics.median(ratios):.2f} "
          f"(per round {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
  main()
