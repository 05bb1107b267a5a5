"""The study runner (freesine_jax/tools/study.py): order, skipping, budget, resumption, tables,
and refusing results it cannot trust. A fake trainer and clock for the logic (milliseconds);
one real tiny run through the command line for the whole path."""
import json
import os

import pytest

import conftest
from freesine_jax import errors
from freesine_jax.tools import study

TASK_FINAL = {"semseg": 50.0, "depth": 1.0}


def plan(seeds=(0, 1)):
  rows = (study.Row("a", "Method A", "configs/synthetic.py:tiny"),
          study.Row("b", "Method B", "configs/synthetic.py:tiny,no_sine", ("--config.x=1",)))
  return study.Plan("test", rows, seeds=seeds,
                    tables=(study.Table("A vs B", reference="b", rows=("a", "b")),))


class FakeTrainer:
  """Stands in for freesine_jax.main: each run takes `seconds` on the fake clock and scores
  semseg 50 + 10·(row a) + seed, depth 1.0."""

  def __init__(self, seconds=30.0, die_at=None):
    self.now, self.seconds, self.calls, self.die_at = 0.0, seconds, [], die_at

  def clock(self):
    return self.now

  def __call__(self, row, seed, plan_, workdir, log_path):
    self.calls.append((row.name, seed, workdir))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "checkpoint"), "a") as f:  # what a killed run leaves
      f.write("x")
    if (row.name, seed) == self.die_at:
      self.die_at = None
      raise KeyboardInterrupt  # killed mid-way
    self.now += self.seconds
    semseg = 50.0 + (10.0 if row.name == "a" else 0.0) + seed
    return {"final": {"semseg": {"mIoU": semseg, "per_class_IoU": [semseg, semseg]},
                      "depth": {"rmse": 1.0}},
            "trainable_parameters": 100 if row.name == "a" else 90, "step": 6}


def run(out, trainer, budget=1e9, **kwargs):
  lines = []
  summary = study.run_study(kwargs.pop("plan", None) or plan(), str(out), budget,
                            runner=trainer, clock=trainer.clock, log=lines.append, **kwargs)
  return summary, lines


def test_seed_zero_of_every_row_first_and_finished_runs_skipped(tmp_path):
  trainer = FakeTrainer()
  summary, _ = run(tmp_path, trainer, rows=["a", "b"], budget=1e9)
  assert [(r, s) for r, s, _ in trainer.calls] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
  assert summary["left"] == []
  saved = json.loads((tmp_path / "a" / "seed1.json").read_text())
  assert saved["final"]["semseg"]["per_class_IoU"] == [61.0, 61.0]
  assert (saved["row"], saved["seed"], saved["trainable_parameters"], saved["step"]) == (
      "a", 1, 100, 6)
  assert saved["wall_seconds"] == 30.0
  for key in ("commit", "machine", "jax_version", "command"):
    assert saved[key], key
  assert "--config.x=1" in json.loads((tmp_path / "b" / "seed0.json").read_text())["command"]
  assert not os.path.exists(study.work_path(str(tmp_path), "a", 1))  # bulky workdir removed
  again = FakeTrainer()
  summary, _ = run(tmp_path, again)
  assert again.calls == [] and summary["ran"] == []


def test_keep_leaves_the_workdir(tmp_path):
  run(tmp_path, FakeTrainer(), plan=plan(seeds=(0,)), rows=["a"], keep=True)
  assert os.path.isdir(study.work_path(str(tmp_path), "a", 0))


def test_no_run_is_started_that_its_row_says_would_pass_the_budget(tmp_path):
  run(tmp_path, FakeTrainer(seconds=30.0), plan=plan(seeds=(0,)))  # both rows' seed 0: 30 s
  trainer = FakeTrainer(seconds=30.0)
  summary, lines = run(tmp_path, trainer, budget=50.0)
  # a/seed1 fits (0 + 30 <= 50); b/seed1 would end at 60 s: not started.
  assert [(r, s) for r, s, _ in trainer.calls] == [("a", 1)]
  assert summary["skipped"] == [("b", 1)] and summary["left"] == [("b", 1)]
  assert any("not starting b seed 1: its row takes ~0.5 min" in line for line in lines)
  assert "1 left (b/seed1)" in lines[-1]


def test_a_run_killed_mid_way_resumes_in_its_workdir(tmp_path):
  trainer = FakeTrainer(die_at=("b", 0))
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path, trainer, plan=plan(seeds=(0,)))
  workdir = study.work_path(str(tmp_path), "b", 0)
  assert os.path.isdir(workdir)  # its checkpoints stay for the next time
  assert not os.path.exists(study.result_path(str(tmp_path), "b", 0))
  again = FakeTrainer()
  _, lines = run(tmp_path, again, plan=plan(seeds=(0,)))
  assert again.calls == [("b", 0, workdir)]
  assert any("b seed 0 (resuming its workdir)" in line for line in lines)
  assert os.path.exists(study.result_path(str(tmp_path), "b", 0))


