"""Swin-T + LoRA train step: ours (JAX) against a PyTorch Swin-T + LoRA, stepped alternately.

  python -m benchmarks.torch_lora_step [--size=448] [--rounds=4] [--json=PATH]

The comparison issue 37 asks for, where MTLoRA's own code cannot run (it is not installed here):
the project's PyTorch reference Swin-T (tests/torch_swin_reference.py, optional torch extra) with
MTLoRA-style LoRA written here on every qkv, proj, fc1 and fc2 (rank 64, scale 4, dropout 0.05 on
the LoRA input, frozen base weights), against our model of the 'lora,r64' config (the same
adapters) run through its backbone only. Both train the same 6.1M values (LoRA factors,
LayerNorms, relative-position tables, patch embedding, patch-merging reductions; the counts are
printed and must agree), with the loss sum_stage mean(feature^2) and AdamW, random weights,
float32, batch 2, drop-path off (the reference Swin has none). No decoders: this is the
adapted backbone, where issue 37 located the gap.

Both steps are built first and warmed up (ours compiled), then each round runs one step of
each (the order reversed every other round) and the ratio ours / PyTorch is taken per round;
each framework's dense GEMM roof (a 2048^3 float32 matmul) is measured beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import run as bench  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import timing  # noqa: E402  pylint: disable=g-import-not-at-top

RANK, SCALE, DROPOUT = 64, 4.0, 0.05


def jax_step(size: int):
  """(step(), trainable count, XLA's FLOPs per step) of ours."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from freesine_jax import models  # pylint: disable=g-import-not-at-top
  from freesine_jax import modeling  # pylint: disable=g-import-not-at-top
  config = bench.case_config(bench.Case("lora", "lora,r64", bench.STACKED + (
      ("model.drop_path_rate", 0.0),)), size)
  model = models.builtin_model(config)
  variables = modeling.init_variables(model, config)
  # B = 0 at init; random B so that no product is trivially zero (as on the PyTorch side).
  keys = iter(jax.random.split(jax.random.key(1), 1000))
  trained = jax.tree_util.tree_map_with_path(
      lambda path, x: (0.01 * jax.random.normal(next(keys), x.shape)
                       if jax.tree_util.keystr(path).endswith("['lora_b']") else x),
      variables["params"]["backbone"])
  fixed = {"params": {"head": variables["params"]["head"]}, "backbone": variables["backbone"],
           "batch_stats": variables["batch_stats"]}
  images = jax.random.normal(jax.random.key(2), (bench.BATCH, size, size, 3))
  tx = optax.adamw(1e-4, weight_decay=0.05)

  def loss_fn(params, key):
    stages, _ = model.apply({**fixed, "params": {**fixed["params"], "backbone": params}}, images,
                            train=True, last_shared=True, method=model.backbone_stages,
                            rngs={"dropout": key})
    return sum(jnp.mean(jnp.square(shared)) for shared, _ in stages)

  def step(params, opt_state, key):
    key, sub = jax.random.split(key)
    loss, grads = jax.value_and_grad(loss_fn)(params, sub)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, key, loss

  state = [trained, tx.init(trained), jax.random.PRNGKey(0)]
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*state).compile()
  flops = float((compiled.cost_analysis() or {}).get("flops", float("nan")))

  def run():
    *state[:3], loss = compiled(*state)
    jax.block_until_ready(loss)

  return run, modeling.count_parameters(trained), flops


