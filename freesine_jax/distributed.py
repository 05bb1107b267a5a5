"""The host process: when to join a multi-host job, when every host stops to save, and giving
freed heap back to the OS.

* `initialize_args` decides from the command line and the environment whether this process is
  one of several (jax.distributed.initialize) and with which arguments: explicit
  --coordinator_address/--num_processes/--process_id (launch/local_multiprocess.sh), --multihost
  (JAX detects a Cloud TPU VM, SLURM or Open MPI; launch/tpu_vm.sh passes it), or, without
  flags, a SLURM job step of several tasks (launch/slurm.sbatch) or a TPU slice whose
  TPU_WORKER_HOSTNAMES names several workers.
* `preemption_watch` turns SIGTERM (a TPU maintenance event, a SLURM time limit, `docker stop`)
  into "stop after this step": the training loop then saves a checkpoint and returns, and the
  process exits 0; rerunning the command resumes. With several processes the signal may reach
  only some hosts, at different steps: JAX's preemption service (started by
  jax.distributed.initialize, which catches SIGTERM itself) names one step at which every host
  stops, so they save the same checkpoint together.
* `release_freed_host_memory` returns the heap glibc keeps after XLA:CPU's compilation frees it
  (the training loop calls it after its first step, benchmarks.run after each compilation).
"""
from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from typing import Callable, Iterator, Mapping

import jax
from jax.experimental import multihost_utils

from freesine_jax import errors


def initialize_args(*, coordinator_address: str | None, num_processes: int | None,
                    process_id: int | None, multihost: bool,
                    environ: Mapping[str, str]) -> dict | None:
  """Keyword arguments of jax.distributed.initialize for this process, or None when it runs
  alone. Inconsistent flags are a one-line UserError."""
  explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id}
  given = [name for name, value in explicit.items() if value is not None]
  if given:
    missing = [name for name, value in explicit.items() if value is None]
    if missing:
      raise errors.UserError(
          f"{' and '.join(given)} without {' and '.join(missing)}: a process joins a job with "
          "all three, e.g. --coordinator_address=127.0.0.1:12355 --num_processes=2 "
          "--process_id=0 (launch/local_multiprocess.sh)")
    if multihost:
      raise errors.UserError("--multihost asks JAX to find the job in the environment, but "
                             "--coordinator_address names it; pass one or the other")
    if not 0 <= process_id < num_processes:
      raise errors.UserError(f"--process_id={process_id} is not in 0..{num_processes - 1} "
                             f"(--num_processes={num_processes})")
    return {"coordinator_address": coordinator_address, "num_processes": num_processes,
            "process_id": process_id}
  if multihost:
    return {}
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NODELIST" in environ:
    return {}  # an srun step of several tasks: JAX reads the job from SLURM's variables
  if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
    return {}  # a multi-host TPU slice
  return None


def initialize(args: dict | None) -> None:
  """jax.distributed.initialize(**args) (nothing when `args` is None); JAX finding no job to
  join under --multihost is a one-line UserError."""
  if args is None:
    return
  try:
    jax.distributed.initialize(**args)
  except ValueError as e:
    if args:
      raise
    raise errors.UserError(
        f"--multihost: JAX found no TPU VM, SLURM or Open MPI job to join ({e}); on other "
        "machines pass --coordinator_address, --num_processes and --process_id") from None


@contextlib.contextmanager
def preemption_watch() -> Iterator[Callable[[int], bool]]:
  """Yields `stop(step) -> bool`, True at the step where training should save and stop because
  SIGTERM arrived; the loop calls it after every step, with the same step on every host.

  One process: a SIGTERM handler (restored on exit) sets a flag. Several: JAX's preemption
  service, which needs every host to ask at every step.
  """
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  requested = threading.Event()
  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
  try:
    yield lambda step: requested.is_set()
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def release_freed_host_memory() -> bool:
  """Returns the heap that glibc malloc keeps after frees to the OS (malloc_trim(0)).

  XLA:CPU's compilation of the train step allocates and frees ~1-2 GiB of small blocks (measured
  in docs/benchmarks.md); glibc keeps that freed heap resident, so without this the steps'
  temporaries come on top of it. False where there is no glibc (nothing to do).
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.malloc_trim(0))
  except (OSError, AttributeError):
    return False
