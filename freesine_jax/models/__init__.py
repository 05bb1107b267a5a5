"""Model construction from a config: `build_model(config)` reads config.model, whose keys and
defaults are declared in configs/base.py (documented in docs/configuration.md)."""
from __future__ import annotations

import jax.numpy as jnp

from freesine_jax import tasks as tasks_lib
from freesine_jax.models import adapters, decoders, swin
from freesine_jax.models.multitask import MultiTaskModel, merge_for_inference

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def swin_spec(mc) -> swin.SwinSpec:
  common = dict(window_size=mc.window_size, patch_size=mc.patch_size,
                drop_path_rate=mc.drop_path_rate)
  if mc.variant == "custom":
    return swin.SwinSpec(embed_dim=mc.embed_dim, depths=tuple(mc.depths),
                         num_heads=tuple(mc.num_heads), **common)
  return swin.SwinSpec.from_variant(mc.variant, **common)


def adapter_spec(mc, num_tasks: int) -> swin.AdapterSpec:
  lora = None
  if mc.lora.rank and mc.lora.rank > 0:
    lora = adapters.LoraSpec(mc.lora.rank, mc.lora.scale, mc.lora.dropout)
  sa = mc.sine_awb
  sine_awb = None
  if sa.enabled:
    sine_awb = adapters.SineAwbSpec(
        kernel_size=sa.kernel_size, w_mode=sa.w_mode, w_init=sa.w_init, scale=sa.scale,
        independent_bases=sa.independent_bases, sine=sine_spec(sa, "model.sine_awb"))
  return swin.AdapterSpec(lora=lora, lora_modules=tuple(mc.lora.modules), sine_awb=sine_awb,
                          sine_awb_modules=tuple(sa.modules), prompts=bool(mc.prompts),
                          num_tasks=num_tasks, lowering=lowering(mc))


def lowering(mc) -> adapters.Lowering:
  """model.compute's task-path fields (the rest, block_remat, goes to the backbone)."""
  c = mc.compute
  result = adapters.Lowering(task_conv=c.task_conv, lowpass_site=c.lowpass_site,
                             task_path_remat=bool(c.task_path_remat))
  if result.task_conv == "winograd" and mc.sine_awb.enabled:
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
                              head_channels=d.head_channels, sine=sine_spec(d, "model.decoder"))


def num_outputs(config) -> dict[str, int]:
  return {t: tasks_lib.output_channels(t, config.num_classes[t] if t in config.num_classes
                                       else None) for t in config.tasks}


def build_model(config) -> MultiTaskModel:
  """The multi-task model for `config.tasks` described by `config.model`."""
  mc = config.model
  for t in config.tasks:
    tasks_lib.get_task(t)
  if mc.dtype not in DTYPES:
    raise ValueError(f"model.dtype={mc.dtype!r} is not one of {sorted(DTYPES)}")
  return MultiTaskModel(
      tasks=tuple(config.tasks), num_outputs=num_outputs(config), swin_spec=swin_spec(mc),
      adapter=adapter_spec(mc, len(config.tasks)), decoder=decoder_spec(mc),
      policy=mc.trainable_backbone, clock_net=mc.clock_net, clock_s_init=mc.clock_s_init,
      clock_c_init=mc.clock_c_init, clock_spread=mc.clock_spread,
      use_task_tokens=mc.prompts or mc.clock_net, dtype=DTYPES[mc.dtype],
      remat=mc.compute.block_remat)


__all__ = ["build_model", "merge_for_inference", "MultiTaskModel", "num_outputs"]
