"""The mesh, the placement rules and data-parallel / FSDP training on 8 CPU devices.

In-process tests check the rules and the one-line errors without devices (an AbstractMesh
stands in for a mesh). `test_8_devices_match_one_device` runs one subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must be set before jax is imported): the
small conv model of test_train.py takes one step on 1 device, on an (8,) data mesh and on a
(4, 2) data x fsdp mesh, also accumulating 2 micro-batches there. Whether the rules shard a
Swin-B Free Sinewich and its optimizer state is checked on shapes alone (jax.eval_shape).
"""
import json
import os
import subprocess
import sys
import textwrap

from absl import flags
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from configs import synthetic
from freesine_jax import errors
from freesine_jax import modeling
from freesine_jax import optimizer
from freesine_jax import sharding
from freesine_jax import train
from freesine_jax.data import pipeline

from conftest import REPO

RULES = (("out", ("fsdp",)), ("in", ("fsdp",)))


def mesh_config(data=-1, fsdp=1, rules=None):
  config = synthetic.get_config("tiny")
  config.mesh.data, config.mesh.fsdp = data, fsdp
  if rules is not None:
    config.mesh.rules = rules
  return config


def test_mesh_shape_takes_the_rest_and_refuses_what_does_not_fit():
  assert sharding.mesh_shape(mesh_config(), 8) == (8, 1)
  assert sharding.mesh_shape(mesh_config(fsdp=2), 8) == (4, 2)
  assert sharding.mesh_shape(mesh_config(data=2, fsdp=-1), 8) == (2, 4)
  assert sharding.mesh_shape(mesh_config(data=4, fsdp=2), 8) == (4, 2)
  cases = {
      (-1, 3): "config.mesh data=-1 x fsdp=3: 8 device(s) do not split into groups of 3",
      (4, 4): "config.mesh data=4 x fsdp=4 needs 16 devices, but the mesh has 8",
      (-1, -1): "config.mesh.data and config.mesh.fsdp are both -1",
      (0, 1): "config.mesh.data=0: an axis size is a positive number, or -1",
  }
  for (data, fsdp), message in cases.items():
    with pytest.raises(errors.UserError, match="^" + message.replace("(", r"\(")
                       .replace(")", r"\)")):
      sharding.mesh_shape(mesh_config(data, fsdp), 8)


@pytest.mark.accelerator
def test_logical_axes_and_partition_specs():
  assert sharding.logical_axes(()) == ()
  assert sharding.logical_axes((7,)) == ("vector",)
  assert sharding.logical_axes((3, 3, 16, 32)) == ("leading", "leading", "in", "out")
  sizes = {"data": 4, "fsdp": 2}
  spec = lambda shape, rules=RULES, min_size=1: sharding.partition_spec(shape, rules, sizes,
                                                                         min_size)
  assert spec((16, 32)) == P(None, "fsdp")  # the first rule ('out') wins
  assert spec((16, 33)) == P("fsdp")  # 'out' is odd: the next rule takes 'in'
  assert spec((15, 33)) == P()  # nothing divides: replicated
  assert spec((3, 3, 16, 6)) == P(None, None, None, "fsdp")
  assert spec((64,)) == P()  # no rule for vectors
  assert spec(()) == P()
  assert spec((16, 32), min_size=16 * 32 + 1) == P()  # too small to be worth it
  assert spec((16, 32), rules=()) == P()
  # One mesh axis per array: a second rule naming it finds it used.
  assert spec((16, 32), rules=RULES + (("in", ("fsdp",)),)) == P(None, "fsdp")
  # Several axes for one dimension (FSDP over every device), only where their product divides.
  both = (("out", ("data", "fsdp")), ("in", ("fsdp",)))
  assert spec((16, 32), rules=both) == P(None, ("data", "fsdp"))
  assert spec((16, 12), rules=both) == P("fsdp")
  # Axes of size 1 are dropped (fsdp=1: everything replicated, the same program as before).
  assert sharding.partition_spec((16, 32), RULES, {"data": 8, "fsdp": 1}, 1) == P()


def test_bad_rules_are_one_line_errors():
  with pytest.raises(errors.UserError, match=r"unknown logical axis 'outt' \(did you mean "
                     r"'out'\?\); the logical axes are out, in, leading, vector"):
    sharding.check_rules((("outt", "fsdp"),))
  with pytest.raises(errors.UserError, match=r"unknown mesh axis 'fdsp' \(did you mean "
                     r"'fsdp'\?\)"):
    sharding.check_rules((("out", "fdsp"),))
  with pytest.raises(errors.UserError, match="is not a \\(logical axis, mesh axes\\) pair"):
    sharding.check_rules((("out",),))


