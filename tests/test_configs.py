"""Configs: every config in configs/ has exactly the keys configs/base.py declares, the library
reads only declared keys (and never with a default), the models they describe build, and
docs/configuration.md is the reference generated from them."""
import ast
import importlib
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import base
from configs import common
from freesine_jax import cli
from freesine_jax import errors
from freesine_jax import models
from freesine_jax import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
LIBRARY_DIRS = ("freesine_jax", "benchmarks")
# Sections whose keys are task names: reading config.<map>[task] or `task in config.<map>` is
# how a task without an entry is told apart, not an undeclared read.
TASK_MAPS = ("num_classes", "loss_weights")
# Parameter names that hold (part of) a config in the library, and which part.
CONFIG_PARAMETERS = {"config": ("",), "mc": ("model",),
                     "section": ("model.sine_awb", "model.decoder")}
CANDIDATE_TOKENS = ("tiny", "r16", "r32") + common.ABLATIONS
# Configs of another schema than configs/base.py's, and the library file that reads each:
# config file name -> (its declaration, the file checked against it instead of base).
OTHER_SCHEMAS = {"pretrain_proxy": (pretrain.get_config, "freesine_jax/pretrain.py")}


def flat_keys(config: ml_collections.ConfigDict) -> set[str]:
  return set(cli.leaf_keys(config))


def config_modules():
  """(file name, module) of every config file in configs/."""
  for path in cli.config_files(CONFIG_DIR):
    name = os.path.splitext(os.path.basename(path))[0]
    yield name, importlib.import_module(f"configs.{name}")


def accepted_args(module) -> list[str]:
  """The default ('') and every single token (and 'tiny,<ablation>') the config accepts."""
  args = [""]
  candidates = list(CANDIDATE_TOKENS) + [f"tiny,{a}" for a in common.ABLATIONS]
  for token in candidates:
    try:
      module.get_config(token)
    except (errors.UserError, TypeError):
      continue
    args.append(token)
  return args


def _node(config, key):
  for part in key.split("."):
    config = config[part]
  return config


def load(module, arg):
  return module.get_config(arg) if arg else module.get_config()


# ----------------------------------------------------------------------------- keys


def test_every_config_has_exactly_the_declared_keys():
  seen = []
  for name, module in config_modules():
    declaration = OTHER_SCHEMAS.get(name, (base.get_config,))[0]
    declared = flat_keys(declaration())
    for arg in accepted_args(module):
      config = load(module, arg)
      keys = flat_keys(config)
      assert keys == declared, (name, arg, sorted(keys ^ declared))
      assert config.is_locked, (name, arg)
      seen.append(f"{name}:{arg}")
  assert {"base:", "synthetic:tiny", "pascal_context:r16", "nyud:no_sine",
          "cityscapes:taps_full", "pretrain_proxy:", "pretrain_proxy:tiny"} <= set(seen)


def test_a_locked_config_refuses_new_keys():
  config = base.get_config()
  with pytest.raises(AttributeError, match="cannot be added"):
    config.model.fatory = "x"


