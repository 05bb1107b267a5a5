"""freesine_jax.evaluate on a saved run, the pictures it draws, and what training writes to
TensorBoard, checked against independent computations.

The run is conftest.tiny_run: the README's command training the tiny conv model of
test_train.py on the tiny synthetic dataset (6 steps, checkpoints at 3 and 6, TensorBoard
images at step 6).
"""
import io
import json
import math
import os
import struct
import textwrap

from etils import epath
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import synthetic
from freesine_jax import checkpointing
from freesine_jax import errors
from freesine_jax import evaluate
from freesine_jax import metrics as metrics_lib
from freesine_jax import modeling
from freesine_jax import visualize
from freesine_jax.data import pipeline

from conftest import TINY_FACTORY, fake_bucket, run_cli
import test_train

REFERENCE = {"semseg": {"mIoU": 40.0}, "normals": {"mean": 30.0}}
EVAL_CONFIG = textwrap.dedent(f"""\
    from configs import synthetic

    def get_config():
      config = synthetic.get_config("tiny")
      config.model.factory = {TINY_FACTORY!r}
      config.eval.reference = {REFERENCE!r}
      return config
    """)


def tiny_config(data_dir):
  config = synthetic.get_config("tiny")
  config.model.factory = TINY_FACTORY
  config.dataset.data_dir = data_dir
  return config


def saved_variables(workdir, step):
  """params and batch_stats of a checkpoint, read with Orbax directly."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_names=("state", "data_iter", "metadata"))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return {"params": state["state"]["params"], "batch_stats": state["state"]["batch_stats"]}


def meters_on_the_split(config, variables):
  """The library's meters fed by a plain (un-jitted) model.apply over the whole val split."""
  model = test_train.build_tiny_model(config)
  # The frozen backbone is not checkpointed: it is the seeded init, as in the run.
  variables = dict(variables, backbone=modeling.init_variables(model, config)["backbone"])
  meters = {t: metrics_lib.make_meter(t, config.num_classes[t] if t in config.num_classes
                                      else None) for t in config.tasks}
  for batch in pipeline.create_eval_loader(config, shard_index=0, shard_count=1):
    outputs = model.apply(variables, jnp.asarray(batch["image"]), train=False)
    for t in config.tasks:
      meters[t].update(metrics_lib.postprocess(t, outputs[t]), batch[t], valid=batch["valid"])
  return {t: m.result() for t, m in meters.items()}


def assert_same_metrics(got, want):
  assert set(got) == set(want)
  for task, metrics in want.items():
    for key, value in metrics.items():
      if isinstance(value, list):
        np.testing.assert_allclose(got[task][key], value, rtol=1e-5, err_msg=f"{task}/{key}")
      elif isinstance(value, float) and math.isnan(value):
        assert got[task][key] is None, (task, key)
      else:
        np.testing.assert_allclose(got[task][key], value, rtol=1e-5, err_msg=f"{task}/{key}")