def test_fsdp_rules_spread_a_swin_b_free_sinewich_over_8_devices():
  """Default rules on a (1, 8) data x fsdp mesh: every parameter, Adam moment and backbone
  weight of at least config.mesh.min_shard_size elements is split 8 ways, so one device stores
  about 1/8 of the state (what lets Swin-B/L train where a replicated copy does not fit)."""
  config = synthetic.get_config("tiny")
  config.model.variant = "swin_b"
  config.dataset.image_size = (224, 224)
  config.model.window_size = 7
  model = modeling.build_model(config)
  variables = jax.eval_shape(lambda: modeling.init_variables(model, config))
  tx = optimizer.make_optimizer(config, 1e-4)
  state = jax.eval_shape(lambda v: train.create_train_state(v, tx, 0), variables)
  stored = {"params": state.params, "opt_state": state.opt_state,
            "backbone": variables["backbone"]}
  rules = sharding.check_rules(config.mesh.rules)
  sizes = {"data": 1, "fsdp": 8}
  min_size = int(config.mesh.min_shard_size)
  total = per_device = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(stored):
    spec = sharding.partition_spec(leaf.shape, rules, sizes, min_size)
    split = 8 if "fsdp" in spec else 1
    nbytes = leaf.size * leaf.dtype.itemsize
    total += nbytes
    per_device += nbytes // split
    divisible = leaf.ndim >= 2 and any(d % 8 == 0 for d in leaf.shape[-2:])
    if leaf.size >= min_size and divisible:
      assert split == 8, (jax.tree_util.keystr(path), leaf.shape, spec)
  assert total > 3.5e8  # Swin-B's ~87M frozen float32 weights, adapters and their moments
  # 1/8 of the state, plus the arrays under min_shard_size kept whole (biases, norms, small
  # adapter matrices: under 3% of Swin-B's bytes).
  assert per_device / total < 1 / 8 + 0.03, per_device / total


def test_batch_size_checks_name_what_to_use():
  mesh = AbstractMesh((4, 2), ("data", "fsdp"))
  sharding.check_batch_size(16, mesh, microbatches=2)
  with pytest.raises(errors.UserError, match=r"^config.input.batch_size=12 does not split over "
                     r"the 8 devices of the mesh; use a multiple of 8$"):
    sharding.check_batch_size(12, mesh)
  with pytest.raises(errors.UserError, match=r"batch_size=8 does not split over the 8 devices "
                     r"of the mesh x config.train.grad_accum_steps=2; use a multiple of 16$"):
    sharding.check_batch_size(8, mesh, microbatches=2)
  with pytest.raises(errors.UserError, match="grad_accum_steps=0: use 1"):
    sharding.check_batch_size(8, mesh, microbatches=0)


