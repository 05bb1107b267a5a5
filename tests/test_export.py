"""Merged export: the merged model's outputs equal the trained model's for every task, a task
subset equals those tasks of the full model, serving several tasks at once costs less than
serving them one by one, and evaluate --weights reads the export."""
import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pascal_context, synthetic
from freesine_jax import checkpointing
from freesine_jax import evaluate
from freesine_jax import evaluate_main
from freesine_jax import modeling
from freesine_jax.tools import export

IMAGES = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))


def perturbed(variables, seed=3, scale=0.05):
  """variables with every trained leaf moved off its init (B = 0 would hide the task paths);
  one draw for all leaves (a draw per leaf compiles a program per leaf shape)."""
  flat, unravel = jax.flatten_util.ravel_pytree(variables["params"])
  noise = jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype)
  return dict(variables, params=unravel(flat + scale * noise))


def apply(module, variables, images, **kwargs):
  """module.apply compiled as one program: op by op, a Swin's first call compiles each of its
  hundreds of ops (~4x the time of one jit here)."""
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, images)


def assert_outputs_equal(reference, merged, tasks):
  for task in tasks:
    np.testing.assert_allclose(merged[task], reference[task], rtol=1e-4, atol=1e-5,
                               err_msg=task)


@pytest.fixture(scope="module")
def exported_run(free_sinewich_run, tmp_path_factory):
  config, workdir = free_sinewich_run
  out = str(tmp_path_factory.mktemp("export") / "merged")
  export.export_run(config, workdir, out)
  return config, workdir, out


def test_merged_export_equals_the_trained_model_for_every_task(exported_run):
  config, workdir, out = exported_run
  step, metadata = checkpointing.find_checkpoint(config, workdir, None)
  model = modeling.build_model(config)
  variables = checkpointing.restore_checkpoint(workdir, step, metadata,
                                               modeling.init_variables(model, config))
  loaded = export.load(out)
  assert loaded.tasks == tuple(config.tasks) and loaded.step == step
  names = {k for path in jax.tree_util.tree_leaves_with_path(loaded.variables["params"])
           for k in map(str, path[0])}
  assert not any("lora" in n or "sine_awb" in n or "clock" in n for n in names)
  reference = apply(model, variables, IMAGES, train=False)
  assert_outputs_equal(reference, loaded.serve(IMAGES), config.tasks)


@pytest.mark.parametrize("arg", ["tiny,no_lcn", "tiny,lora"])
def test_merge_holds_for_ablations_and_baselines_without_a_task_path(arg):
  config = synthetic.get_config(arg)
  model = modeling.build_model(config)
  variables = perturbed(modeling.init_variables(model, config))
  inference, merged = export.merge_variables(model, variables, config.tasks,
                                             config.dataset.image_size)
  assert_outputs_equal(apply(model, variables, IMAGES), apply(inference, merged, IMAGES),
                       config.tasks)


def no_prompt_config():
  config = synthetic.get_config("tiny")
  config.model.prompts = False
  config.model.sine_awb.kernel_size = 1
  return config


def test_a_single_task_export_equals_that_task_of_the_full_model_and_costs_less():
  config = no_prompt_config()
  model = modeling.build_model(config)
  variables = perturbed(modeling.init_variables(model, config))
  reference = apply(model, variables, IMAGES)
  inference, merged = export.merge_variables(model, variables, config.tasks,
                                             config.dataset.image_size)

  def flops(m, v):
    lowered = jax.jit(lambda vv, x: m.apply(vv, x)).lower(v, IMAGES)
    return lowered.cost_analysis()["flops"]

  single_costs = []
  for task in config.tasks:
    one, one_vars = export.merge_variables(model, variables, (task,), config.dataset.image_size)
    assert_outputs_equal(reference, apply(one, one_vars, IMAGES), (task,))
    single_costs.append(flops(one, one_vars))
  # The shared stream and the stages' first blocks run once for all tasks.
  assert flops(inference, merged) < sum(single_costs)


def test_a_task_subset_of_a_model_with_prompts_is_refused():
  config = synthetic.get_config("tiny")
  model = modeling.build_model(config)
  variables = modeling.init_variables(model, config)
  with pytest.raises(Exception, match="prompts"):
    export.merge_variables(model, variables, ("semseg",), config.dataset.image_size)


def test_evaluate_reads_the_export_and_agrees_with_the_checkpoint(exported_run, tmp_path):
  config, workdir, out = exported_run
  from_checkpoint = evaluate.evaluate_run(config, workdir, out=str(tmp_path / "ckpt"))
  from_export = evaluate.evaluate_run(config, workdir, merged=evaluate_main.load_weights(out, config),
                                      out=str(tmp_path / "export"))
  assert from_export["step"] == from_checkpoint["step"]
  for task in config.tasks:
    for key, value in from_checkpoint["results"][task].items():
      if isinstance(value, float):
        assert from_export["results"][task][key] == pytest.approx(value, rel=1e-3, abs=1e-3)


# ----------------------------------------------------------------------------- FLOPs at scale
# Swin-T at 448 x 448, batch 1 (XLA cost analysis of the lowered programs: no weights, no run).
SWIN_T_SIZE = 448
# Per stage: task-block tokens N_i and channels C_i (patch size 4, dims 96 .. 768).
SWIN_T_STAGES = [((SWIN_T_SIZE // 4 // 2**i) ** 2, 96 * 2**i) for i in range(4)]


def lowered_flops(model, size=SWIN_T_SIZE):
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x), images)
  cost = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def merged_single_task_flops(kernel_size, task="semseg"):
  config = pascal_context.get_config("r64")
  config.model.prompts = False  # a single task is exported only without prompts
  config.model.sine_awb.kernel_size = kernel_size
  return lowered_flops(export.merged_model(modeling.build_model(config), (task,)))


def test_merged_single_task_flops_against_backbone_head_and_the_dense_kernel_formula():
  # Frozen Swin-T + the task's HRNet head: the decoder_only baseline with that one task.
  reference_config = pascal_context.get_config("r64,decoder_only")
  reference_config.tasks = ("semseg",)
  reference = lowered_flops(modeling.build_model(reference_config))
  k1, k3 = merged_single_task_flops(1), merged_single_task_flops(3)
  # k = 3: each task-block layer (proj C->C, fc1 C->4C, fc2 4C->C: 9 C^2 per token) turns a
  # linear layer into a dense 3x3 conv, 2 (k^2 - 1) N C_in C_out more FLOPs (docs/method.md).
  dense = sum(2 * (3**2 - 1) * n * 9 * c * c for n, c in SWIN_T_STAGES)
  assert k3 - k1 <= dense * 1.001 and k3 - k1 >= dense * 0.999, (k3 - k1, dense)
  # k = 1: the task path folds into a plain linear, but the task stream still differs from the
  # shared one the next stage reads, so stages 1-3 run proj, fc1, fc2 (18 N C^2) and the patch
  # merging (4 N C^2) a second time: the 2% target of issue 11 does not hold (docs/method.md,
  # "Merged export: FLOPs"), and the excess is at least that work.
  streams = sum(2 * (9 + 2) * n * c * c for n, c in SWIN_T_STAGES[:3])
  assert k1 - reference >= streams, (k1, reference, streams)
