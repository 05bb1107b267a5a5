"""Model construction from a config: `build_model(config)` and the default `model_config()`."""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from freesine_jax import tasks as tasks_lib
from freesine_jax.models import adapters, decoders, swin
from freesine_jax.models.multitask import MultiTaskModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_config(rank: int = 64, variant: str = "swin_t") -> ml_collections.ConfigDict:
  """Free Sinewich defaults (docs/design.md §1); each field is documented in docs/method.md."""
  return ml_collections.ConfigDict(dict(
      name="free_sinewich",
      variant=variant,            # swin_t | swin_s | swin_b | swin_l | custom
      embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),  # used when variant=custom
      window_size=7,
      patch_size=4,
      drop_path_rate=0.2,
      backbone_weights="",        # converted dir or source file ('' = random init)
      backbone_layout="",         # '' = detect; ms | timm | hf (docs/pretrained.md)
      trainable_backbone="norms_relpos_embed",  # none | norms_relpos_embed | mtlora | all
      dtype="float32",
      lora=dict(rank=rank, scale=4.0, dropout=0.05, modules=("qkv", "proj", "fc1", "fc2")),
      # Sine-AWB, the task-specific path (adapters.SineAWB): per task
      # K_t = lowpass((rho/omega_0) sin(omega_0 omega_t A.W.B / rho)), rho = RMS(A.W.B).
      sine_awb=dict(enabled=True, modules=("proj", "fc1", "fc2"), kernel_size=3, w_mode="full",
                    w_init="identity", scale=4.0, independent_bases=False,
                    modulation="sine", omega_0=3.0, base_norm="tap_rms",
                    lowpass="matrix", lowpass_size=7, lowpass_sigma=1.0),
      prompts=True,               # task tokens join window attention
      # Clock Net omega_t = s (tanh(W_q ReLU(p_t) + phi_t) + c); tanh(phi_t) evenly spaced in
      # [-clock_spread, clock_spread]. Without it (clock_net=False, "w/o LCN") each task has a
      # learnable frequency initialised to the same values s (c + tanh(phi_t)).
      clock_net=True,
      clock_s_init=1.0, clock_c_init=1.0, clock_spread=0.5,
      decoder=dict(kind="shared", proj_channels=(18, 36, 72, 144), head_channels=1080,
                   modulation="sine", omega_0=3.0, base_norm="tap_rms",
                   lowpass="matrix", lowpass_size=7, lowpass_sigma=1.0),
  ))


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
                          num_tasks=num_tasks)


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
  num_classes = dict(config.get("num_classes", {}) or {})
  return {t: tasks_lib.output_channels(t, num_classes.get(t)) for t in config.tasks}


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
      use_task_tokens=mc.prompts or mc.clock_net, dtype=DTYPES[mc.dtype])


__all__ = ["build_model", "model_config", "MultiTaskModel", "num_outputs"]
