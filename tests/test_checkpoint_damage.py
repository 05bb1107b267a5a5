"""A damaged latest checkpoint (truncated file, altered bytes, bad metadata, missing item) is
detected on restore; resuming warns naming it, moves it aside and continues from the previous
intact step, ending bit-identical to an uninterrupted run (issue 14).

The tiny model and fake data of test_train.py, in-process: one 12-step run (checkpoints 4, 8,
12) is copied per case, its step 12 damaged, and the copy resumed to step 16.
"""
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from freesine_jax import checkpointing
from freesine_jax import errors
from freesine_jax import train
from conftest import TINY_FACTORY, run_cli
from test_train import FakeTrainLoader, eval_batches, tiny_config

EVERY, FIRST, FINAL = 4, 12, 16


def _config(max_steps):
  return tiny_config(checkpoint_every_steps=EVERY, max_checkpoints_to_keep=3,
                     untrained_baseline=False, max_steps=max_steps)


def _run(workdir, max_steps):
  return train.train_and_evaluate(_config(max_steps), workdir,
                                  create_train_loader=FakeTrainLoader,
                                  create_eval_loader=eval_batches)


def _raw_state(workdir, step):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "data_iter", "metadata"))
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), data_iter=ocp.args.JsonRestore()))
  mngr.close()
  return restored["state"], restored["data_iter"]


def _largest_array_file(step_dir):
  """The biggest of the state item's data files (Orbax/OCDBT keeps array bytes under d/)."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           if os.path.basename(root) == "d" for name in names]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _alter_bytes(step_dir):
  path = _largest_array_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _bad_metadata(step_dir):
  with open(os.path.join(step_dir, "metadata", "metadata"), "w", encoding="utf-8") as f:
    f.write('{"backbone_hash": ')


def _missing_state(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state"))


DAMAGES = {"truncated array file": _truncate, "altered bytes": _alter_bytes,
           "metadata not JSON": _bad_metadata, "state item missing": _missing_state}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(the 12-step run's workdir, the uninterrupted 16-step run's final state and iterator)."""
  root = tmp_path_factory.mktemp("damage")
  first = str(root / "first")
  _run(first, FIRST)
  reference = str(root / "reference")
  _run(reference, FINAL)
  return first, _raw_state(reference, FINAL)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_is_skipped_with_a_warning_and_the_run_matches(runs, damage, tmp_path,
                                                                      capsys):
  first, (want_state, want_iter) = runs
  workdir = str(tmp_path / "run")
  shutil.copytree(first, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit()) == [4, 8, 12]
  DAMAGES[damage](os.path.join(checkpoints, str(FIRST)))
  capsys.readouterr()

  _run(workdir, FINAL)
  out = capsys.readouterr().out
  warnings = [line for line in out.splitlines() if line.startswith("WARNING: ")]
  assert len(warnings) == 1, out
  assert warnings[0].startswith(
      f"WARNING: checkpoint step {FIRST} in {checkpoints} is damaged ("), warnings[0]
  assert warnings[0].endswith("; resuming from step 8 instead"), warnings[0]
  assert f"resumed from {checkpoints} step 8" in out
  moved = os.listdir(os.path.join(workdir, checkpointing.DAMAGED_DIR))
  assert len(moved) == 1 and moved[0].startswith(f"{FIRST}-"), moved
  assert moved[0] in warnings[0]

  got_state, got_iter = _raw_state(workdir, FINAL)
  assert got_iter == want_iter
  want_leaves = jax.tree_util.tree_leaves_with_path(want_state)
  got_leaves = jax.tree_util.tree_leaves_with_path(got_state)
  assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
  for (path, want), (_, got) in zip(want_leaves, got_leaves):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                  err_msg=jax.tree_util.keystr(path))