@pytest.fixture(scope="module")
def evaluated(tiny_run, cli_env, tmp_path_factory):
  """The evaluate command on step 3 of the run, with a Δm reference in its config file."""
  root = tmp_path_factory.mktemp("evaluate")
  config_path = root / "eval_config.py"
  config_path.write_text(EVAL_CONFIG)
  out = str(root / "out")
  proc = run_cli(["-m", "freesine_jax.evaluate_main", f"--config={config_path}",
                  f"--workdir={tiny_run}", "--step=3", f"--out={out}"], cli_env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
    report = json.load(f)
  return report, out, proc.stdout


def test_metrics_equal_the_meters_on_the_same_predictions(evaluated, tiny_run,
                                                          synthetic_data_dir):
  report, _, stdout = evaluated
  config = tiny_config(synthetic_data_dir)
  assert report["step"] == 3 and report["split"] == "val"
  want = meters_on_the_split(config, saved_variables(tiny_run, 3))
  assert_same_metrics(report["results"], want)
  assert want["semseg"]["num_images"] == 10  # the whole val split of the tiny set
  # Δm against the config's reference, by the library's formula on the independent metrics.
  assert report["reference"] == REFERENCE
  delta = metrics_lib.delta_m(want, REFERENCE)
  np.testing.assert_allclose(report["delta_m"], delta, rtol=1e-6)
  assert f"Δm vs config.eval.reference: {delta:+.2f}%" in stdout
  # The table shows every task's headline metric.
  assert f"{want['semseg']['mIoU']:.4f}" in stdout and f"{want['depth']['rmse']:.4f}" in stdout
  # Step 3 is not step 6: the step flag picks the checkpoint.
  later = meters_on_the_split(config, saved_variables(tiny_run, 6))
  assert later["normals"]["mean"] != want["normals"]["mean"]


def test_pictures_decode_at_the_grid_size(evaluated):
  report, out, _ = evaluated
  tasks = synthetic.get_config("tiny").tasks
  assert report["images"] == [f"examples/{i}.png" for i in range(4)]  # eval.qualitative_examples
  height, width = visualize.grid_shape(len(tasks))
  for name in report["images"]:
    with Image.open(os.path.join(out, name)) as image:
      assert image.format == "PNG" and image.mode == "RGB"
      assert image.size == (width, height)
      pixels = np.asarray(image)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # drawn, not blank


def test_default_output_is_the_latest_step(tiny_run, cli_env):
  proc = run_cli(["-m", "freesine_jax.evaluate_main", "--config=configs/synthetic.py:tiny",
                  f"--workdir={tiny_run}", f"--config.model.factory={TINY_FACTORY}"], cli_env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = os.path.join(tiny_run, "eval", "step_6", "metrics.json")
  with open(path, encoding="utf-8") as f:
    assert json.load(f)["step"] == 6
  assert f"wrote {path}" in proc.stdout


# ----------------------------------------------------------------------------- TensorBoard


def read_events(path):
  """Every Event of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  events, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    pos += 12
    events.append(event_pb2.Event.FromString(data[pos:pos + length]))
    pos += length + 4
  return events


def test_tensorboard_has_the_scalars_and_the_grid(tiny_run):
  tb = os.path.join(tiny_run, "tb")
  events = [e for name in sorted(os.listdir(tb)) for e in read_events(os.path.join(tb, name))]
  scalars, images = {}, {}
  for event in events:
    for value in event.summary.value:
      if value.HasField("image"):
        images[(value.tag, event.step)] = value.image
      elif value.HasField("simple_value"):
        scalars[(value.tag, event.step)] = value.simple_value
  with open(os.path.join(tiny_run, "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line) for line in f if '"train/loss"' in line]
  assert [row["step"] for row in logged] == [2, 4, 6]
  for row in logged:
    for key in ("train/lr", "train/grad_norm", "train/step_time_sec", "train/examples_per_sec",
                "train/loss"):
      np.testing.assert_allclose(scalars[(key, row["step"])], row[key], rtol=1e-6)
    # examples/s is the global batch (8) over the step time.
    np.testing.assert_allclose(row["train/examples_per_sec"] * row["train/step_time_sec"], 8.0,
                               rtol=1e-6)
  # The same grid as the evaluate command's pictures, for each qualitative example, at step 6.
  height, width = visualize.grid_shape(6)
  assert sorted(images) == [(f"examples/{i}", 6) for i in range(4)]
  for image in images.values():
    with Image.open(io.BytesIO(image.encoded_image_string)) as png:
      assert png.size == (width, height) and (image.width, image.height) == (width, height)


# ----------------------------------------------------------------------------- library pieces


def test_untrained_baseline_key_follows_what_the_baseline_depends_on():
  config = synthetic.get_config("tiny")
  key = evaluate.untrained_baseline_key(config, "hash")
  same = synthetic.get_config("tiny")
  same.train.max_steps = 100  # training length does not change the step-0 model
  same.eval.qualitative_examples = 1
  assert evaluate.untrained_baseline_key(same, "hash") == key
  for change in (lambda c: setattr(c, "seed", 1),
                 lambda c: setattr(c.model.lora, "rank", 8),
                 lambda c: setattr(c.dataset, "eval_split", "train"),
                 lambda c: setattr(c.num_classes, "semseg", 7)):
    other = synthetic.get_config("tiny")
    change(other)
    assert evaluate.untrained_baseline_key(other, "hash") != key
  assert evaluate.untrained_baseline_key(config, "other hash") != key


def test_format_verdict_says_per_task_and_overall():
  final = {"semseg": {"mIoU": 30.0}, "depth": {"rmse": 2.0}}
  untrained = {"semseg": {"mIoU": 10.0}, "depth": {"rmse": 1.0}}
  verdict = evaluate.beats_untrained(final, untrained)
  assert evaluate.format_verdict(final, untrained, verdict).splitlines() == [
      "  semseg       mIoU 30.0000 vs untrained 10.0000 (higher is better): beats the untrained "
      "model",
      "  depth        rmse 2.0000 vs untrained 1.0000 (lower is better): does NOT beat the "
      "untrained model",
      "all tasks beat the untrained model: NO"]


def test_verdict_of_a_run_adding_tasks_checks_the_old_ones_unchanged():
  """The old tasks' step-0 baseline is the starting run: equal within UNCHANGED_RTOL is the
  intended outcome, named as such; only the added task is judged against an untrained start."""
  start = {"semseg": {"mIoU": 26.0856}, "normals": {"mean": 20.0}, "depth": {"rmse": 5.0}}
  final = {"semseg": {"mIoU": 26.0856 * (1 + 0.5 * evaluate.UNCHANGED_RTOL)},
           "normals": {"mean": 19.0}, "depth": {"rmse": 1.0}}
  unchanged = evaluate.unchanged_tasks({t: final[t] for t in ("semseg", "normals")}, start)
  assert unchanged == {"semseg": True, "normals": False}
  verdict = evaluate.beats_untrained({"depth": final["depth"]}, start)
  lines = evaluate.format_verdict(final, start, verdict, unchanged).splitlines()
  assert lines == [
      "  semseg       mIoU 26.0869 vs the starting run 26.0856: unchanged, as intended",
      "  normals      mean 19.0000 vs the starting run 20.0000: CHANGED, though it should not",
      "  depth        rmse 1.0000 vs untrained 5.0000 (lower is better): beats the untrained "
      "model",
      "the added tasks beat the untrained model: YES; the old tasks are unchanged: NO"]


def test_grid_draws_each_task_kind_in_its_panels():
  rng = np.random.default_rng(0)
  tasks = ("semseg", "sal", "normals", "edge", "depth")
  size = 24
  labels = {"semseg": rng.integers(0, 3, (size, size)), "sal": rng.integers(0, 2, (size, size)),
            "normals": np.tile(np.array([0.0, 0.0, -1.0], np.float32), (size, size, 1)),
            "edge": rng.integers(0, 2, (size, size)),
            "depth": rng.uniform(1, 5, (size, size)).astype(np.float32)}
  predictions = {t: labels[t] for t in tasks}
  image = rng.normal(size=(size, size, 3)).astype(np.float32)
  grid = visualize.example_grid(image, labels, predictions, tasks,
                                {"semseg": ("wall", "floor", "sphere")})
  assert grid.shape == visualize.grid_shape(len(tasks)) + (3,) and grid.dtype == np.uint8
  panel = grid.shape[1] // (1 + len(tasks))
  # The normals column shows (n + 1) / 2 = (0.5, 0.5, 0) for n = (0, 0, -1) in both rows.
  normals_column = grid[:, 3 * panel:4 * panel].reshape(-1, 3)
  assert np.sum(np.all(np.abs(normals_column.astype(int) - (128, 128, 0)) <= 1, axis=1)) > 2000
  # The class map shows the VOC colours of classes 0..2.
  palette = (visualize.class_palette()[:3] * 255).round().astype(int)
  semseg_column = grid[:, panel:2 * panel].reshape(-1, 3).astype(int)
  for colour in palette:
    assert np.any(np.all(np.abs(semseg_column - colour) <= 1, axis=1)), colour


def test_evaluate_finds_and_writes_gs_urls_through_epath(tmp_path, monkeypatch):
  """A gs:// workdir is looked up with etils.epath (os.path.isdir says no such directory for
  any URL), outputs go to gs:// paths, and URLs are never made 'absolute' by os.path."""
  store = tmp_path / "store"
  (store / "bucket" / "run").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  grid = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
  with fake_bucket(str(store)):
    with pytest.raises(errors.UserError, match="holds no checkpoints/ directory"):
      checkpointing.find_checkpoint(None, "gs://bucket/run", None)
    with pytest.raises(errors.UserError, match="does not exist"):
      checkpointing.find_checkpoint(None, "gs://bucket/elsewhere", None)
    out = evaluate.default_out("gs://bucket/run", 6, False)
    assert out == "gs://bucket/run/eval/step_6"
    epath.Path(out).mkdir(parents=True)
    visualize.to_png(grid, out + "/0.png")
  np.testing.assert_array_equal(
      np.asarray(Image.open(store / "bucket" / "run" / "eval" / "step_6" / "0.png")), grid)
  assert not os.path.exists("gs:")
  assert checkpointing.absolute("gs://bucket/run") == "gs://bucket/run"
  assert checkpointing.absolute("run") == os.path.join(str(tmp_path), "run")
