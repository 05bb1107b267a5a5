"""Runs a multi-seed comparison in chunks that land as they finish, and renders its tables.

  python -m freesine_jax.tools.study --plan=proxy --out=docs/results/proxy \
      [--budget-minutes=60] [--rows=free_sinewich,no_sine] [--keep]
  python -m freesine_jax.tools.study --plan=proxy --out=docs/results/proxy --table

A plan (configs/studies/<name>.py, `get_plan()` returning a `Plan`) lists rows (a name, a
label, a config and its overrides), seeds and tables. The runner trains what is missing, seed 0
of every row first, then seed 1, then seed 2, so a partial study stays comparable row to row.
Every finished run writes <out>/<row>/seed<k>.json (final metrics with per-class IoU, trainable
count, steps, wall-clock, commit, machine, jax version) and its bulky workdir is removed unless
--keep. A run that its row's finished runs say would pass the budget is not started. A run
killed mid-way keeps its workdir (<out>/<row>/seed<k>.work) and resumes from its checkpoint
next time. --table renders the plan's tables (mean ± std over seeds, n per row, Δm against the
table's reference row) from the JSONs; a corrupt or foreign JSON is one line naming the file,
never averaged in. Nothing here is specific to CPUs: on an accelerator the same command runs
the whole plan (docs/results.md).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Callable, Sequence

from absl import flags

from freesine_jax import cli
from freesine_jax import errors
from freesine_jax.tools import table as table_lib

PROG = "freesine_jax.tools.study"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAN_DIR = os.path.join(REPO, "configs", "studies")
RESULT_KEYS = ("row", "seed", "final", "trainable_parameters", "step", "wall_seconds")


@dataclasses.dataclass(frozen=True)
class Row:
  """One setting of the study: `config` (configs/<file>.py[:<arg>]) with `args` overrides."""
  name: str  # directory name under --out
  label: str  # as the tables show it
  config: str
  args: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Table:
  title: str
  reference: str  # the row name Δm is measured against
  rows: tuple[str, ...]  # row names, in the table's order


@dataclasses.dataclass(frozen=True)
class Plan:
  name: str
  rows: tuple[Row, ...]
  seeds: tuple[int, ...] = (0, 1, 2)
  common_args: tuple[str, ...] = ()  # overrides every row gets (before its own)
  tables: tuple[Table, ...] = ()

  def row(self, name: str) -> Row:
    names = [r.name for r in self.rows]
    if name not in names:
      raise errors.UserError(f"plan {self.name!r} has no row {name!r}"
                             f"{errors.did_you_mean(name, names)}; its rows are "
                             f"{', '.join(names)}")
    return self.rows[names.index(name)]


def load_plan(spec: str) -> Plan:
  """A plan by name (configs/studies/<name>.py) or by file path."""
  path = spec if spec.endswith(".py") else os.path.join(PLAN_DIR, f"{spec}.py")
  if not os.path.isfile(path):
    known = sorted(f[:-3] for f in os.listdir(PLAN_DIR) if f.endswith(".py") and f[0] != "_")
    raise errors.UserError(f"--plan={spec}: no such plan ({path}); the plans are "
                           f"{', '.join(known)}")
  module_spec = importlib.util.spec_from_file_location(f"study_plan_{os.getpid()}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  plan = module.get_plan()
  if not isinstance(plan, Plan):
    raise errors.UserError(f"{path}: get_plan() must return freesine_jax.tools.study.Plan")
  names = [r.name for r in plan.rows]
  if len(set(names)) != len(names):
    raise errors.UserError(f"{path}: a row name appears twice in {names}")
  for t in plan.tables:
    for name in (t.reference, *t.rows):
      plan.row(name)
  return plan


# ------------------------------------------------------------------------------------------
# Results on disk.
# ------------------------------------------------------------------------------------------


def result_path(out: str, row: str, seed: int) -> str:
  return os.path.join(out, row, f"seed{seed}.json")


def work_path(out: str, row: str, seed: int) -> str:
  return os.path.join(out, row, f"seed{seed}.work")


def read_result(path: str, row: str, seed: int) -> dict:
  """A finished run's JSON, checked to be whole and to be this row's and seed's."""
  try:
    with open(path, encoding="utf-8") as f:
      result = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: not a readable study result ({type(e).__name__}); delete "
                           "it to run that seed again") from None
  missing = [k for k in RESULT_KEYS if not isinstance(result, dict) or k not in result]
  if missing:
    raise errors.UserError(f"{path}: not a study result (no {', '.join(missing)}); delete it "
                           "to run that seed again")
  if result["row"] != row or result["seed"] != seed:
    raise errors.UserError(f"{path}: holds row {result['row']!r} seed {result['seed']}, not row "
                           f"{row!r} seed {seed}; it belongs elsewhere")
  return result


