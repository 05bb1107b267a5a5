"""freesine_jax: Free Sinewich (Sine-AWB adapters on a frozen Swin) in JAX/Flax.

Importing the package sets one XLA:CPU option (XLA_CPU_FLAGS) unless the caller chose it already.
"""
import os as _os

# XLA:CPU (jaxlib 0.10.2) hands reductions to YNNPACK by default. On the train step's
# task-kernel gradients (sums over the task axis of (T, k, k, C_in, C_out) arrays) those ran
# ~10x slower than XLA's own loops, and the whole Free Sinewich step at 224 took ~1.5x as long
# (docs/method.md, "Computation"). YNNPACK keeps the matrix products and elementwise fusions.
# The option only acts if it is in XLA_FLAGS before JAX creates its CPU backend (importing
# freesine_jax first, as every entry point does); TPU and GPU backends ignore it. To keep XLA's
# default, set the option yourself, e.g. XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+dot.
XLA_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


def add_xla_flag(flag: str) -> None:
  """Appends `flag` ('--option=value') to XLA_FLAGS unless the caller set that option already.
  It acts only before JAX creates its backend."""
  option = flag.split("=", 1)[0]
  current = _os.environ.get("XLA_FLAGS", "")
  if option not in current:
    _os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()


add_xla_flag(XLA_CPU_FLAGS)