def test_host_rows_cover_each_global_batch_for_any_hosts_and_workers():
  """Local batch k of host p, read the way grain's DataLoader reads (worker i % W, each
  worker's records batched in turn), is rows [p*b, (p+1)*b) of global batch k."""

  class Positions:
    def __getitem__(self, position):
      return pipeline.grain.RecordMetadata(index=position, record_key=position)

  global_batch, steps = 12, 5
  for hosts in (1, 2, 3):
    b = global_batch // hosts
    for workers in (0, 1, 3):
      w = max(workers, 1)
      for p in range(hosts):
        sampler = pipeline.HostRowsSampler(Positions(), p, hosts, b, workers)
        per_worker = [[sampler[worker + j * w].record_key for j in range(steps * b)]
                      for worker in range(w)]
        local = [per_worker[k % w][(k // w) * b:(k // w + 1) * b] for k in range(steps)]
        for k, rows in enumerate(local):
          assert rows == list(range(k * global_batch + p * b, k * global_batch + (p + 1) * b)), \
              (hosts, workers, p, k)


def test_train_batches_do_not_depend_on_hosts_or_workers(synthetic_data_dir):
  """The real pipeline: 1 host, 2 hosts' concatenated rows and 1 host with 2 workers give the
  same global batches (records and augmentation)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  config = synthetic.get_config("tiny")
  config.dataset.data_dir = synthetic_data_dir
  config.input.batch_size = 4

  def batches(shard_count, workers, count=4):
    config.input.num_workers = workers
    iterators = [iter(pipeline.create_train_loader(config, shard_index=i,
                                                   shard_count=shard_count))
                 for i in range(shard_count)]
    return [{k: np.concatenate([b[k] for b in rows]) for k in rows[0]}
            for rows in zip(*[[next(it) for _ in range(count)] for it in iterators])]

  one = batches(1, 0)
  for other in (batches(2, 0), batches(1, 2)):
    for a, b in zip(one, other, strict=True):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


EIGHT_DEVICES = textwrap.dedent("""
    import json
    import jax, numpy as np
    import test_train as T
    from freesine_jax import sharding as S

    assert jax.device_count() == 8, jax.devices()
    report = {}

    def spec_list(spec):
      return [list(e) if isinstance(e, tuple) else e for e in spec]

    def leaves(tree):
      return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    # One step on 1 device, (8,) data, (4, 2) data x fsdp; without batch statistics and dropout
    # (what accumulation needs), 1 device whole and (4, 2) in 2 micro-batches.
    runs = {"one": (1, 1, 1, 1, True), "data8": (8, -1, 1, 1, True),
            "data4_fsdp2": (8, 4, 2, 1, True), "one_plain": (1, 1, 1, 1, False),
            "data4_fsdp2_accum2": (8, 4, 2, 2, False)}
    for name, (n, data, fsdp, accum, batch_norm) in runs.items():
      config = T.tiny_config()
      config.input.batch_size = 16
      config.mesh.num_devices, config.mesh.data, config.mesh.fsdp = n, data, fsdp
      config.mesh.min_shard_size = 1
      config.train.grad_accum_steps = accum
      model = T.TinyModel(batch_norm=batch_norm, dropout=0.1 if batch_norm else 0.0)
      model, variables, state, backbone, step_fn, mesh = T._setup(config, model)
      batch = S.shard_batch(next(iter(T.FakeTrainLoader(config))), mesh)
      assert len(batch["image"].addressable_shards) == n
      state, m = step_fn(state, batch, backbone)
      report[name] = {
          "loss": float(m["loss"]),
          "params": {k: np.asarray(v).tolist() for k, v in leaves(state.params).items()},
          "specs": {k: spec_list(v.sharding.spec) for k, v in leaves(
              {"params": state.params, "opt_state": state.opt_state,
               "batch_stats": state.batch_stats, "backbone": backbone}).items()},
          "shard_shapes": {k: list(v.addressable_shards[0].data.shape)
                           for k, v in leaves(state.params).items()}}

    print("REPORT" + json.dumps(report))
    """)


@pytest.mark.accelerator
def test_8_devices_match_one_device():
  """(8,) data and (4, 2) data x fsdp meshes give one device's loss and update, with the
  parameters where the rules put them."""
  here = os.path.join(REPO, "tests")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([here, REPO, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(proc.stdout.split("REPORT", 1)[1])

  # Same loss and updated parameters as one device: the meshes only regroup float32 sums over
  # the batch (rounding ~1e-7 relative); the first Adam update is lr * g / (|g| + eps), which
  # passes relative rounding of g through unchanged.
  # Accumulating over micro-batches on the sharded mesh is the same regrouping.
  for name, reference in (("data8", "one"), ("data4_fsdp2", "one"),
                          ("data4_fsdp2_accum2", "one_plain")):
    want = report[reference]
    np.testing.assert_allclose(report[name]["loss"], want["loss"], rtol=1e-6)
    for key, value in want["params"].items():
      np.testing.assert_allclose(report[name]["params"][key], value, rtol=1e-5, atol=1e-7,
                                 err_msg=f"{name} {key}")
  # Where the arrays live, by the rules (out, then in, over 'fsdp'; vectors replicated).
  assert all(spec == [] for spec in report["data8"]["specs"].values()), report["data8"]
  specs = report["data4_fsdp2"]["specs"]
  kernel_out = [None, None, None, "fsdp"]  # (3, 3, in, 16): out is even
  kernel_in = [None, None, "fsdp"]  # (1, 1, 16, odd): out is odd, in is 16
  for prefix in ("['params']", "['opt_state'][1][0].mu", "['opt_state'][1][0].nu"):
    assert specs[f"{prefix}['Conv_0']['kernel']"] == kernel_out, specs
    for task in ("semseg", "sal", "normals", "depth"):
      assert specs[f"{prefix}['head_{task}']['kernel']"] == kernel_in, (task, specs)
      assert specs[f"{prefix}['head_{task}']['bias']"] == [], (task, specs)
  assert specs["['backbone']['stem']"] == kernel_out  # frozen, sharded by the same rules
  assert specs["['batch_stats']['BatchNorm_0']['mean']"] == []
  assert report["data4_fsdp2"]["shard_shapes"]["['Conv_0']['kernel']"] == [3, 3, 11, 8]
