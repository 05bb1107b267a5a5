"""Where a compiled program's time goes: XLA's own per-op trace, grouped by what the ops compute.

  python -m benchmarks.op_profile [--size=448] [--reps=3]    # our Swin-T forward, batch 2

Runs the compiled program under jax.profiler, reads the trace back (jax.profiler.ProfileData),
and attributes every executed HLO instruction's duration to a group named from its metadata
(the Flax module path and the JAX primitive it came from): the linear layers' GEMMs (with the
LayerNorm, bias and activation XLA fused into them), the attention's batched matmuls, GELU's erf,
the softmax, the window partition / shift copies, and so on. FLOPs per group are counted from
the optimized HLO's dot and convolution shapes, so each group's GFLOP/s can be read against the
dense-GEMM roof measured in the same process. benchmarks.run calls `profile_ops` for the Swin-T
rows of docs/benchmarks.md.

Durations are per op as the XLA:CPU runtime traced them. The runtime runs independent ops on
its threads at once (and an op whose work waits for a busy thread is still running), so each
instant is shared equally by the ops running at it ("time-sliced"): the groups add up to the
time any op ran, and the sum of raw durations (overlaps counted in full) is reported beside it.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+?(?:\{[^}]*\})?) ([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_PARAM = re.compile(r"([\w.\-]+): ([a-z]\w*\[[\d,]*\])")


# op_name scopes of jax.random's bit generation (the primitives and the jitted helpers that
# draw a dropout or drop-path mask).
RNG_SCOPES = ("threefry2x32", "rng_bit_generator", "random_bits", "jit(_uniform)",
              "jit(_bernoulli)")


@dataclasses.dataclass
class Instruction:
  opcode: str
  op_name: str  # metadata op_name: "jit(f)/Module/path/primitive"
  calls: tuple[str, ...]
  flops: float  # of its own dot / convolution (fusions: see Module.flops)
  gemm: tuple[int, int, int] | None = None  # (M, K, N) of a dot without batch dimensions


def _dims(shape: str) -> list[int] | None:
  match = _SHAPE.match(shape)
  if not match:
    return None
  return [int(d) for d in match.group(1).split(",") if d]


def _dot(rest: str, out_dims: list[int], shapes: dict[str, list[int]]
         ) -> tuple[float, tuple[int, int, int] | None]:
  """(FLOPs, (M, K, N) if it is a plain matrix product) of a dot instruction."""
  operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
  lhs = shapes.get(operands[0]) if operands else None
  if lhs is None or contracting is None or not out_dims:
    return 0.0, None
  k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
  plain = "lhs_batch_dims" not in rest
  gemm = (math.prod(out_dims) // out_dims[-1], k, out_dims[-1]) if plain else None
  return 2.0 * math.prod(out_dims) * k, gemm


def _conv_flops(rest: str, out_dims: list[int], shapes: dict[str, list[int]]) -> float:
  operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
  labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
  kernel = shapes.get(operands[1]) if len(operands) > 1 else None
  if kernel is None or labels is None:
    return 0.0
  # kernel dims labelled e.g. "01io" (its input-feature dim is already per group): each
  # output element takes one multiply-add per kernel element of its output feature.
  per_output = math.prod(n for n, label in zip(kernel, labels.group(1)) if label != "o")
  return 2.0 * math.prod(out_dims) * per_output


class Module:
  """The optimized HLO text of a compiled program, indexed by instruction name."""

  def __init__(self, text: str):
    self.instructions: dict[str, Instruction] = {}
    self.computations: dict[str, list[str]] = collections.defaultdict(list)
    shapes: dict[str, list[int]] = {}
    current = None
    for line in text.splitlines():
      header = _COMPUTATION.match(line)
      if header:
        current, shapes = header.group(1), {}
        for name, shape in _PARAM.findall(header.group(2)):
          shapes[name] = _dims(shape) or []
        continue
      match = _INSTRUCTION.match(line)
      if not match or current is None:
        continue
      name, shape, opcode, rest = match.groups()
      dims = _dims(shape)
      if dims is not None:
        shapes[name] = dims
      flops, gemm = 0.0, None
      if opcode == "dot" and dims is not None:
        flops, gemm = _dot(rest, dims, shapes)
      elif opcode == "convolution" and dims is not None:
        flops = _conv_flops(rest, dims, shapes)
      op_name = re.search(r'op_name="([^"]*)"', rest)
      calls = re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", rest)
      self.instructions[name] = Instruction(opcode, op_name.group(1) if op_name else "",
                                            tuple(calls), flops, gemm)
      self.computations[current].append(name)

  def _inside(self, name: str) -> list[Instruction]:
    """The instruction and, for a fusion or call, every instruction it calls (recursively)."""
    found, todo, seen = [], [name], set()
    while todo:
      instruction = self.instructions[todo.pop()]
      found.append(instruction)
      for computation in instruction.calls:
        if computation not in seen:
          seen.add(computation)
          todo.extend(self.computations.get(computation, ()))
    return found

  def flops(self, name: str) -> float:
    return sum(i.flops for i in self._inside(name))

  def gemms(self, name: str) -> list[tuple[int, int, int]]:
    return [i.gemm for i in self._inside(name) if i.gemm is not None]

  def op_name(self, name: str) -> str:
    """Its metadata op_name, or (a fusion without one) that of the first fused op with one."""
    return next((i.op_name for i in self._inside(name) if i.op_name), "")

  def primitives(self, name: str) -> set[str]:
    """The JAX primitives (last op_name component) of the instruction and all it fuses."""
    return {i.op_name.rsplit("/", 1)[-1] for i in self._inside(name) if i.op_name} or {
        self.instructions[name].opcode}

  def draws_random_bits(self, name: str) -> bool:
    """Whether the instruction computes random bits (or fuses their computation): any of its
    ops traced inside jax.random's bit generation (threefry2x32 / rng_bit_generator, under
    _uniform / _bernoulli) — the dropout and drop-path masks in a train step."""
    return any(marker in i.op_name for i in self._inside(name) for marker in RNG_SCOPES)

  def matmul_op_name(self, name: str) -> str | None:
    """op_name of the dot / convolution an instruction computes (itself or fused), if any."""
    for instruction in self._inside(name):
      if instruction.opcode in ("dot", "convolution"):
        return instruction.op_name
    return None


def swin_group(module: Module, name: str) -> str:
  """The group of one executed instruction of a Swin forward (see the module docstring)."""
  instruction = module.instructions[name]
  matmul = module.matmul_op_name(name)
  if matmul is not None:
    if "bhqd,bhkd->bhqk" in matmul:
      return "attention q.k (batched 49x49 matmuls)"
    if "bhqk,bhkd->bqhd" in matmul:
      return "attention a.v (batched 49x49 matmuls)"
    if "patch_embed" in matmul:
      return "patch embedding (4x4 stride-4 conv)"
    return "linear layers (qkv, proj, fc1, fc2, reduction) incl. fused LayerNorm/bias"
  op_name = module.op_name(name)
  where = op_name.rsplit("/", 1)[0]
  fused = module.primitives(name)  # every JAX primitive XLA fused into this op
  if fused & {"erf", "erfc"}:
    return "GELU (erf)"
  if "exp" in fused and "attn" in where:
    return "softmax (+ bias, mask)"
  if "rsqrt" in fused or "norm" in where:
    return "LayerNorm (unfused)"
  if fused <= {"transpose", "reshape", "concatenate", "slice", "copy", "gather", "pad",
               "dynamic_slice", "rev", "broadcast_in_dim", "squeeze", "convert_element_type"}:
    return "window partition / shift / layout copies"
  if fused <= {"add", "mul", "transpose", "reshape", "slice", "concatenate", "broadcast_in_dim",
               "copy", "squeeze", "convert_element_type", "dot_general"}:
    # (a 'dot_general' here is a bias add XLA split off its matmul, which carries that name)
    return "residual and bias adds (and the copies fused with them)"
  return f"other ({', '.join(sorted(fused)) or instruction.opcode})"


def train_group(module: Module, name: str) -> str:
  """The group of one executed instruction of a Free Sinewich train step: what it computes
  (the task path's scopes are named in adapters.sine_awb_outputs) and whether it belongs to
  the forward pass or the backward pass (JAX's 'transpose(...)' in its op_name)."""
  op_name = module.matmul_op_name(name) or module.op_name(name)
  backward = "transpose(" in op_name
  if "kernel_build" in op_name:
    what = "task kernels: build (A W B fuse, sin, low-pass)"
  elif "kernel_apply" in op_name:
    what = "task kernels: apply (k x k GEMMs, shifts)"
  elif "MultiTaskModel" not in op_name:
    return "losses, gradient clipping, AdamW"
  elif "/head" in op_name:
    what = "decoders"
  elif "bhqd,bhkd" in op_name or "bhqk,bhkd" in op_name:
    what = "attention matmuls"
  elif module.matmul_op_name(name) is not None and "backbone" in op_name:
    what = "frozen linear layers + shared LoRA"
  elif "backbone" in op_name:
    what = "rest of Swin (norms, GELU, softmax, windows, adds, dropout)"
  else:
    what = "clock net, prompts, other"
  return f"{what}, {'backward' if backward else 'forward'}"


@dataclasses.dataclass
class Group:
  name: str
  seconds: float  # per call, time-sliced: each instant shared by the ops running at it
  flops: float  # per call
  gemms: dict[tuple[int, int, int], int] = dataclasses.field(default_factory=dict)
  # (M, K, N) -> how many times per call its plain matrix products ran
  summed: float = 0.0  # per call, its ops' durations added up (overlaps counted in full)

  @property
  def gflops_per_s(self) -> float:
    return self.flops / self.seconds / 1e9 if self.seconds and self.flops else 0.0


def profile_ops(call: Callable[[], Any], hlo_text: str, reps: int,
                group: Callable[[Module, str], str] = swin_group) -> dict[str, Any]:
  """Runs `call` (a compiled program on its arguments, already run once) `reps` times under
  the profiler: {'wall_s': mean wall time per call under the profiler, 'op_s': time-sliced op
  time per call (time_sliced), 'summed_s': the ops' durations added up, 'flops': per call,
  'groups': [Group...] largest first}. `hlo_text`: the program's
  optimized HLO (compiled.as_text())."""
  import jax  # pylint: disable=g-import-not-at-top
  module = Module(hlo_text)
  trace_dir = tempfile.mkdtemp(prefix="op_profile_")
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(reps):
    jax.block_until_ready(call())
  wall = (time.perf_counter() - start) / reps
  jax.profiler.stop_trace()
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  data = jax.profiler.ProfileData.from_file(path)
  shutil.rmtree(trace_dir, ignore_errors=True)
  flops, summed = collections.Counter(), collections.Counter()
  gemms = collections.defaultdict(collections.Counter)
  intervals = []  # (start ns, end ns, group)
  kinds = []  # (start ns, end ns, 'matmul' | 'random bits' | 'other')
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        instruction = module.instructions.get(event.name)
        if instruction is None or instruction.opcode in CONTROL_FLOW:
          continue  # not an op, or a loop / call whose body's ops are traced themselves
        key = group(module, event.name)
        intervals.append((event.start_ns, event.end_ns, key))
        kinds.append((event.start_ns, event.end_ns, op_kind(module, event.name)))
        summed[key] += event.duration_ns * 1e-9 / reps
        flops[key] += module.flops(event.name) / reps
        gemms[key].update(module.gemms(event.name))
  seconds = {k: v / reps for k, v in time_sliced(intervals).items()}
  groups = sorted((Group(k, seconds[k], flops[k], {s: n // reps for s, n in gemms[k].items()},
                         summed[k]) for k in seconds), key=lambda g: -g.seconds)
  return {"wall_s": wall, "op_s": sum(seconds.values()), "summed_s": sum(summed.values()),
          "flops": sum(flops.values()), "groups": groups,
          "kinds": {k: v / reps for k, v in time_sliced(kinds).items()}}


def op_kind(module: Module, name: str) -> str:
  """'matmul' (a dot or convolution, with what XLA fused into it), 'random bits'
  (Module.draws_random_bits) or 'other': the split whose shares benchmarks.run reports, so that
  a regression in the non-matmul or the RNG work shows."""
  if module.matmul_op_name(name) is not None:
    return "matmul"
  return "random bits" if module.draws_random_bits(name) else "other"


CONTROL_FLOW = ("while", "conditional", "call")


def time_sliced(intervals: list[tuple[int, int, str]]) -> dict[str, float]:
  """Seconds per group with each instant shared equally by the ops running at it: ops that
  overlap (the runtime runs independent ops on its threads at once, and an op waiting for a
  thread is 'running' too) split the time between them, so the groups sum to the time any op
  ran, not to more than the wall time."""
  points = sorted([(start, 1, i) for i, (start, _, _) in enumerate(intervals)]
                  + [(end, 0, i) for i, (_, end, _) in enumerate(intervals)])
  out, active, previous = collections.Counter(), set(), None
  for t, starts, i in points:
    if active and t > previous:
      share = (t - previous) * 1e-9 / len(active)
      for j in active:
        out[intervals[j][2]] += share
    previous = t
    (active.add if starts else active.discard)(i)
  return dict(out)


def time_gemms(gemms: dict[tuple[int, int, int], int], reps: int) -> dict[str, float]:
  """The same matrix products alone, each shape a jitted float32 jnp.dot (median of `reps`
  after a warm-up), times how often it runs: {'seconds', 'flops'} per call of the program."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  seconds = flops = 0.0
  matmul = jax.jit(jnp.dot)
  for (m, k, n), count in gemms.items():
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    seconds += count * statistics.median(timing.timed(lambda: matmul(a, b), reps))
    flops += count * 2.0 * m * k * n
  return {"seconds": seconds, "flops": flops}


def swin_backbone():
  """Our Swin-T without adapters (every weight a parameter), as benchmarks.run measures it."""
  from freesine_jax.models import swin  # pylint: disable=g-import-not-at-top
  spec = swin.SwinSpec.from_variant("swin_t", window_size=7, patch_size=4, drop_path_rate=0.0)
  return swin.SwinBackbone(spec, swin.AdapterSpec(), trainable_backbone="all")


def swin_forward(size: int, batch: int = 2):
  """(compiled forward of swin_backbone(), its (params, images)): random weights and images."""
  import jax  # pylint: disable=g-import-not-at-top
  backbone = swin_backbone()
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  params = jax.jit(backbone.init)(jax.random.key(1), images)
  compiled = jax.jit(lambda p, x: backbone.apply(p, x)).lower(params, images).compile()
  return compiled, (params, images)


def as_json(result: dict[str, Any]) -> dict[str, Any]:
  """profile_ops' result as plain JSON (what benchmarks.run records)."""
  return {"wall_s": result["wall_s"], "op_s": result["op_s"], "summed_s": result["summed_s"],
          "flops": result["flops"], "kinds": result["kinds"],
          "groups": [{"name": g.name, "seconds": g.seconds, "flops": g.flops, "summed": g.summed}
                     for g in result["groups"]]}


def linear_alone(result: dict[str, Any], reps: int) -> dict[str, float]:
  """time_gemms of the Swin forward's linear-layer group (swin_group)."""
  linear = next(g for g in result["groups"] if g.name.startswith("linear layers"))
  return {**time_gemms(linear.gemms, reps), "count": sum(linear.gemms.values())}


def format_groups(result: dict[str, Any], roof: float | None = None) -> list[str]:
  total = result["op_s"]
  lines = []
  for g in result["groups"]:
    rate = f"{g.gflops_per_s:7.1f} GFLOP/s" if g.flops else " " * 15
    share = f" ({100 * g.gflops_per_s / roof:3.0f} % of roof)" if roof and g.flops else ""
    lines.append(f"{100 * g.seconds / total:5.1f} %  {1e3 * g.seconds:8.1f} ms  "
                 f"{g.flops / 1e9:7.1f} GFLOP  {rate}{share}  {g.name}")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=448)
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  compiled, call_args = swin_forward(args.size)
  jax.block_until_ready(compiled(*call_args))
  roof = timing.measure_gemm(3)["flops_per_s"] / 1e9
  result = profile_ops(lambda: compiled(*call_args), compiled.as_text(), args.reps)
  print(f"Swin-T forward {args.size}x{args.size}, batch 2: {result['wall_s']:.3f} s per call "
        f"under the profiler, {result['op_s']:.3f} s of op time (time-sliced; "
        f"{result['summed_s']:.3f} s of durations added up); GEMM roof {roof:.1f} GFLOP/s; "
        f"load {os.getloadavg()[0]:.2f}")
  print("\n".join(format_groups(result, roof)))
  alone = linear_alone(result, max(args.reps, 5))
  rate = alone["flops"] / alone["seconds"] / 1e9
  print(f"the linear layers' {alone['count']} matrix products alone (plain jnp.dot "
        f"at their shapes): {1e3 * alone['seconds']:.1f} ms, {rate:.1f} GFLOP/s "
        f"({100 * rate / roof:.0f} % of roof); the forward's FLOPs in that time alone: "
        f"{100 * result['flops'] / alone['seconds'] / 1e9 / roof:.0f} % of roof")


if __name__ == "__main__":
  main()
