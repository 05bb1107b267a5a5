"""Where the train step's compile time goes: its parts lowered and compiled one after another.

  python -m benchmarks.compile_parts --size 224 --parts step,forward,grad,update \
      --variants base,no_task_remat

In one process (compile cache off), for each variant (config overrides from VARIANTS; --xla:
XLA options of every compilation) and each part of train.make_train_step:
  forward  the training forward pass and the loss (no gradient),
  grad     value_and_grad of the loss (forward + backward),
  update   the optimizer alone (tx.update + apply_updates on the parameter tree),
  step     the whole jitted step (as training runs it),
prints tracing+lowering seconds, XLA compile seconds and StableHLO ops, one JSON line per part.
The machine is shared: compare parts and variants of one run as ratios, not seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import run as bench  # pylint: disable=g-import-not-at-top,wrong-import-position

# name -> config overrides (XLA options come from --xla, for every compilation of the run)
VARIANTS = {
    "base": (),
    "no_task_remat": (("model.compute.task_path_remat", False),),
    "no_task_path": (("model.task_path", "none"),),
    "no_prompts": (("model.prompts", False),),
    "no_clock_net": (("model.clock_net", False),),
    "no_lora": (("model.lora.rank", 0),),
    "block_remat": (("model.compute.block_remat", "blocks"),),
    "full_ft": bench.FULL_FINE_TUNING,
}


def parts(variant: str, size: int, wanted: list[str], options: dict) -> list[dict]:
  import optax  # pylint: disable=g-import-not-at-top
  from freesine_jax import losses  # pylint: disable=g-import-not-at-top
  from freesine_jax import train  # pylint: disable=g-import-not-at-top
  built = bench.build_train_case(
      bench.case_config(bench.Case(variant, "r64", VARIANTS[variant]), size))
  model, tx, state = built.model, built.tx, built.state
  tasks = tuple(built.config.tasks)
  weights = train.loss_weights(built.config)
  key = jax.random.key(0)

  def loss_fn(params, batch_stats, backbone, batch):
    outputs, _ = model.apply({"backbone": backbone, "params": params, "batch_stats": batch_stats},
                             batch["image"], train=True, rngs={"dropout": key, "drop_path": key},
                             mutable=["batch_stats"])
    return losses.multitask_loss(outputs, batch, tasks, weights)[0]

  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  args = (state.params, state.batch_stats, built.backbone, built.batch)
  lowerings = {
      "forward": lambda: jax.jit(loss_fn).lower(*args),
      "grad": lambda: jax.jit(jax.value_and_grad(loss_fn)).lower(*args),
      "update": lambda: jax.jit(update).lower(state.params, state.opt_state, state.params),
      "step": lambda: built.step.lower(state, built.batch, built.backbone),
  }
  out = []
  for part in wanted:
    load = round(os.getloadavg()[0], 2)
    _, timing = bench.lower_and_compile(lowerings[part], options)
    result = {"variant": variant, "size": size, "load": load, "part": part,
              "lower_s": round(timing["lower_s"], 2),
              "xla_s": round(timing["compile_s"] - timing["lower_s"], 2),
              "hlo_ops": timing["hlo_ops"]}
    print("PART " + json.dumps(result), flush=True)
    out.append(result)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--parts", default="step")
  parser.add_argument("--variants", default="base")
  parser.add_argument("--xla", default="",
                      help="JSON {option: value} of XLA options for every compilation")
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  options = json.loads(args.xla) if args.xla else {}
  for variant in args.variants.split(","):
    parts(variant, args.size, args.parts.split(","), options)


if __name__ == "__main__":
  main()
