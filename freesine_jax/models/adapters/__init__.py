"""Adapters: the shared LoRA (TA module), Sine-AWB (TS module), the task-path protocol and the
Clock Net, one concern per file:

  spec.py      the choices, LoraSpec, TaskPathCompute (config model.compute), MERGED; validation
  maths.py     Sine-AWB's maths: fuse A.W.B -> normalise and modulate (SineSpec) -> low-pass
  lowering.py  applying task kernels: the 'gemm' / 'conv' / 'winograd' modes (TASK_CONV_MODES)
  sine_awb.py  Sine-AWB: SineAwbSpec (config model.sine_awb), sine_awb_outputs, the SineAWB module
  dense.py     AdaptedDense (frozen linear + shared LoRA + task path), the TaskPath protocol
  clock.py     the Clock Net (bounded task frequencies)

Shapes follow Flax conventions: a linear kernel is (C_in, C_out), a conv kernel is HWIO
(k, k, C_in, C_out). The names below are the package's API (`adapters.SineAWB`, ...).
"""
from freesine_jax.models.adapters.clock import ClockNet, clock_offsets, clock_offsets_by_round
from freesine_jax.models.adapters.dense import (NO_TASK_PATH, AdaptedDense, NoTaskPath, TaskPath,
                                                TaskPathLayer, cached_weight, inference_cache,
                                                lora_a_init)
from freesine_jax.models.adapters.lowering import (TASK_CONV_MODES,
                                                   apply_prepared_kernels, apply_task_kernels,
                                                   gather_taps, kernel_layout,
                                                   lowpass_on_activations, prepare_task_kernels,
                                                   sum_taps)
from freesine_jax.models.adapters.maths import (SineSpec, base_rms, channel_blur,
                                                finished_kernels, fuse_awb, gaussian_1d,
                                                gaussian_lowpass, layout_axes, modulate,
                                                modulated_kernels, sine_awb_kernels)
from freesine_jax.models.adapters.sine_awb import SineAWB, SineAwbSpec, sine_awb_outputs
from freesine_jax.models.adapters.spec import (BASE_NORMS, KERNEL_LAYOUTS, LOWPASS_MODES,
                                               LOWPASS_SITES, MERGED, MODULATIONS, TASK_CONVS,
                                               TASK_LOOPS, LoraSpec, TaskPathCompute)

__all__ = [
    "AdaptedDense", "BASE_NORMS", "ClockNet", "KERNEL_LAYOUTS", "LOWPASS_MODES", "LOWPASS_SITES",
    "LoraSpec", "TaskPathCompute", "MERGED", "MODULATIONS", "NO_TASK_PATH", "NoTaskPath", "SineAWB",
    "SineAwbSpec", "SineSpec", "TASK_CONVS", "TASK_CONV_MODES", "TASK_LOOPS", "TaskPath",
    "TaskPathLayer", "apply_prepared_kernels", "apply_task_kernels", "base_rms",
    "cached_weight", "channel_blur", "clock_offsets", "clock_offsets_by_round",
    "finished_kernels", "fuse_awb", "gather_taps", "gaussian_1d", "gaussian_lowpass",
    "inference_cache", "kernel_layout", "layout_axes", "lora_a_init", "lowpass_on_activations",
    "modulate", "modulated_kernels", "prepare_task_kernels", "sine_awb_kernels",
    "sine_awb_outputs", "sum_taps",
]
