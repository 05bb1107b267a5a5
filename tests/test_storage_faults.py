"""A disk that fills up, a read-only workdir: one StorageFault line naming the path, the intact
checkpoints and what to do; no unfinished save left behind; the next run resumes.

Disk-full is faked (this machine's tests cannot count on mounting a tmpfs): Orbax's writer is
made to fail as it does on a full disk (a ValueError('RESOURCE_EXHAUSTED: ... No space left on
device') from its writer thread, after creating its temporary directory), and TensorBoard's
flush to raise OSError(ENOSPC). A real 3.6 MB tmpfs gave the same line (docs/reliability.md).
"""
import errno
import json
import os

import jax.numpy as jnp
import pytest

from freesine_jax import checkpointing
from freesine_jax import cli
from freesine_jax import train
from tests.test_train import FakeTrainLoader, eval_batches, tiny_config

ENOSPC_TEXT = ('RESOURCE_EXHAUSTED: Error writing local file "/x/3.orbax-checkpoint-tmp/state/d": '
               "Failed to write 122483 bytes to file 12: No space left on device "
               "[os_error_code='28']")


def test_storage_fault_reasons():
  wrapped = ValueError("outer")
  wrapped.__cause__ = ValueError(ENOSPC_TEXT)
  assert checkpointing.storage_fault_reason(wrapped) == "no space left on the device"
  assert checkpointing.storage_fault_reason(OSError(errno.ENOSPC, "x")) == \
      "no space left on the device"
  assert checkpointing.storage_fault_reason(OSError(errno.EROFS, "x")) == \
      "the file system is read-only"
  assert checkpointing.storage_fault_reason(PermissionError(errno.EACCES, "x")) == \
      "permission denied"
  assert checkpointing.storage_fault_reason(ValueError("shapes differ")) is None
  assert checkpointing.storage_fault_reason(OSError(errno.ENOENT, "x")) is None
  assert checkpointing.StorageFault("x").exit_at_once  # cli.fail skips blocking exit handlers


STATE = {"w": jnp.arange(12.0).reshape(3, 4), "step": jnp.zeros((), jnp.int32)}


def test_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpointing.Checkpointer(directory, async_save=False)
  ckpt.save(1, STATE, force=True)
  monkeypatch.setattr(checkpointing.Checkpointer, "free_bytes", lambda self: 20)
  with pytest.raises(checkpointing.StorageFault) as e:
    ckpt.save(2, STATE, force=True)
  assert str(e.value) == (
      f"checkpoint step 2 was not written to {directory}: a checkpoint of this run needs at "
      "least 0.0 MiB and the device has 0.0 MiB free; the intact checkpoints are steps 1; a "
      "rerun resumes from step 1; free space there or rerun with a --workdir on another disk "
      "(docs/reliability.md)")
  with pytest.raises(checkpointing.StorageFault, match="^no checkpoint can be written to"):
    ckpt.check_space(STATE)
  assert sorted(os.listdir(directory)) == ["1"]
  monkeypatch.undo()
  restored = ckpt.restore_saved_state(1)
  assert (restored["w"] == STATE["w"]).all()
  ckpt.close()


@pytest.mark.parametrize("async_save", [False, True])
def test_save_failing_on_a_full_disk_removes_its_unfinished_directory(tmp_path, monkeypatch,
                                                                      async_save):
  directory = tmp_path / "checkpoints"
  ckpt = checkpointing.Checkpointer(str(directory), async_save=async_save)
  ckpt.save(1, STATE, force=True)
  ckpt.wait_until_finished()
  manager = ckpt._manager  # pylint: disable=protected-access

  def full_disk_save(step, args=None, force=False):
    (directory / f"{step}.orbax-checkpoint-tmp-1765000000").mkdir()
    raise ValueError(ENOSPC_TEXT)
  monkeypatch.setattr(manager, "save", full_disk_save)
  with pytest.raises(checkpointing.StorageFault) as e:
    ckpt.save(2, STATE, force=True)
  assert str(e.value) == (
      f"checkpoint step 2 could not be written to {directory}: no space left on the device "
      "(its unfinished 2.orbax-checkpoint-tmp-1765000000 removed); the intact checkpoints are "
      "steps 1; a rerun resumes from step 1; free space there or rerun with a --workdir on "
      "another disk (docs/reliability.md)")
  assert sorted(os.listdir(directory)) == ["1"]
  monkeypatch.undo()
  ckpt.close()
  again = checkpointing.Checkpointer(str(directory))
  assert again.latest_step() == 1
  again.restore_saved_state(1)
  again.close()


def test_training_on_a_disk_that_fills_up_stops_in_one_line_and_resumes(tmp_path, monkeypatch):
  """TensorBoard's writes fail at the second logging step (after the step-8 checkpoint): the
  run stops with one StorageFault naming the workdir and the intact checkpoint; a rerun on the
  freed disk resumes from it and ends like an uninterrupted run."""
  config = tiny_config(max_steps=24, checkpoint_every_steps=8)
  workdir = tmp_path / "run"
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  calls = {"n": 0}
  real_flush = SummaryWriter.flush

  def flush(self):
    calls["n"] += 1
    if calls["n"] > 3:  # untrained, step 4, step 8 pass; step 12 hits the full disk
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_flush(self)
  monkeypatch.setattr(SummaryWriter, "flush", flush)
  loaders = dict(create_train_loader=FakeTrainLoader,
                 create_eval_loader=lambda c: eval_batches(c))
  with pytest.raises(checkpointing.StorageFault) as e:
    train.train_and_evaluate(config, str(workdir), **loaders)
  assert str(e.value) == (
      f"training stopped: writing in {workdir} failed: no space left on the device (OSError: "
      "[Errno 28] No space left on device); the intact checkpoints are steps 8; a rerun resumes "
      "from step 8; free space there or rerun with a --workdir on another disk "
      "(docs/reliability.md)")
  monkeypatch.undo()
  results = train.train_and_evaluate(config, str(workdir), **loaders)
  assert results["step"] == 24
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == sorted(steps)  # the rows past step 8 of the stopped run were dropped
  reference = train.train_and_evaluate(config, str(tmp_path / "reference"), **loaders)
  assert results["final"] == reference["final"]


def test_fail_exits_at_once_on_a_storage_fault(monkeypatch, capsys):
  exits = []
  monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
  with pytest.raises(SystemExit):  # reached only because os._exit is faked here
    cli.fail("prog", checkpointing.StorageFault("disk full"))
  assert exits == [2]
  assert capsys.readouterr().err == "prog: disk full\n"