def torch_step(size: int):
  """(step(), trainable count, FLOPs per step by torch.utils.flop_counter) of the PyTorch side."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import torch_swin_reference as ref  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)

  class Lora(nn.Module):
    """base(x) + scale * dropout(x) A B, base frozen (MTLoRA's LoRA linear)."""

    def __init__(self, base: nn.Linear):
      super().__init__()
      self.base = base
      for p in base.parameters():
        p.requires_grad_(False)
      bound = 1.0 / base.in_features ** 0.5
      self.a = nn.Parameter(torch.empty(base.in_features, RANK).uniform_(-bound, bound))
      self.b = nn.Parameter(0.01 * torch.randn(RANK, base.out_features))
      self.drop = nn.Dropout(DROPOUT)

    def forward(self, x):
      return self.base(x) + SCALE * ((self.drop(x) @ self.a) @ self.b)

  model = ref.randomize(ref.SwinReference(img_size=size))
  for p in model.parameters():
    p.requires_grad_(False)
  for stage in model.layers:
    for block in stage.blocks:
      block.attn.qkv, block.attn.proj = Lora(block.attn.qkv), Lora(block.attn.proj)
      block.mlp.fc1, block.mlp.fc2 = Lora(block.mlp.fc1), Lora(block.mlp.fc2)
      block.attn.relative_position_bias_table.requires_grad_(True)
      for norm in (block.norm1, block.norm2):
        norm.requires_grad_(True)
    if stage.downsample is not None:
      stage.downsample.requires_grad_(True)  # its LayerNorm and reduction
  model.patch_embed.requires_grad_(True)
  model.train()
  trained = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.05)
  images = torch.randn(bench.BATCH, 3, size, size)

  def run():
    optimizer.zero_grad(set_to_none=True)
    loss = sum(s.square().mean() for s in model.stages(images))
    loss.backward()
    optimizer.step()

  with FlopCounterMode(display=False) as counter:
    run()
  return run, sum(p.numel() for p in trained), float(counter.get_total_flops())


def torch_roof() -> float:
  """PyTorch's dense GEMM roof, measured as benchmarks.run.measure_gemm measures JAX's."""
  import torch  # pylint: disable=g-import-not-at-top
  a = torch.randn(timing.GEMM_N, timing.GEMM_N)
  return 2.0 * timing.GEMM_N ** 3 / statistics.median(timing.timed(lambda: torch.mm(a, a), 20))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=448)
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--json", default=None, help="also write the figures here")
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top  (fails early without the torch extra)
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  ours, ours_count, ours_flops = jax_step(args.size)
  print(f"ours: built and compiled in {time.perf_counter() - start:.0f} s", flush=True)
  theirs, theirs_count, theirs_flops = torch_step(args.size)
  if ours_count != theirs_count:
    raise SystemExit(f"trainable counts differ: ours {ours_count:,}, PyTorch {theirs_count:,}")
  ours()  # warm-up (the compiled program's first run)
  theirs()
  roofs = {"jax_start": timing.measure_gemm(5)["flops_per_s"], "torch_start": torch_roof()}
  times = {"ours": [], "torch": []}
  for r in range(args.rounds):
    for name in ("ours", "torch") if r % 2 == 0 else ("torch", "ours"):
      call = ours if name == "ours" else theirs
      tic = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - tic)
    print(f"round {r + 1} (load {os.getloadavg()[0]:.2f}): ours {times['ours'][-1]:.2f} s, "
          f"PyTorch {times['torch'][-1]:.2f} s", flush=True)
  roofs.update(jax_end=timing.measure_gemm(5)["flops_per_s"], torch_end=torch_roof())
  ratios = [a / b for a, b in zip(times["ours"], times["torch"])]
  result = {
      "size": args.size, "batch": bench.BATCH, "rounds": args.rounds, "trainable": ours_count,
      "times": times, "ratios": ratios, "ratio_median": statistics.median(ratios),
      "flops": {"ours_xla": ours_flops, "torch_counter": theirs_flops},
      "roofs_gflops": {k: v / 1e9 for k, v in roofs.items()},
      "jax": jax.__version__, "torch": torch.__version__,
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["torch"])
  print(f"\n| size | ours s | PyTorch s | ours / PyTorch (per round) | trainable | GEMM roof "
        f"GFLOP/s: JAX, PyTorch |\n|---|---|---|---|---|---|\n| {args.size} | {ours_s:.2f} | "
        f"{theirs_s:.2f} | {result['ratio_median']:.2f} ({', '.join(f'{x:.2f}' for x in ratios)})"
        f" | {ours_count:,} | {roofs['jax_start'] / 1e9:.0f}-{roofs['jax_end'] / 1e9:.0f}, "
        f"{roofs['torch_start'] / 1e9:.0f}-{roofs['torch_end'] / 1e9:.0f} |")
  print(f"FLOPs per step: ours {ours_flops / 1e9:.1f} G (XLA), PyTorch {theirs_flops / 1e9:.1f} G "
        "(flop_counter)")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
