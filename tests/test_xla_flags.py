"""The XLA:CPU option freesine_jax sets on import (freesine_jax/__init__.py)."""
import os
import subprocess
import sys

import pytest

import freesine_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import os, freesine_jax, jax, jax.numpy as jnp; "
         "x = jnp.ones((4, 9, 256, 128)); "
         "text = jax.jit(lambda x: jnp.sum(x * x, axis=0)).lower(x).compile().as_text(); "
         "print(os.environ.get('XLA_FLAGS', '')); print('ynn' if '__ynn_fusion' in text else 'xla')")


def probe(xla_flags: str | None) -> tuple[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=dict(env, PYTHONPATH=REPO),
                       capture_output=True, text=True, check=True, timeout=300).stdout.split("\n")
  return out[0], out[1]


def test_reductions_leave_ynnpack_and_a_callers_choice_is_kept():
  """Imported first, freesine_jax adds its option to the caller's XLA_FLAGS and XLA:CPU then
  compiles a reduction itself; a caller who set the option (here: XLA's default list, '+dot')
  keeps it, and the reduction is YNNPACK's again, which also shows the option is what moved it."""
  flags, compiled_by = probe("--xla_force_host_platform_device_count=2")
  assert flags == f"--xla_force_host_platform_device_count=2 {freesine_jax.XLA_CPU_FLAGS}"
  assert compiled_by == "xla"
  assert probe(None) == (freesine_jax.XLA_CPU_FLAGS, "xla")
  mine = "--xla_cpu_experimental_ynn_fusion_type=+dot"
  assert probe(mine) == (mine, "ynn")


# The test suite's own XLA level (tests/conftest.py): level 0 here, XLA's default in a
# `default_codegen` test, which the suite runs as a child pytest at that level.
def codegen_of_this_process() -> tuple[str | None, bool]:
  import conftest  # pylint: disable=g-import-not-at-top
  return (os.environ.get(conftest.CODEGEN_ENV),
          conftest.FAST_CODEGEN_FLAG in os.environ.get("XLA_FLAGS", "").split())


def test_the_suite_compiles_at_level_0():
  import conftest  # pylint: disable=g-import-not-at-top
  if not conftest.FAST_CODEGEN:
    assert codegen_of_this_process() == ("default", False)
  else:
    assert codegen_of_this_process() == (None, True)


@pytest.mark.default_codegen
def test_a_default_codegen_test_runs_at_xlas_default_level():
  assert codegen_of_this_process() == ("default", False)
