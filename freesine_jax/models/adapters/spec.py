"""The adapters' specs and their validation: the named choices, the shared LoRA's spec and how
the task path is computed (`TaskPathCompute`, config model.compute). Validation errors name the config
key at fault."""
from __future__ import annotations

import dataclasses

from freesine_jax.models import dora
from freesine_jax.models.layers import MASK_BITS

MODULATIONS = ("sine", "linear")
BASE_NORMS = ("tap_rms", "rms", "none")
LOWPASS_MODES = ("matrix", "taps", "taps_full", "none")
TASK_CONVS = ("gemm", "conv", "winograd")
LOWPASS_SITES = ("auto", "kernel", "activations")
TASK_LOOPS = ("stacked", "scan")
# Orders of a task kernel's axes: 'uvio' (k, k, C_in, C_out) is the API's (HWIO, what the
# inference cache and the exported models hold); 'iuvo' (C_in, k, k, C_out) is what the 'gemm'
# lowering that stacks the taps on the output multiplies by, so the task path builds its kernels
# in that order there (see kernel_layout).
KERNEL_LAYOUTS = ("uvio", "iuvo")
# Variable collection of weights that depend on the parameters only (the merged shared LoRA, the
# finished task kernels). Filled once by MultiTaskModel.merge_for_inference; when present, the
# layers read it instead of rebuilding the weights for every batch.
MERGED = "merged"


def check_choice(section, field, value, allowed):
  if value not in allowed:
    raise ValueError(f"{section}.{field}={value!r} is not one of {allowed}")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  scale: float = 4.0
  dropout: float = 0.05
  dropout_bits: int = 8  # random bits per dropout-mask entry (layers.bernoulli_mask)
  form: str = "lora"  # 'lora': W0 + scale A B; 'dora': FAAR's DoRA form (models/dora.py)

  def __post_init__(self):
    check_choice("model.lora", "dropout_bits", self.dropout_bits, MASK_BITS)
    check_choice("model.lora", "form", self.form, dora.FORMS)


@dataclasses.dataclass(frozen=True)
class TaskPathCompute:
  """How the task path is computed: exact rewrites of one function (config model.compute).

  task_conv: how the per-task k x k kernels are applied. 'gemm' (CPU default): one GEMM per task
    whose contraction runs over the k*k taps stacked with the channels (im2col on the input
    when C_in <= C_out, else the taps stacked on the output and shift-added). 'conv': one
    lax.conv_general_dilated with the tasks as feature groups (the TPU/GPU recommendation:
    native convolution units, no k*k-times copy of the activations). 'winograd': F(2x2, 3x3),
    2.25x fewer multiplies, 3x3 kernels only; float32 error measured in docs/benchmarks.md.
  lowpass_site: where the 'matrix' low-pass acts. It is linear along the channel axes, so
    conv(x, G K G) = G-blur(conv(G-blur(x), K)) exactly: 'kernel' smooths the T k^2 C_in C_out
    kernels, 'activations' the T B H W (C_in + C_out) activations; 'auto' picks the smaller
    per layer (at 448 x 448, batch 2: the kernels at stages 1-2, the activations at 3-4). The
    frozen linear folds into the kernel's centre tap only when the kernel is smoothed.
  task_path_remat: the backward pass recomputes each layer's task kernels (and im2col copies)
    instead of keeping them (and the sine's cosines) from the forward: per layer only the input,
    the factors and the frequencies are kept (layers.recompute_in_backward).
  task_loop: 'stacked' computes every task's kernels and outputs in one batched computation;
    'scan' one task after another (lax.scan over the tasks), so a layer's kernel-sized
    temporaries (the kernels, their sine and cosine, their gradient) exist for one task at a
    time: T times less of them in the backward pass, one copy of the layer in the program.
  """
  task_conv: str = "gemm"
  lowpass_site: str = "auto"
  task_path_remat: bool = True
  task_loop: str = "stacked"

  def __post_init__(self):
    check_choice("model.compute", "task_conv", self.task_conv, TASK_CONVS)
    check_choice("model.compute", "lowpass_site", self.lowpass_site, LOWPASS_SITES)
    check_choice("model.compute", "task_loop", self.task_loop, TASK_LOOPS)