def test_table_from_the_jsons(tmp_path):
  run(tmp_path, FakeTrainer())
  text = study.render_tables(plan(), str(tmp_path))
  lines = text.splitlines()
  assert lines[0] == "### A vs B"
  header = next(line for line in lines if line.startswith("| method"))
  assert "Δm % (vs Method B)" in header
  row_a = next(line for line in lines if line.startswith("| Method A"))
  row_b = next(line for line in lines if line.startswith("| Method B"))
  # A: semseg 60, 61 -> 60.50 ± 0.71; Δm vs B's mean 50.5: semseg +18.81 %, +20.79 %, depth 0,
  # averaged over the two tasks: 9.41, 10.40 -> 9.90 ± 0.70.
  assert row_a.split(" | ")[1:3] == ["2", "60.50 ± 0.71"]
  assert "9.90 ± 0.70" in row_a and "| 100 |" in row_a
  assert row_b.split(" | ")[1:3] == ["2", "50.50 ± 0.71"] and "0.00 ± 0.70" in row_b


def test_table_says_which_rows_have_no_run_yet(tmp_path):
  run(tmp_path, FakeTrainer(), plan=plan(seeds=(0,)), rows=["b"])
  text = study.render_tables(plan(), str(tmp_path))
  assert "No finished run yet: a." in text and "| Method B | 1 |" in text


@pytest.mark.parametrize("damage", ["truncated", "foreign", "not_a_result"])
def test_a_corrupt_or_foreign_json_is_one_line_naming_it(tmp_path, damage):
  run(tmp_path, FakeTrainer(), plan=plan(seeds=(0,)))
  path = study.result_path(str(tmp_path), "a", 0)
  if damage == "truncated":
    text = open(path).read()
    open(path, "w").write(text[:len(text) // 2])
  elif damage == "foreign":
    other = json.loads(open(study.result_path(str(tmp_path), "b", 0)).read())
    open(path, "w").write(json.dumps(other))
  else:
    open(path, "w").write(json.dumps({"final": {}}))
  for action in (lambda: study.render_tables(plan(), str(tmp_path)),
                 lambda: run(tmp_path, FakeTrainer(), plan=plan(seeds=(0,)))):
    with pytest.raises(errors.UserError) as e:
      action()
    assert path in str(e.value) and "\n" not in str(e.value)


def test_plans_are_checked_and_named(tmp_path):
  with pytest.raises(errors.UserError, match="no such plan .* the plans are .*proxy"):
    study.load_plan("proxi")
  bad = tmp_path / "bad.py"
  bad.write_text("from freesine_jax.tools import study\n"
                 "def get_plan():\n"
                 "  return study.Plan('bad', (study.Row('a', 'A', 'c'),),\n"
                 "                    tables=(study.Table('t', 'z', ('a',)),))\n")
  with pytest.raises(errors.UserError, match="no row 'z'"):
    study.load_plan(str(bad))
  proxy = study.load_plan("proxy")
  assert proxy.seeds == (0, 1, 2) and {"free_sinewich", "no_sine"} <= {r.name for r in proxy.rows}


def test_command_runs_a_tiny_plan_end_to_end_and_renders_it(tmp_path, cli_env):
  """The real trainer in a child process: a JSON per run, the workdir gone, the table."""
  plan_file = tmp_path / "tiny_plan.py"
  plan_file.write_text(
      "from freesine_jax.tools import study\n"
      "def get_plan():\n"
      "  rows = (study.Row('tiny', 'Tiny', 'configs/synthetic.py:tiny',\n"
      f"                    ('--config.model.factory={conftest.TINY_FACTORY}',)),)\n"
      "  return study.Plan('tiny', rows, seeds=(0,),\n"
      "                    common_args=('--config.train.max_steps=2',\n"
      "                                 '--config.train.untrained_baseline=False',\n"
      "                                 '--config.eval.max_batches=1'),\n"
      "                    tables=(study.Table('Tiny', 'tiny', ('tiny',)),))\n")
  out = tmp_path / "out"
  args = ["-m", "freesine_jax.tools.study", f"--plan={plan_file}", f"--out={out}"]
  proc = conftest.run_cli(args, cli_env)
  assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
  result = json.loads((out / "tiny" / "seed0.json").read_text())
  assert result["step"] == 2 and "per_class_IoU" in result["final"]["semseg"]
  assert not (out / "tiny" / "seed0.work").exists()
  assert "0 left" in proc.stdout.strip().splitlines()[-1]
  table = conftest.run_cli(args + ["--table"], cli_env)
  assert table.returncode == 0, table.stderr[-3000:]
  assert "| Tiny | 1 |" in table.stdout and (out / "tables.md").read_text() == table.stdout
