"""Every command-line mistake ends with ONE line on stderr saying what is wrong and what would
work, and exit code 2 — never a traceback. The commands run concurrently (each is a fresh
process) on conftest.tiny_run where they need a trained run."""
import os
import shutil

import numpy as np
import pytest

from conftest import TINY_FACTORY, run_clis_in_pairs

TRAIN = ["-m", "freesine_jax.main"]
EVALUATE = ["-m", "freesine_jax.evaluate_main"]
TINY = "--config=configs/synthetic.py:tiny"
FACTORY = f"--config.model.factory={TINY_FACTORY}"


def cases(run, tmp):
  """name -> (argv, [fragments the one line must contain])."""
  empty = os.path.join(tmp, "empty")
  if tmp != "TMP":
    os.makedirs(empty, exist_ok=True)
  return {
      "unknown config key": (
          TRAIN + [TINY, f"--workdir={tmp}/a", "--config.model.fatory=x"],
          ["--config.model.fatory: the config declares no key 'model.fatory'",
           "did you mean '--config.model.factory'?", "docs/configuration.md"]),
      "misspelled task": (
          TRAIN + [TINY, f"--workdir={tmp}/b", "--config.tasks=('semseg', 'normal')"],
          ["unknown task 'normal' (did you mean 'normals'?)", "the tasks are semseg,"]),
      "tuple written without parentheses": (
          TRAIN + [TINY, f"--workdir={tmp}/c", "--config.tasks=semseg,normals"],
          ["unknown task 'semseg,normals'", "--config.tasks=\"('semseg', 'normals')\""]),
      "misspelled config arg": (
          TRAIN + ["--config=configs/synthetic.py:tiny,nosine", f"--workdir={tmp}/d"],
          ["--config=configs/synthetic.py:tiny,nosine: unknown config arg 'nosine' (did you "
           "mean 'no_sine'?)", "comma-separated list of tiny, no_lcn"]),
      "missing config file": (
          TRAIN + ["--config=configs/pascal.py", f"--workdir={tmp}/e"],
          ["--config=configs/pascal.py: no such file", "configs/pascal_context.py"]),
      "missing --workdir": (
          TRAIN + [TINY], ["--workdir must have a value"]),
      "misspelled flag": (
          TRAIN + [TINY, f"--wrkdir={tmp}/f"], ["Unknown command line flag 'wrkdir'", "workdir"]),
      "dataset not prepared": (
          TRAIN + ["--config=configs/nyud.py:r32", f"--workdir={tmp}/g",
                   f"--config.dataset.data_dir={empty}"],
          [f"dataset 'nyud' is not prepared in config.dataset.data_dir={empty}",
           f"python -m freesine_jax.data.prepare --dataset=nyud --manual_dir=<folder> "
           f"--data_dir={empty}"]),
      "missing workdir": (
          EVALUATE + [TINY, f"--workdir={tmp}/none", FACTORY],
          [f"--workdir={tmp}/none does not exist", "python -m freesine_jax.main --workdir="]),
      "workdir without checkpoints": (
          EVALUATE + [TINY, f"--workdir={empty}", FACTORY],
          [f"--workdir={empty} holds no checkpoints/ directory"]),
      "missing checkpoint step": (
          EVALUATE + [TINY, f"--workdir={run}", "--step=4", FACTORY],
          ["--step=4:", "has no checkpoint at that step; the saved steps are 3, 6"]),
      "evaluating with another config": (
          EVALUATE + [TINY, f"--workdir={run}"],
          [f"{run} step 6 was trained with another config: model.factory is "
           f"'{TINY_FACTORY}' there, '' here", f"use the run's config (e.g. {FACTORY})"]),
      "negative batch size": (
          TRAIN + [TINY, f"--workdir={tmp}/h", "--config.input.batch_size=-8"],
          ["config.input.batch_size=-8: expected a positive global batch size"]),
      "workdir is a file": (
          TRAIN + [TINY, f"--workdir={tmp}/a_file", FACTORY],
          [f"--workdir={tmp}/a_file is a file, not a directory"]),
      "damaged dataset shard": (
          TRAIN + [TINY, f"--workdir={tmp}/i", FACTORY,
                   f"--config.dataset.data_dir={tmp}/damaged_data"],
          ["dataset 'synthetic': shard synthetic_multitask-train.array_record-00000-of-00001 of "
           "split 'train' cannot be read (Corrupted Riegeli/records file",
           f"the folder {tmp}/damaged_data/synthetic_multitask/tiny/1.0.0 is damaged: delete it",
           "rendered again on first use"]),
      "dataset without dataset_info.json": (
          TRAIN + [TINY, f"--workdir={tmp}/j", FACTORY,
                   f"--config.dataset.data_dir={tmp}/incomplete_data"],
          [f"{tmp}/incomplete_data/synthetic_multitask/tiny/1.0.0 is incomplete (it has no "
           "dataset_info.json", "delete it (rm -r"]),
      "config file setting a key renamed since": (
          TRAIN + [f"--config={tmp}/old_config.py", f"--workdir={tmp}/k"],
          [f"{tmp}/old_config.py:6 `c.model.sine_awb.modules = (\"fc1\",)`: "
           "config.model.sine_awb.modules is now config.model.task_path_modules (config "
           "version 2"]),
      "config file setting an undeclared key": (
          TRAIN + [f"--config={tmp}/old_config.py:typo", f"--workdir={tmp}/l"],
          [f"{tmp}/old_config.py:8 `c.model.lora.rnak = 3`: Key \"rnak\" does not exist and "
           "cannot be added since the config is locked; docs/configuration.md lists every key"]),
      "export weights that were never written": (
          EVALUATE + [TINY, f"--workdir={run}", FACTORY, f"--weights={tmp}/export"],
          [f"{tmp}/export/export.json: not found", "python -m freesine_jax.tools.export --out"]),
  }