def finished(plan: Plan, out: str) -> dict[tuple[str, int], dict]:
  """{(row, seed): result} of every finished run of the plan in `out`."""
  done = {}
  for row in plan.rows:
    for seed in plan.seeds:
      path = result_path(out, row.name, seed)
      if os.path.exists(path):
        done[(row.name, seed)] = read_result(path, row.name, seed)
  return done


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def commit() -> str:
  """The checkout's commit, '+changes' when its tracked files differ from it."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout.strip()
  head = git("rev-parse", "HEAD") or "unknown"
  return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def make_result(row: Row, seed: int, plan: Plan, results: dict, wall: float) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {
      "row": row.name, "label": row.label, "seed": seed, "plan": plan.name,
      "command": main_command(row, seed, plan, "<workdir>"),
      "final": results["final"], "delta_m": results.get("delta_m"),
      "trainable_parameters": results["trainable_parameters"],
      "rank_selection": results.get("rank_selection"), "step": results["step"],
      "train_time_sec": results.get("train_time_sec"), "wall_seconds": round(wall, 1),
      "commit": commit(), "machine": machine(), "jax_version": jax.__version__,
      "jax_backend": jax.default_backend(), "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                   time.gmtime()),
  }


# ------------------------------------------------------------------------------------------
# Running.
# ------------------------------------------------------------------------------------------


def main_command(row: Row, seed: int, plan: Plan, workdir: str) -> list[str]:
  return ["python", "-m", "freesine_jax.main", f"--config={row.config}", f"--workdir={workdir}",
          f"--config.seed={seed}", *plan.common_args, *row.args]


def subprocess_runner(row: Row, seed: int, plan: Plan, workdir: str, log_path: str) -> dict:
  """Trains one run in a child process (resuming its workdir); returns its results.json."""
  argv = [sys.executable, *main_command(row, seed, plan, workdir)[1:]]
  with open(log_path, "a", encoding="utf-8") as log:
    code = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          check=False).returncode
  if code != 0:
    raise RunFailed(f"{row.name} seed {seed} failed (exit {code}): see {log_path}")
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    return json.load(f)


class RunFailed(RuntimeError):
  pass


def order(plan: Plan, rows: Sequence[str] | None = None) -> list[tuple[Row, int]]:
  """Seed-major: seed 0 of every row, then seed 1 of every row, ..."""
  chosen = [plan.row(r) for r in rows] if rows else list(plan.rows)
  return [(row, seed) for seed in plan.seeds for row in chosen]


def run_study(plan: Plan, out: str, budget_seconds: float, rows: Sequence[str] | None = None,
              keep: bool = False, runner: Callable = subprocess_runner,
              clock: Callable[[], float] = time.monotonic, log=print) -> dict:
  """Runs what is missing, within the budget; returns {'ran', 'skipped', 'left'} (row, seed)
  lists: finished now, not started for the budget, still missing afterwards."""
  done = finished(plan, out)
  start = clock()
  ran, skipped = [], []
  todo = [(r, s) for r, s in order(plan, rows) if (r.name, s) not in done]
  log(f"study {plan.name}: {len(done)} run(s) finished in {out}, {len(todo)} to go; budget "
      f"{budget_seconds / 60:.0f} min")
  for row, seed in todo:
    walls = [done[(row.name, s)]["wall_seconds"] for s in plan.seeds if (row.name, s) in done]
    estimate = sum(walls) / len(walls) if walls else None
    elapsed = clock() - start
    if elapsed + (estimate or 0.0) > budget_seconds:
      why = (f"its row takes ~{estimate / 60:.1f} min" if estimate is not None
             else "the budget is spent")
      log(f"  not starting {row.name} seed {seed}: {why}, {elapsed / 60:.1f} of "
          f"{budget_seconds / 60:.0f} min used")
      skipped.append((row.name, seed))
      continue
    workdir = work_path(out, row.name, seed)
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    resumed = os.path.isdir(workdir)
    log(f"  {row.name} seed {seed}{' (resuming its workdir)' if resumed else ''}"
        f"{f', ~{estimate / 60:.1f} min' if estimate is not None else ''}...")
    t0 = clock()
    results = runner(row, seed, plan, workdir, os.path.join(out, row.name, f"seed{seed}.log"))
    wall = clock() - t0
    result = make_result(row, seed, plan, results, wall)
    path = result_path(out, row.name, seed)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, path)  # whole or absent, never half-written
    done[(row.name, seed)] = result
    if not keep:
      shutil.rmtree(workdir, ignore_errors=True)
    ran.append((row.name, seed))
    log(f"  {row.name} seed {seed}: done in {wall / 60:.1f} min -> {path}")
  left = [(r.name, s) for r, s in order(plan, rows) if (r.name, s) not in done]
  log(f"study {plan.name}: {len(ran)} run(s) finished now, {len(left)} left"
      + (f" ({', '.join(f'{r}/seed{s}' for r, s in left)})" if left else ""))
  return {"ran": ran, "skipped": skipped, "left": left}


# ------------------------------------------------------------------------------------------
# Tables.
# ------------------------------------------------------------------------------------------


def render_tables(plan: Plan, out: str) -> str:
  """Every table of the plan as Markdown, from the finished runs (rows with none left out,
  and said so)."""
  done = finished(plan, out)
  parts = []
  for t in plan.tables:
    rows, missing = [], []
    for name in t.rows:
      runs = [done[(name, s)] for s in plan.seeds if (name, s) in done]
      (rows if runs else missing).append(table_lib.Row(plan.row(name).label, runs, [])
                                         if runs else name)
    parts.append(f"### {t.title}\n")
    reference = plan.row(t.reference).label
    if not any(r.label == reference for r in rows):
      parts.append(f"(no finished run of the reference row {t.reference!r} yet)\n")
      continue
    parts.append(table_lib.table(rows, reference))
    if missing:
      parts.append(f"\nNo finished run yet: {', '.join(missing)}.")
    parts.append("")
  return "\n".join(parts).rstrip() + "\n"


# ------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------


def define_flags() -> None:
  flags.DEFINE_string("plan", None, "A plan name (configs/studies/<name>.py) or file.")
  flags.DEFINE_string("out", None, "Where the results go (<out>/<row>/seed<k>.json).")
  flags.DEFINE_float("budget_minutes", 60.0, "Start no run that would end after this.")
  flags.DEFINE_list("rows", None, "Only these rows (default: all).")
  flags.DEFINE_bool("keep", False, "Keep each finished run's workdir.")
  flags.DEFINE_bool("table", False, "Print the plan's tables from the finished runs (and "
                    "write <out>/tables.md) instead of running.")


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  if not f.plan or not f.out:
    raise errors.UserError("give --plan=<name or file> and --out=<directory>")
  if f.budget_minutes <= 0:
    raise errors.UserError(f"--budget_minutes={f.budget_minutes}: must be positive")
  plan = load_plan(f.plan)
  if f.table:
    text = render_tables(plan, f.out)
    with open(os.path.join(f.out, "tables.md"), "w", encoding="utf-8") as fh:
      fh.write(text)
    print(text, end="")
    return
  try:
    run_study(plan, f.out, f.budget_minutes * 60.0, f.rows, f.keep)
  except RunFailed as e:  # not the user's to fix by a flag: exit 1, the log named
    print(f"{PROG}: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def run() -> None:
  """Console-script entry point (freesine-study)."""
  # --table prints the tables themselves (Markdown to redirect into a file): no log line.
  cli.run(PROG, define_flags, main, log_file=lambda argv: not flags.FLAGS.table)


if __name__ == "__main__":
  # The plans import freesine_jax.tools.study: run that module, not this __main__ copy of it,
  # so that their Plan is the one load_plan checks for.
  from freesine_jax.tools import study  # pylint: disable=g-import-not-at-top,import-self
  study.run()
