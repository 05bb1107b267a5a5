"""Model construction from a config: `builtin_model(config)` reads config.model, whose keys and
defaults are declared in configs/base.py (documented in docs/configuration.md)."""
from __future__ import annotations

import jax.numpy as jnp

from freesine_jax import errors
from freesine_jax import tasks as tasks_lib
from freesine_jax.models import adapters, baselines, decoders, swin
from freesine_jax.models import lora as lora_lib
from freesine_jax.models.multitask import MultiTaskModel, merge_for_inference

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def swin_spec(mc) -> swin.SwinSpec:
  common = dict(window_size=mc.window_size, patch_size=mc.patch_size,
                drop_path_rate=mc.drop_path_rate)
  if mc.variant == "custom":
    return swin.SwinSpec(embed_dim=mc.embed_dim, depths=tuple(mc.depths),
                         num_heads=tuple(mc.num_heads), **common)
  return swin.SwinSpec.from_variant(mc.variant, **common)


TASK_PATHS = ("sine_awb", "task_lora", "dynamic_filter", "none")
TASK_FROZEN_INPUTS = ("task", "shared")


def task_path_spec(mc) -> adapters.TaskPath:
  """The adapters.TaskPath model.task_path names."""
  kind = mc.task_path
  if kind not in TASK_PATHS:
    raise ValueError(f"model.task_path={kind!r} is not one of {TASK_PATHS}")
  if kind == "sine_awb":
    sa = mc.sine_awb
    return adapters.SineAwbSpec(
        kernel_size=sa.kernel_size, w_mode=sa.w_mode, w_init=sa.w_init, scale=sa.scale,
        independent_bases=sa.independent_bases, sine=sine_spec(sa, "model.sine_awb"))
  if kind == "task_lora":
    return lora_lib.TaskLoraSpec(mc.task_lora.rank, float(mc.task_lora.scale), mc.lora.form)
  if kind == "dynamic_filter":
    return lora_lib.DynamicFilterSpec(mc.dynamic_filter.kernel_size, float(mc.lora.scale))
  return adapters.NO_TASK_PATH


def adapter_spec(mc, num_tasks: int, generations: tuple[int, ...] = ()) -> swin.AdapterSpec:
  lora = None
  if mc.lora.rank and mc.lora.rank > 0:
    lora = adapters.LoraSpec(mc.lora.rank, mc.lora.scale, mc.lora.dropout,
                             int(mc.lora.dropout_bits), mc.lora.form)
  if mc.task_frozen_input not in TASK_FROZEN_INPUTS:
    raise ValueError(f"model.task_frozen_input={mc.task_frozen_input!r} is not one of "
                     f"{TASK_FROZEN_INPUTS}")
  return swin.AdapterSpec(lora=lora, lora_modules=tuple(mc.lora.modules),
                          task_path=task_path_spec(mc),
                          task_path_modules=tuple(mc.task_path_modules),
                          prompts=bool(mc.prompts), num_tasks=num_tasks,
                          frozen_on_shared=mc.task_frozen_input == "shared",
                          prompt_norm_every_block=bool(mc.prompt_norm_every_block),
                          compute=task_path_compute(mc), prompt_generations=tuple(generations))


def task_path_compute(mc) -> adapters.TaskPathCompute:
  """model.compute's task-path fields (the rest, block_remat, goes to the backbone)."""
  c = mc.compute
  result = adapters.TaskPathCompute(task_conv=c.task_conv, lowpass_site=c.lowpass_site,
                                    task_path_remat=bool(c.task_path_remat),
                                    task_loop=c.task_loop)
  if result.task_conv == "winograd" and mc.task_path == "sine_awb":
    k = mc.sine_awb.kernel_size + (mc.sine_awb.lowpass_size - 1
                                   if mc.sine_awb.lowpass == "taps_full" else 0)
    if k not in (1, 3):
      raise ValueError(f"model.compute.task_conv='winograd' is F(2x2, 3x3): it needs 3x3 task "
                       f"kernels, but model.sine_awb gives {k}x{k} (kernel_size "
                       f"{mc.sine_awb.kernel_size}, lowpass {mc.sine_awb.lowpass!r})")
  return result


def sine_spec(section, name: str) -> adapters.SineSpec:
  """The modulation + low-pass fields shared by model.sine_awb and model.decoder."""
  return adapters.SineSpec(modulation=section.modulation, omega_0=float(section.omega_0),
                           base_norm=section.base_norm, lowpass=section.lowpass,
                           lowpass_size=section.lowpass_size,
                           lowpass_sigma=float(section.lowpass_sigma), section=name)


def decoder_spec(mc) -> decoders.DecoderSpec:
  d = mc.decoder
  return decoders.DecoderSpec(kind=d.kind, proj_channels=tuple(d.proj_channels),
                              head_channels=d.head_channels, sine=sine_spec(d, "model.decoder"),
                              tspd_grid=d.tspd_grid)


def num_outputs(config) -> dict[str, int]:
  return {t: tasks_lib.output_channels(t, config.num_classes[t] if t in config.num_classes
                                       else None) for t in config.tasks}


def multitask_model(config, tasks, name: str | None = None) -> MultiTaskModel:
  """The model for `tasks` described by `config.model`."""
  mc = config.model
  outputs = num_outputs(config)
  added = tasks_lib.new_tasks(config)
  # 1 for the tasks config.train.new_tasks adds to a trained model (docs/method.md).
  generations = tuple(int(t in added) for t in tasks) if added else ()
  # The frequencies exist only where something reads them: Sine-AWB or the shared decoder.
  frequencies = mc.task_path == "sine_awb" or mc.decoder.kind == "shared"
  return MultiTaskModel(
      tasks=tuple(tasks), num_outputs={t: outputs[t] for t in tasks}, swin_spec=swin_spec(mc),
      adapter=adapter_spec(mc, len(tasks), generations), decoder=decoder_spec(mc),
      trainable_backbone=mc.trainable_backbone, clock_net=mc.clock_net,
      clock_s_init=mc.clock_s_init, clock_c_init=mc.clock_c_init, clock_spread=mc.clock_spread,
      use_task_tokens=mc.prompts or (mc.clock_net and frequencies),
      has_frequencies=frequencies, dtype=DTYPES[mc.dtype],
      block_remat=mc.compute.block_remat, task_generations=generations, name=name)


def builtin_model(config):
  """The multi-task model for `config.tasks` described by `config.model` (with
  model.separate_models, one independent such model per task)."""
  mc = config.model
  for t in config.tasks:
    tasks_lib.get_task(t)
  if mc.dtype not in DTYPES:
    raise ValueError(f"model.dtype={mc.dtype!r} is not one of {sorted(DTYPES)}")
  if mc.separate_models:
    if tasks_lib.new_tasks(config):
      raise errors.UserError("config.train.new_tasks: model.separate_models trains one model "
                             "per task already; train the new task as its own run")
    return baselines.SeparateModels(tuple(config.tasks),
                                    lambda task, name: multitask_model(config, (task,), name))
  return multitask_model(config, config.tasks)


__all__ = ["builtin_model", "merge_for_inference", "MultiTaskModel", "num_outputs"]