@pytest.fixture(scope="module")
def outcomes(tiny_run, cli_env, synthetic_data_dir, tmp_path_factory):
  """name -> (argv, fragments, exit code, stderr) of every case, run two at a time."""
  tmp = str(tmp_path_factory.mktemp("cli_errors"))
  with open(os.path.join(tmp, "a_file"), "w", encoding="utf-8") as f:
    f.write("not a directory")
  with open(os.path.join(tmp, "old_config.py"), "w", encoding="utf-8") as f:
    f.write("from configs import synthetic\n\n"  # written for config version 1, or mistyped
            "def get_config(arg=None):\n"
            "  c = synthetic.get_config('tiny')\n"
            "  if arg is None:\n"
            "    c.model.sine_awb.modules = (\"fc1\",)\n"
            "  else:\n"
            "    c.model.lora.rnak = 3\n"
            "  return c\n")
  version = os.path.join("synthetic_multitask", "tiny", "1.0.0")
  for name in ("damaged_data", "incomplete_data"):  # copies: never the shared dataset
    shutil.copytree(os.path.join(synthetic_data_dir, version), os.path.join(tmp, name, version))
  shard = os.path.join(tmp, "damaged_data", version,
                       "synthetic_multitask-train.array_record-00000-of-00001")
  with open(shard, "r+b") as f:  # random bytes a third of the way in
    f.seek(os.path.getsize(shard) // 3)
    f.write(np.random.default_rng(0).bytes(4096))
  os.remove(os.path.join(tmp, "incomplete_data", version, "dataset_info.json"))
  runs = cases(tiny_run, tmp)
  codes = run_clis_in_pairs({name: argv for name, (argv, _) in runs.items()}, cli_env)
  return {name: (argv, fragments, *codes[name]) for name, (argv, fragments) in runs.items()}


@pytest.mark.parametrize("name", list(cases("RUN", "TMP")))
def test_mistake_is_one_line_with_exit_code_2(name, outcomes):
  argv, fragments, code, stderr = outcomes[name]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert code == 2, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  assert len(lines) == 1, stderr
  assert lines[0].startswith(f"{argv[1]}: "), lines[0]  # the command's module
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
