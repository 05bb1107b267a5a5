"""Proxy pretraining: the "ImageNet stage" of the synthetic default's small Swin.

  python -m freesine_jax.tools.pretrain --config=configs/pretrain_proxy.py[:tiny] [--out=DIR]

PEFT adapts a backbone that already knows something; a randomly initialised frozen Swin knows
nothing, and adapting it is not the regime the paper's method is made for. No pretrained weights
can be downloaded here, so this stage makes some: the small Swin is trained, all of it, on
upstream images that no downstream split contains (synthetic.UPSTREAM_MIX: another object mix,
ellipsoids among the objects and random colours, drawn from the 'upstream' stream of the
renderer), with a scene-composition objective:

  * per cell of the finest feature grid (stride 8), the fractions of the cell's pixels that show
    each upstream class (wall, floor, sphere, box, cylinder, person, ellipsoid): soft-label
    cross-entropy, and
  * per image, which object kinds appear at all: one sigmoid each.

The heads are thrown away, as an ImageNet classifier's are. The backbone is written as a Swin
state dict in the Microsoft/timm names (<dir>/swin_proxy.safetensors) and converted with
tools.convert_swin into <dir>/converted, the directory config.model.backbone_weights then names:
the weights reach the model through the loader users use for real checkpoints.

configs/synthetic.py sets config.model.backbone_weights = 'proxy:synthetic': `resolve_weights`
turns 'proxy:<name>' into that directory, pretraining on first use (a few minutes on 2 CPU
cores) and caching the result under $FREESINE_PRETRAINED_DIR, else
~/.cache/freesine_jax/pretrained, in a directory named after the preset and a hash of its config
(so a changed recipe is a new directory, never a stale one). The result depends only on the
config (the seed fixes the images, the initialisation, the order and the flips); it is written
to a temporary directory renamed into place when complete, so a killed pretraining leaves
nothing that could be mistaken for a finished one. docs/pretrained.md, "The proxy backbone".
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any

import flax.linen as nn
import flax.serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from freesine_jax import checkpointing
from freesine_jax import errors
from freesine_jax import optimizer as optimizer_lib
from freesine_jax import writers
from freesine_jax.data import augment
from freesine_jax.data import synthetic
from freesine_jax.models import pretrained
from freesine_jax.models import swin

PREFIX = "proxy:"
# Bump when the renderer, the objective or the export change what a config produces.
RECIPE_VERSION = 2
DEFAULT_ROOT = os.path.expanduser("~/.cache/freesine_jax/pretrained")
STATE_DICT_FILE = "swin_proxy.safetensors"
CONVERTED_DIR = "converted"
REPORT_FILE = "pretrain.json"
# The architecture keys a downstream config takes from its proxy (configs/synthetic.py).
ARCHITECTURE_KEYS = ("variant", "embed_dim", "depths", "num_heads", "window_size", "patch_size")
# The object kinds whose presence the image-level head predicts (class ids of UPSTREAM_MIX).
PRESENCE_KINDS = (synthetic.SPHERE, synthetic.BOX, synthetic.CYLINDER, synthetic.PERSON,
                  synthetic.ELLIPSOID)
PRESETS = ("synthetic", "tiny")


def get_config(preset: str = "synthetic") -> ml_collections.ConfigDict:
  """The pretraining recipe of a preset: 'synthetic' (the default job's Swin at 64x64) or
  'tiny' (configs/synthetic.py:tiny's, 32x32, for tests)."""
  if preset not in PRESETS:
    raise errors.UserError(f"unknown proxy preset {preset!r}{errors.did_you_mean(preset, PRESETS)}"
                           f"; the presets are {', '.join(PRESETS)}")
  tiny = preset == "tiny"
  config = ml_collections.ConfigDict()
  config.preset = preset
  config.seed = 0  # the images, the initialisation, the order and the flips

  config.model = ml_collections.ConfigDict()  # the Swin (the same keys as configs/base.py's)
  config.model.variant = "custom"
  config.model.embed_dim = 16
  config.model.depths = (2, 2, 2, 2)
  config.model.num_heads = (1, 2, 2, 4)
  config.model.window_size = 4
  config.model.patch_size = 2 if tiny else 4
  config.model.drop_path_rate = 0.1
  config.model.head_dim = 64  # width of the composition head (thrown away afterwards)

  config.data = ml_collections.ConfigDict()  # upstream images (synthetic.UPSTREAM_MIX)
  config.data.image_size = (32, 32) if tiny else (64, 64)
  config.data.num_train = 256 if tiny else 4096
  config.data.num_val = 64 if tiny else 512  # held out: the accuracies in pretrain.json
  config.data.flip = True  # horizontal flips of the training images (targets flipped alike)

  config.loss = ml_collections.ConfigDict()
  config.loss.composition = 1.0  # weight of the per-cell class-fraction cross-entropy
  config.loss.presence = 1.0  # weight of the per-image object-kind sigmoid loss

  # Optimizer: the fields of configs/base.py's optim section (optimizer.make_optimizer).
  config.optim = ml_collections.ConfigDict()
  config.optim.lr_base = 2e-3
  config.optim.warmup_lr_base = 0.0
  config.optim.min_lr_base = 2e-5
  config.optim.lr_reference_batch = 512
  config.optim.scale_lr_with_batch = False  # the *_lr_base values are the learning rates
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.05
  config.optim.grad_clip = 5.0

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32
  config.train.num_steps = 60 if tiny else 1500
  config.train.warmup_steps = 6 if tiny else 100
  config.train.log_every_steps = 20 if tiny else 100
  config.train.checkpoint_every_steps = 20 if tiny else 250  # the resume file (ensure_pretrained)
  config.lock()
  return config


def swin_spec(config: ml_collections.ConfigDict) -> swin.SwinSpec:
  mc = config.model
  return swin.SwinSpec(embed_dim=mc.embed_dim, depths=tuple(mc.depths),
                       num_heads=tuple(mc.num_heads), window_size=mc.window_size,
                       patch_size=mc.patch_size, drop_path_rate=mc.drop_path_rate)


def config_hash(config: ml_collections.ConfigDict) -> str:
  """12 hex digits identifying what `config` produces (with RECIPE_VERSION)."""
  text = json.dumps({"recipe": RECIPE_VERSION, "config": config.to_dict()}, sort_keys=True,
                    default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root() -> str:
  return os.environ.get("FREESINE_PRETRAINED_DIR", DEFAULT_ROOT)


def cache_directory(config: ml_collections.ConfigDict, root: str | None = None) -> str:
  return os.path.join(root or cache_root(), f"{config.preset}-{config_hash(config)}")


# ------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------


def feature_stride(config: ml_collections.ConfigDict) -> int:
  """Stride of the backbone's finest output grid (after stage 1's patch merging)."""
  return int(config.model.patch_size) * 2


def composition_targets(classes: np.ndarray, stride: int, num_classes: int) -> np.ndarray:
  """(..., H, W) class ids -> (..., H/s, W/s, K) fractions of each cell's pixels per class."""
  *lead, h, w = classes.shape
  onehot = np.eye(num_classes, dtype=np.float32)[classes]
  cells = onehot.reshape(*lead, h // stride, stride, w // stride, stride, num_classes)
  return cells.mean(axis=(-4, -2))


def presence_targets(classes: np.ndarray) -> np.ndarray:
  """(N, H, W) class ids -> (N, len(PRESENCE_KINDS)) 1.0 where the kind is visible."""
  flat = classes.reshape(classes.shape[0], -1)
  return np.stack([(flat == kind).any(axis=1) for kind in PRESENCE_KINDS], -1).astype(np.float32)


def render_upstream(config: ml_collections.ConfigDict, first: int, count: int,
                    log=print) -> dict[str, np.ndarray]:
  """Upstream images first..first+count-1 with their targets (uint8 images, float targets)."""
  h, w = config.data.image_size
  images = np.empty((count, h, w, 3), np.uint8)
  classes = np.empty((count, h, w), np.uint8)
  t0 = time.time()
  for i in range(count):
    ex = synthetic.upstream_example(config.seed, first + i, h, w)
    images[i], classes[i] = ex["image"], ex["classes"]
    if log and (i + 1) % 1024 == 0:
      log(f"  rendered {i + 1}/{count} upstream images ({time.time() - t0:.0f} s)")
  k = len(synthetic.UPSTREAM_CLASS_NAMES)
  return {"image": images,
          "composition": composition_targets(classes, feature_stride(config), k),
          "presence": presence_targets(classes)}


# ------------------------------------------------------------------------------------------
# Model and loss.
# ------------------------------------------------------------------------------------------


class ProxyPretrainModel(nn.Module):
  """The Swin (every weight trained: policy 'all', no adapters) + two small heads."""
  spec: swin.SwinSpec
  num_classes: int
  num_kinds: int
  head_dim: int = 64

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    stages = swin.SwinBackbone(self.spec, swin.AdapterSpec(), trainable_backbone="all",
                               name="backbone")(images, train=train)
    finest = stages[0][0]
    grid = finest.shape[1:3]
    fused = 0.0
    for i, (x, _) in enumerate(stages):  # every stage feeds the composition, as decoders read all
      y = nn.Dense(self.head_dim, name=f"proj_{i}")(nn.LayerNorm(name=f"norm_{i}")(x))
      fused = fused + jax.image.resize(y, (y.shape[0], *grid, self.head_dim), "bilinear")
    composition = nn.Dense(self.num_classes, name="composition")(nn.gelu(fused))
    pooled = nn.LayerNorm(name="norm_pool")(jnp.mean(stages[-1][0], axis=(1, 2)))
    presence = nn.Dense(self.num_kinds, name="presence")(pooled)
    return composition, presence


def losses(outputs, batch) -> dict[str, jax.Array]:
  composition, presence = outputs
  comp = -jnp.sum(batch["composition"] * jax.nn.log_softmax(composition), axis=-1).mean()
  pres = optax.sigmoid_binary_cross_entropy(presence, batch["presence"]).mean()
  return {"composition": comp, "presence": pres}


def accuracies(outputs, batch) -> dict[str, jax.Array]:
  """Cells whose largest predicted class is their majority class; correct presence bits."""
  composition, presence = outputs
  cell = jnp.argmax(composition, -1) == jnp.argmax(batch["composition"], -1)
  kinds = (presence > 0) == (batch["presence"] > 0.5)
  return {"composition_acc": cell.mean(), "presence_acc": kinds.mean()}


def build(config: ml_collections.ConfigDict) -> ProxyPretrainModel:
  return ProxyPretrainModel(swin_spec(config), len(synthetic.UPSTREAM_CLASS_NAMES),
                            len(PRESENCE_KINDS), int(config.model.head_dim))


# ------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------


def _silent(*unused_args) -> None:
  pass


def batch_indices(config: ml_collections.ConfigDict, step: int) -> np.ndarray:
  """The training examples of `step` (1-based): epoch e is permutation e of the training
  images (a function of the seed and e), read in order. A pure function of the step, so a
  resumed pretraining reads exactly the batches an uninterrupted one does."""
  n, size = int(config.data.num_train), int(config.train.batch_size)
  positions = np.arange((step - 1) * size, step * size)
  epochs = positions // n
  out = np.empty(size, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([config.seed, 1, int(e)]).permutation(n)
    mask = epochs == e
    out[mask] = perm[positions[mask] % n]
  return out


def batch_flips(config: ml_collections.ConfigDict, step: int) -> np.ndarray:
  """Which images of `step`'s batch are mirrored (a function of the seed and the step)."""
  size = int(config.train.batch_size)
  if not config.data.flip:
    return np.zeros(size, bool)
  return np.random.default_rng([config.seed, 2, step]).random(size) < 0.5


def _train_batch(config, data: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
  idx = batch_indices(config, step)
  batch = {k: v[idx] for k, v in data.items()}
  flip = batch_flips(config, step)
  batch["image"] = np.where(flip[:, None, None, None], batch["image"][:, :, ::-1],
                            batch["image"])
  batch["composition"] = np.where(flip[:, None, None, None], batch["composition"][:, :, ::-1],
                                  batch["composition"])
  batch["image"] = augment.normalize_image(batch["image"])
  return batch


def resume_path(config: ml_collections.ConfigDict, work_dir: str) -> str:
  """The resume file of `config`'s pretraining in `work_dir` (its name holds the config hash,
  so another recipe's file is never read as this one's)."""
  return os.path.join(work_dir, f"resume-{config_hash(config)}.msgpack")


def _save_resume(path: str, step: int, params, opt_state) -> None:
  """step, params and optimizer state, written beside and renamed (never half-written)."""
  data = flax.serialization.to_bytes({"step": np.int64(step), "params": params,
                                      "opt_state": opt_state})
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _load_resume(path: str, params, opt_state, log) -> tuple[int, Any, Any]:
  """(step, params, opt_state) from `path`, or (0, the given ones) when absent or unreadable."""
  if not os.path.isfile(path):
    return 0, params, opt_state
  try:
    with open(path, "rb") as f:
      state = flax.serialization.from_bytes(
          {"step": np.int64(0), "params": params, "opt_state": opt_state}, f.read())
    return int(state["step"]), state["params"], state["opt_state"]
  except Exception as e:  # pylint: disable=broad-except  # any damage: start over
    log(f"  {path} is damaged ({type(e).__name__}); pretraining from step 0")
    return 0, params, opt_state


def pretrain(config: ml_collections.ConfigDict, log=print,
             work_dir: str | None = None) -> tuple[dict, dict]:
  """Trains the proxy; returns (backbone weights {our path: array}, report). log: None is
  silent. With `work_dir`, the state is saved there every config.train.checkpoint_every_steps
  and a pretraining killed mid-way resumes from it, to the same weights."""
  log = log or _silent
  t_start = time.time()
  n_train, n_val = int(config.data.num_train), int(config.data.num_val)
  log(f"proxy pretraining ({config.preset}): rendering {n_train} + {n_val} upstream images "
      f"at {config.data.image_size[0]}x{config.data.image_size[1]}...")
  train_data = render_upstream(config, 0, n_train, log)
  val_data = render_upstream(config, n_train, n_val, log=None)
  t_data = time.time() - t_start

  model = build(config)
  h, w = config.data.image_size
  k_init, k_dropout, k_path, k_steps = jax.random.split(jax.random.PRNGKey(config.seed), 4)
  variables = jax.jit(lambda k: model.init(
      {"params": k, "dropout": k_dropout, "drop_path": k_path},
      jnp.zeros((1, h, w, 3), jnp.float32)))(k_init)
  params = variables["params"]
  steps = int(config.train.num_steps)
  schedule = optimizer_lib.make_schedule(config.optim.lr_base, config.optim.warmup_lr_base,
                                         config.optim.min_lr_base, config.train.warmup_steps,
                                         steps)
  tx = optimizer_lib.make_optimizer(config, schedule)
  opt_state = tx.init(params)
  weights = {"composition": float(config.loss.composition),
             "presence": float(config.loss.presence)}

  @jax.jit
  def step_fn(params, opt_state, batch, key):
    k1, k2 = jax.random.split(key)

    def loss_fn(p):
      outputs = model.apply({"params": p}, batch["image"], train=True,
                            rngs={"dropout": k1, "drop_path": k2})
      parts = losses(outputs, batch)
      return sum(weights[k] * v for k, v in parts.items()), (parts, outputs)

    (loss, (parts, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {"loss": loss, **parts, **accuracies(outputs, batch)}
    return optax.apply_updates(params, updates), opt_state, metrics

  @jax.jit
  def eval_fn(params, batch):
    outputs = model.apply({"params": params}, batch["image"], train=False)
    return {**losses(outputs, batch), **accuracies(outputs, batch)}

  resume, first = None, 1
  if work_dir:
    os.makedirs(work_dir, exist_ok=True)
    resume = resume_path(config, work_dir)
    done, params, opt_state = _load_resume(resume, params, opt_state, log)
    if done:
      log(f"  resuming the proxy pretraining at step {done}/{steps} from {resume}")
    first = done + 1
  every = int(config.train.checkpoint_every_steps)
  batch_size = int(config.train.batch_size)
  window, t_loop = [], time.time()
  num_weights = sum(x.size for x in jax.tree_util.tree_leaves(params["backbone"]))
  log(f"training the Swin ({num_weights:,} weights, all trained) and its heads for {steps} "
      f"steps of batch {batch_size}...")
  for step in range(first, steps + 1):
    params, opt_state, metrics = step_fn(params, opt_state, _train_batch(config, train_data, step),
                                         jax.random.fold_in(k_steps, step))
    window.append(metrics)
    if resume and every > 0 and step % every == 0 and step < steps:
      _save_resume(resume, step, params, opt_state)
    if step % int(config.train.log_every_steps) == 0 or step == steps:
      mean = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
      window = []
      rate = (time.time() - t_loop) / (step - first + 1)
      log(f"  step {step}/{steps} | loss {mean['loss']:.4f} (composition "
          f"{mean['composition']:.4f}, presence {mean['presence']:.4f}) | cell acc "
          f"{100 * mean['composition_acc']:.1f}% | lr {float(schedule(step)):.2e} | "
          f"ETA {writers.format_duration(rate * (steps - step))}")

  val = {}
  for start in range(0, n_val, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in val_data.items()}
    batch["image"] = augment.normalize_image(batch["image"])
    part = jax.device_get(eval_fn(params, batch))
    n = min(batch_size, n_val - start)
    for key, value in part.items():
      val[key] = val.get(key, 0.0) + float(value) * n
  val = {k: v / n_val for k, v in val.items()}
  log(f"held-out upstream images: cell accuracy {100 * val['composition_acc']:.1f}%, presence "
      f"accuracy {100 * val['presence_acc']:.1f}% (always the majority: "
      f"{100 * majority_accuracy(val_data):.1f}% / {100 * presence_baseline(val_data):.1f}%)")
  flat = {"/".join(k): np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(jax.device_get(params["backbone"])).items()}
  report = dict(preset=config.preset, config_hash=config_hash(config),
                config=json.loads(config.to_json()), held_out=val,
                held_out_baseline=dict(composition_acc=majority_accuracy(val_data),
                                       presence_acc=presence_baseline(val_data)),
                render_seconds=round(t_data, 1), train_seconds=round(time.time() - t_loop, 1),
                resumed_from_step=first - 1)
  return flat, report


def majority_accuracy(data: dict[str, np.ndarray]) -> float:
  """Cell accuracy of always predicting the most frequent majority class: what the composition
  head must beat for its accuracy to mean anything."""
  majority = np.argmax(data["composition"], -1)
  return float(np.max(np.bincount(majority.ravel())) / majority.size)


def presence_baseline(data: dict[str, np.ndarray]) -> float:
  """Presence accuracy of predicting, per kind, whichever of seen / not seen is more common."""
  p = data["presence"].mean(axis=0)
  return float(np.mean(np.maximum(p, 1 - p)))


def write(flat: dict[str, np.ndarray], report: dict, directory: str,
          final_directory: str | None = None) -> None:
  """<directory>/swin_proxy.safetensors (Microsoft/timm names), converted/, pretrain.json.

  final_directory: where `directory` will be renamed to (the converted metadata's source)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from freesine_jax.tools import convert_swin  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  source = os.path.join(directory, STATE_DICT_FILE)
  save_file(pretrained.to_state_dict(flat), source)
  meta = convert_swin.convert(source, os.path.join(directory, CONVERTED_DIR))
  if final_directory:
    meta["source"] = os.path.join(os.path.abspath(final_directory), STATE_DICT_FILE)
    with open(os.path.join(directory, CONVERTED_DIR, pretrained.METADATA_FILE), "w") as f:
      json.dump(meta, f, indent=2)
  report = dict(report, backbone_hash=meta["backbone_hash"], source_sha256=meta["source_sha256"])
  # The report is written last: a directory holding it is complete (see `damage`).
  with open(os.path.join(directory, REPORT_FILE), "w") as f:
    json.dump(report, f, indent=2)


def damage(directory: str) -> str | None:
  """Why `directory` is not a complete, intact proxy (None when it is): the report must parse,
  and both the state dict file and the converted weights must hash to what it recorded."""
  report_path = os.path.join(directory, REPORT_FILE)
  try:
    with open(report_path) as f:
      report = json.load(f)
    want_source, want_weights = report["source_sha256"], report["backbone_hash"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{REPORT_FILE} is missing or unreadable ({type(e).__name__})"
  source = os.path.join(directory, STATE_DICT_FILE)
  if not os.path.isfile(source) or pretrained.file_sha256(source) != want_source:
    return f"{STATE_DICT_FILE} is missing or does not match its recorded sha256"
  try:
    flat, _ = pretrained.read_checkpoint(os.path.join(directory, CONVERTED_DIR))
  except Exception as e:  # pylint: disable=broad-except  # any failure to read is damage
    return f"{CONVERTED_DIR}/ cannot be read ({type(e).__name__})"
  if checkpointing.backbone_hash(flat) != want_weights:
    return f"{CONVERTED_DIR}/ does not hold the weights its report recorded"
  return None


def ensure_pretrained(config: ml_collections.ConfigDict, root: str | None = None,
                      log=print) -> str:
  """The converted weights of `config`'s proxy, pretrained first if not cached yet.

  A cached directory is checked (`damage`) before use; a damaged one is moved aside and made
  again, with one line saying so. The pretraining runs in '.<name>.partial' beside it (its
  resume file there: a killed first use resumes), renamed into place only once complete.
  Concurrent first uses on one host wait for each other (a file lock).
  """
  log = log or _silent
  directory = cache_directory(config, root)
  converted = os.path.join(directory, CONVERTED_DIR)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  name = os.path.basename(directory)
  with synthetic.file_lock(os.path.join(parent, f".{name}.lock")):
    if os.path.exists(directory):
      reason = damage(directory)
      if reason is None:
        return converted
      log(f"the cached proxy backbone {directory} is damaged ({reason}): pretraining it again")
      shutil.rmtree(directory)
    partial = os.path.join(parent, f".{name}.partial")
    flat, report = pretrain(config, log, work_dir=partial)
    for entry in os.listdir(partial):  # what an earlier, killed write may have left
      if not entry.startswith("resume-"):
        path = os.path.join(partial, entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    write(flat, report, partial, final_directory=directory)
    if os.path.exists(resume_path(config, partial)):
      os.remove(resume_path(config, partial))
    os.rename(partial, directory)
  log(f"proxy backbone ready: {converted}")
  return converted


def resolve_weights(value: str, log=print) -> str:
  """config.model.backbone_weights as a path: 'proxy:<preset>' becomes the preset's converted
  weights (pretrained on first use); anything else is returned as it is."""
  if not value.startswith(PREFIX):
    return value
  return ensure_pretrained(get_config(value[len(PREFIX):]), log=log)