def test_altered_bytes_are_caught_by_the_state_digest(runs, tmp_path):
  """Every intact checkpoint verifies; bytes altered inside an array file read back without any
  error from Orbax/TensorStore (no checksum there), and only the digest catches them."""
  first, _ = runs
  workdir = str(tmp_path / "run")
  shutil.copytree(first, workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  for step in ckpt.all_steps():
    state = ckpt.restore_saved_state(step)  # verifies the digest
    meta = ckpt.read_metadata(step)
    assert meta[checkpointing.STATE_DIGEST] == checkpointing.state_digest(state)
  _alter_bytes(os.path.join(workdir, "checkpoints", str(FIRST)))
  with pytest.raises(checkpointing.CheckpointDamaged, match=f"checkpoint step {FIRST} in .* is "
                     "damaged: its arrays read back differently than they were saved"):
    ckpt.restore_saved_state(FIRST)
  ckpt.close()


def test_every_checkpoint_damaged_is_one_line_error(runs, tmp_path):
  first, _ = runs
  workdir = str(tmp_path / "run")
  shutil.copytree(first, workdir)
  for step in (4, 8, 12):
    _bad_metadata(os.path.join(workdir, "checkpoints", str(step)))
  with pytest.raises(errors.UserError) as e:
    _run(workdir, FINAL)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"every checkpoint in {os.path.join(workdir, 'checkpoints')} is "
                            "damaged (moved to damaged_checkpoints/): step 12: cannot be read "
                            "back"), message
  assert "step 8: " in message and "step 4: " in message
  assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
  assert len(os.listdir(os.path.join(workdir, checkpointing.DAMAGED_DIR))) == 3


def test_a_state_of_another_layout_is_refused_not_moved_aside(runs, tmp_path):
  """Checkpoints written for another model are no damage: one line, nothing moved."""
  first, _ = runs
  workdir = str(tmp_path / "run")
  shutil.copytree(first, workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  target = {"params": {"w": np.zeros((3, 3), np.float32)}}
  with pytest.raises(errors.UserError, match="holds .* arrays that do not fit this model's 1 "
                     "state arrays") as e:
    ckpt.restore_latest_intact(target, lambda meta, step: None, print)
  assert not isinstance(e.value, checkpointing.CheckpointDamaged)
  assert ckpt.all_steps() == [4, 8, 12]
  assert not os.path.exists(os.path.join(workdir, checkpointing.DAMAGED_DIR))
  ckpt.close()


def test_old_steps_are_renamed_away_before_they_are_deleted(tmp_path):
  """Orbax deletes a step file by file; a kill in the middle left a step that still looked
  committed with an item missing (seen in test_checkpoint_resume's random kills). Old steps now
  leave checkpoints/ in one rename first, and a deletion cut short is invisible and finished by
  the next start."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "checkpoints")
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.zeros((), jnp.int32)}
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=2, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, state, force=True)
  ckpt.wait_until_finished()
  trash = os.path.join(directory, checkpointing.TRASH_DIR)
  assert ckpt.all_steps() == [2, 3]
  assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ["2", "3"]
  assert os.listdir(trash) == ["1"]  # moved whole, not yet deleted
  shutil.rmtree(os.path.join(trash, "1", "metadata"))  # a deletion killed halfway
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=2, async_save=False)  # a restart
  assert ckpt.all_steps() == [2, 3] and not os.path.exists(trash)  # emptied, then removed
  ckpt.save(4, state, force=True)
  ckpt.close()
  assert not os.path.exists(trash)  # step 2 moved there, deleted, the empty folder removed
  assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ["3", "4"]


def test_command_line_damaged_checkpoints_print_no_tracebacks(tiny_run, cli_env, tmp_path):
  """The command line, on a copy of conftest.tiny_run (checkpoints 3 and 6): a damaged latest
  checkpoint leaves stderr empty (the warning is one stdout line; TensorStore's tracebacks go to
  the log file), every checkpoint damaged is one stderr line and exit code 2."""
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  argv = ["-m", "freesine_jax.main", "--config=configs/synthetic.py:tiny",
          f"--workdir={workdir}", f"--config.model.factory={TINY_FACTORY}"]
  _truncate(os.path.join(checkpoints, "6"))
  proc = run_cli(argv, cli_env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == ""
  warnings = [line for line in proc.stdout.splitlines() if line.startswith("WARNING: ")]
  assert len(warnings) == 1 and "checkpoint step 6 in" in warnings[0], proc.stdout
  assert "cannot be read back (ValueError: OUT_OF_RANGE: Error reading" in warnings[0]
  assert proc.stdout.splitlines()[0].startswith(f"full log: {workdir}/logs/freesine_jax.main.")
  for step in sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit()):
    _truncate(os.path.join(checkpoints, str(step)))
  proc = run_cli(argv, cli_env)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f"freesine_jax.main: every checkpoint in {checkpoints} is damaged")
  assert lines[0].endswith("; rerun to start over in this workdir, or resume from a copy of the "
                           "run")