class ReadChecker:
  """Finds every config read in a module's source that the base config does not declare.

  A read is an attribute chain from a config-holding name: a parameter in CONFIG_PARAMETERS or
  a local alias assigned from one (`mc = config.model`), also inside nested functions. Errors:
  an undeclared key; `.get(...)`, `getattr(..., default)` or `in` on a section (a default for a
  declared key) — except on the TASK_MAPS.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.errors: list[str] = []
    self.reads: set[str] = set()  # every declared key path read

  def _node(self, path: str):
    node = self.config
    for part in filter(None, path.split(".")):
      node = node[part]
    return node

  def resolve(self, expr: ast.expr, scope: dict, where: str):
    """The config paths `expr` holds (a tuple), or None if it is not a config section/key."""
    if isinstance(expr, ast.Name):
      return scope.get(expr.id)
    if isinstance(expr, ast.Attribute):
      parents = self.resolve(expr.value, scope, where)
      if not parents:
        return None
      out = []
      for parent in parents:
        node = self._node(parent)
        if not isinstance(node, ml_collections.ConfigDict):
          return None  # an attribute of a value (a str method, ...)
        if expr.attr in node:
          out.append(f"{parent}.{expr.attr}".lstrip("."))
          self.reads.add(out[-1])
        elif hasattr(ml_collections.ConfigDict, expr.attr):
          if expr.attr == "get" and parent not in TASK_MAPS:
            self.errors.append(f"{where}: config{'.' if parent else ''}{parent}.get(...) reads "
                               "with a default; declare the key and read it directly")
          return None
        else:
          self.errors.append(f"{where}: reads config.{parent + '.' if parent else ''}"
                             f"{expr.attr}, which configs/base.py does not declare")
          return None
      return tuple(out)
    if isinstance(expr, ast.Subscript):
      parents = self.resolve(expr.value, scope, where)
      if parents and isinstance(expr.slice, ast.Constant) and isinstance(expr.slice.value, str):
        return self.resolve(ast.Attribute(value=expr.value, attr=expr.slice.value), scope,
                            where)
      if parents:
        for parent in parents:
          if parent not in TASK_MAPS and isinstance(self._node(parent),
                                                    ml_collections.ConfigDict):
            self.errors.append(f"{where}: config.{parent}[<expression>] reads a key not known "
                               "until run time")
      return None
    return None

  def check_function(self, function, inherited: dict, filename: str) -> None:
    scope = dict(inherited)
    args = function.args
    for arg in args.posonlyargs + args.args + args.kwonlyargs:
      scope.pop(arg.arg, None)
      if arg.arg in CONFIG_PARAMETERS:
        scope[arg.arg] = CONFIG_PARAMETERS[arg.arg]
    body_nodes = []
    nested = []

    def collect(node):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
          nested.append(child)
        else:
          body_nodes.append(child)
          collect(child)

    collect(function)
    for _ in range(3):  # aliases of aliases
      for node in body_nodes:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
            node.targets[0], ast.Name):
          paths = self.resolve(node.value, scope, f"{filename}:{node.lineno}")
          if paths and all(isinstance(self._node(p), ml_collections.ConfigDict)
                           for p in paths):
            scope[node.targets[0].id] = paths
    for node in body_nodes:
      where = f"{filename}:{getattr(node, 'lineno', '?')}"
      if isinstance(node, ast.Attribute):
        self.resolve(node, scope, where)
      elif isinstance(node, ast.Compare):
        for op, right in zip(node.ops, node.comparators):
          paths = self.resolve(right, scope, where) if isinstance(op, (ast.In, ast.NotIn)) \
              else None
          for path in paths or ():
            if path not in TASK_MAPS and isinstance(self._node(path),
                                                    ml_collections.ConfigDict):
              self.errors.append(f"{where}: `... in config.{path}` tests for a key; every "
                                 "key is declared")
      elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
          node.func.id in ("getattr", "hasattr") and node.args:
        if self.resolve(node.args[0], scope, where):
          self.errors.append(f"{where}: {node.func.id}() on a config section")
    for child in nested:
      self.check_function(child, scope, filename)

  def check_source(self, source: str, filename: str) -> list[str]:
    tree = ast.parse(source)
    self.check_function(ast.FunctionDef(name="<module>", args=ast.arguments(
        posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]), body=tree.body,
        decorator_list=[]), {}, filename)
    return list(dict.fromkeys(self.errors))  # alias resolution visits some reads twice


def library_sources():
  for directory in LIBRARY_DIRS:
    for root, _, files in os.walk(os.path.join(REPO, directory)):
      for name in sorted(files):
        if name.endswith(".py"):
          path = os.path.join(root, name)
          with open(path, encoding="utf-8") as f:
            yield os.path.relpath(path, REPO), f.read()


def test_the_library_reads_only_declared_keys_and_never_with_a_default():
  config = base.get_config()
  other = {path: declaration for declaration, path in OTHER_SCHEMAS.values()}
  problems, reads, files = [], set(), 0
  for filename, source in library_sources():
    if filename in other:  # read-checked against its own schema; its reads are not base's
      problems += ReadChecker(other.pop(filename)()).check_source(source, filename)
      continue
    checker = ReadChecker(config)
    problems += checker.check_source(source, filename)
    reads |= checker.reads
    files += 1
  assert not other, f"OTHER_SCHEMAS names files that do not exist: {sorted(other)}"
  assert files > 20
  assert not problems, "\n".join(problems)
  # ...and every declared key is read somewhere (a key nothing reads is a promise not kept).
  leaves = {k for k in flat_keys(config)
            if not isinstance(_node(config, k), ml_collections.ConfigDict)}
  unread = sorted(k for k in leaves if k not in reads and k.split(".")[0] not in TASK_MAPS)
  assert not unread, f"declared but never read by the library: {unread}"


def test_the_read_checker_finds_undeclared_and_defaulted_reads():
  source = '''
def f(config):
  a = config.model.fatory
  mc = config.model
  b = mc.sine_awb.omega_1
  c = config.train.get("max_steps", 5)
  d = "seed" in config
  e = getattr(config.eval, "reference", None)
  ok = (config.model.lora.rank, config.num_classes["semseg"], "edge" in config.loss_weights,
        config.model.factory.partition(":"), config.to_json_best_effort())
  def inner():
    return config.optim.lr_bass
  return a, b, c, d, e, ok, inner
'''
  problems = ReadChecker(base.get_config()).check_source(source, "x.py")
  assert len(problems) == 6, problems
  for fragment in ("config.model.fatory", "config.model.sine_awb.omega_1", "train.get(",
                   "`... in config.`", "getattr()", "config.optim.lr_bass"):
    assert any(fragment in p for p in problems), (fragment, problems)


def test_configuration_reference_is_current():
  spec = importlib.util.spec_from_file_location(
      "config_reference", os.path.join(REPO, "scripts", "config_reference.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  entries = module.declarations(open(os.path.join(CONFIG_DIR, "base.py")).read())
  declared = {e["key"] for e in entries}
  assert declared == flat_keys(base.get_config())  # every key is one `config.x = ...` line
  assert all(e["meaning"] for e in entries), [e["key"] for e in entries if not e["meaning"]]
  with open(os.path.join(REPO, "docs", "configuration.md"), encoding="utf-8") as f:
    assert f.read() == module.render(), (
        "docs/configuration.md is stale: run python scripts/config_reference.py")


# ----------------------------------------------------------------------------- models, args


CONFIGS = [("synthetic", ""), ("synthetic", "tiny"), ("synthetic", "tiny,no_lcn,taps_full"),
           ("pascal_context", "r16"),
           ("pascal_context", "r32,no_sine,no_lowpass"), ("nyud", "r64"), ("cityscapes", "r32")]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_builds_model(name, arg):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  assert set(config.loss_weights) >= set(config.tasks)
  model = models.builtin_model(config)
  images = jax.ShapeDtypeStruct((1, *config.dataset.image_size, 3), jnp.float32)
  out = jax.eval_shape(lambda x: model.init_with_output({"params": jax.random.key(0)}, x)[0],
                       images)
  assert set(out) == set(config.tasks)
  for task in config.tasks:
    assert out[task].shape[1:3] == tuple(config.dataset.image_size)


def test_paper_config_args():
  from configs import pascal_context
  config = pascal_context.get_config("r16,no_lcn,no_sine,no_lowpass,independent_decoder,"
                                     "depthwise")
  model = config.model
  assert (model.lora.rank, model.clock_net, model.sine_awb.modulation, model.sine_awb.lowpass,
          model.decoder.kind, model.sine_awb.w_mode) == (16, False, "linear", "none",
                                                          "independent", "depthwise")
  assert pascal_context.get_config("").model.lora.rank == 64
  with pytest.raises(errors.UserError, match=r"unknown config arg 'fast'; .*r<rank>"):
    pascal_context.get_config("r64,fast")


@pytest.mark.parametrize("name", ["pascal_context", "nyud", "cityscapes"])
def test_real_data_configs_train_free_sinewich_lean_and_baselines_as_measured(name):
  import importlib  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"configs.{name}")
  compute = lambda arg: (module.get_config(arg).model.compute.block_remat,
                         module.get_config(arg).model.compute.task_loop)
  assert compute("r64") == compute("r16,no_sine") == ("recompute", "scan")
  plain = (base.get_config().model.compute.block_remat, base.get_config().model.compute.task_loop)
  assert plain == ("none", "stacked")
  assert compute("mtlora,r64") == compute("full_ft") == plain


def test_synthetic_takes_the_paper_ablations():
  from configs import synthetic
  config = synthetic.get_config("no_sine")
  assert (config.model.sine_awb.modulation, config.model.decoder.modulation) == ("linear",
                                                                               "linear")
  config = synthetic.get_config("tiny,no_lcn")
  assert config.model.clock_net is False and tuple(config.dataset.image_size) == (32, 32)
  with pytest.raises(errors.UserError, match="'nosine' \\(did you mean 'no_sine'\\?\\)"):
    synthetic.get_config("nosine")


def test_count_params_cli_last_line_is_the_trainable_total():
  out = subprocess.run(
      [sys.executable, "-m", "freesine_jax.tools.count_params",
       "--config=configs/pascal_context.py:r64"], capture_output=True, text=True, check=True,
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO)).stdout
  last = out.strip().splitlines()[-1]
  # Closed form (docs/method.md): shared LoRA + 12 full W + prompt projections + 4 prompt LNs and
  # gates + tokens and Clock Net + trainable LayerNorms/rel-pos/patch_embed + decoders.
  r = 64
  expected = (70_656 * r + 12 * 9 * r * r + 387_072 + 2_880 + 4 + 483 + 51_258 + 1_072_904)
  assert expected == 6_478_953
  assert last == f"trainable_params={expected}"
  assert "TA adapters" in out and "decoders" in out
