"""Every config key, declared once, with its default and what it means.

The defaults are the paper's setting: Free Sinewich r=64 on a frozen Swin-T, PASCAL-Context's four
tasks at 448x448, MTLoRA's training recipe (docs/design.md §1-§3). The experiment configs
(pascal_context.py, nyud.py, cityscapes.py, synthetic.py) start from `get_config()` and only change
values: the returned config is locked, so adding a key there (or with --config.<key> on the command
line) is an error, and the library reads `config.<key>` without defaults. docs/configuration.md is
generated from this file (scripts/config_reference.py); each key's comment is its documentation.

  python -m freesine_jax.main --config=configs/base.py --workdir=...   (= pascal_context.py:r64)
"""
import ml_collections

from freesine_jax.data import registry


def get_config() -> ml_collections.ConfigDict:
  """The base config: every key the library reads (locked: experiment configs change values)."""
  config = ml_collections.ConfigDict()

  # The layout of this config's keys. A config saved by a run (checkpoint metadata, export.json)
  # with an older version is upgraded when read (config_checks.upgrade; docs/configuration.md,
  # "Config versions"); a renamed key given on the command line is refused, naming its new key.
  config.version = 2
  # PRNG seed of parameter init (and of the random backbone when model.backbone_weights is ''),
  # dropout and drop-path; also of the data order and augmentation unless input.seed is set.
  config.seed = 0
  # Tasks trained and evaluated (freesine_jax/tasks.py: semseg, human_parts, sal, normals, edge,
  # depth). On the command line: --config.tasks="('semseg', 'normals')".
  config.tasks = ("semseg", "human_parts", "sal", "normals")

  config.num_classes = ml_collections.ConfigDict()  # classes of each classification task
  config.num_classes.semseg = 21  # semantic segmentation classes (PASCAL-Context: 21)
  config.num_classes.human_parts = 7  # human part classes incl. background (PASCAL-Part: 7)

  # Weight w_t of each task's loss in the total sum_t w_t L_t (MTLoRA's weights). Only the tasks
  # of config.tasks are used; every one of them needs a weight.
  config.loss_weights = ml_collections.ConfigDict()
  config.loss_weights.semseg = 1.0  # softmax cross-entropy, 255 ignored
  config.loss_weights.human_parts = 2.0  # softmax cross-entropy, 255 ignored
  config.loss_weights.sal = 5.0  # class-balanced binary cross-entropy
  config.loss_weights.normals = 10.0  # L1 of the L2-normalised normals over valid pixels
  config.loss_weights.edge = 50.0  # binary cross-entropy, positive weight 0.95
  config.loss_weights.depth = 1.0  # L1 over valid (> 0) pixels

  config.dataset = ml_collections.ConfigDict()  # which prepared dataset, and how it is augmented
  # Dataset name: synthetic (rendered on first use) | pascal_context | nyud | cityscapes (those
  # three are prepared once from local files: docs/datasets.md).
  config.dataset.name = "pascal_context"
  config.dataset.builder_config = ""  # TFDS builder config ('' = the builder's default)
  # Where prepared datasets live: $FREESINE_DATA_DIR, else ~/.cache/freesine_jax/tensorflow_datasets.
  config.dataset.data_dir = registry.DEFAULT_DATA_DIR
  config.dataset.train_split = "train"  # split trained on
  config.dataset.eval_split = "val"  # split evaluated on
  # (height, width) the network sees: train images are augmented, then resized to it; eval
  # images are resized only.
  config.dataset.image_size = (448, 448)

  config.dataset.augment = ml_collections.ConfigDict()  # train-time augmentation
  config.dataset.augment.flip = True  # horizontal flip with probability 0.5 (normals' x negated)
  config.dataset.augment.rotate_degrees = 20.0  # rotation angle drawn from U(-a, a); 0 disables
  # Zoom factor drawn from U(lo, hi) about the centre (with rotation: one warp, zero borders).
  config.dataset.augment.scale_range = ml_collections.FieldReference(
      (0.75, 1.25), field_type=tuple)
  # Zoom factor drawn from this set instead (NYUDv2: (1.0, 1.2, 1.5)); None: use scale_range.
  config.dataset.augment.scales = ml_collections.FieldReference(None, field_type=tuple)
  config.dataset.augment.image_order = 1  # image interpolation: 1 bilinear | 3 bicubic
  # What warped-in borders hold in the labels: zero (MTLoRA: background, no edge, invalid
  # normals and depth) | ignore (255 for class maps, invalid for the others).
  config.dataset.augment.label_fill = "zero"

  config.input = ml_collections.ConfigDict()  # input pipeline (grain)
  # GLOBAL train batch, split over processes (and over devices by sharding); the learning rates
  # scale with it (optim.scale_lr_with_batch).
  config.input.batch_size = 32
  config.input.eval_batch_size = 32  # GLOBAL eval batch (the last batch is padded)
  config.input.num_workers = 4  # grain worker processes per host (0: load in the main process)
  # Seed of the data order and augmentation; None: config.seed.
  config.input.seed = ml_collections.FieldReference(None, field_type=int)

  # The device mesh (freesine_jax/sharding.py, docs/launch.md): two named axes, 'data' and 'fsdp'.
  # Batches are split over both; parameters, optimizer state and the frozen backbone are
  # replicated along 'data' and sharded along 'fsdp' (FSDP: stored sharded, gathered for the
  # forward pass) by mesh.rules.
  config.mesh = ml_collections.ConfigDict()
  # Use the first N devices of jax.devices() (every host's); None: all of them.
  config.mesh.num_devices = ml_collections.FieldReference(None, field_type=int)
  # Size of the 'data' axis (pure data parallelism); -1: the devices the other axes leave.
  config.mesh.data = -1
  # Size of the 'fsdp' axis (data parallelism whose devices also split the parameters); -1: the
  # devices the other axes leave; 1: everything replicated.
  config.mesh.fsdp = 1
  # Which mesh axes split which logical dimension of a parameter, first rule first: (logical
  # axis, mesh axis or tuple of them). Logical axes come from the shape: 'out' (last axis of a
  # >= 2-D array), 'in' (the one before), 'leading' (the others: conv taps, stacked tasks),
  # 'vector' (1-D). A dimension the mesh axes do not divide stays whole; () replicates all.
  config.mesh.rules = (("out", "fsdp"), ("in", "fsdp"))
  # Arrays with fewer elements stay replicated (gathering them costs more than it saves).
  config.mesh.min_shard_size = 2 ** 14

  config.model = ml_collections.ConfigDict()  # the network (docs/method.md explains each choice)
  # 'pkg.module:function' returning a custom linen model for function(config), following the
  # contract of freesine_jax.models.builtin_model (collections 'backbone'/'params'/'batch_stats',
  # outputs {task: (B, H, W, C)}); '' builds Free Sinewich from the keys below.
  config.model.factory = ""
  config.model.name = "free_sinewich"  # method label (reports, count_params)
  config.model.variant = "swin_t"  # Swin backbone: swin_t | swin_s | swin_b | swin_l | custom
  config.model.embed_dim = 96  # stage-1 channels (variant=custom only)
  config.model.depths = (2, 2, 6, 2)  # blocks per stage (variant=custom only)
  config.model.num_heads = (3, 6, 12, 24)  # attention heads per stage (variant=custom only)
  config.model.window_size = 7  # attention window (tokens per side)
  config.model.patch_size = 4  # patch embedding stride (pixels per token side)
  config.model.drop_path_rate = 0.2  # stochastic depth rate of the last block (linear ramp)
  # Pretrained Swin weights: a converted directory or a source file (.pth, .safetensors, timm,
  # Hugging Face; docs/pretrained.md); '' = random init from config.seed.
  config.model.backbone_weights = ""
  config.model.backbone_layout = ""  # layout of backbone_weights: '' detect | ms | timm | hf
  # Which backbone weights train: none | norms_relpos_embed (TADFormer: LayerNorms, relative
  # position tables, patch embedding) | mtlora (+ patch-merging reductions) | all.
  config.model.trainable_backbone = "norms_relpos_embed"
  # Compute dtype: float32 | bfloat16 (activations, matmuls and convolutions in bfloat16;
  # parameters, gradients, optimizer state and the losses stay float32). A config.model.factory
  # model reads it itself.
  config.model.dtype = "float32"
  config.model.prompts = True  # one learnable prompt token per task joins window attention
  # Clock Net: omega_t = s (tanh(W_q ReLU(p_t) + phi_t) + c) from the task tokens. False: one
  # free learnable frequency per task ("w/o LCN" ablation), started at the same values.
  config.model.clock_net = True
  config.model.clock_s_init = 1.0  # initial scale s of the Clock Net
  config.model.clock_c_init = 1.0  # initial offset c of the Clock Net
  # tanh(phi_t) evenly spaced in [-spread, spread] (fixed), so tasks start at distinct
  # frequencies; 0 is the paper's formula as written.
  config.model.clock_spread = 0.5

  config.model.lora = ml_collections.ConfigDict()  # the shared (task-agnostic) LoRA of every block
  config.model.lora.rank = 64  # rank r of A (C_in x r) and B (r x C_out); 0 disables LoRA
  config.model.lora.scale = 4.0  # fixed output scale of the LoRA product (not alpha / r)
  config.model.lora.dropout = 0.05  # dropout on the LoRA input while training
  # Random bits per entry of that dropout mask: 8 (4x fewer random words than 32, the keep
  # probability rounded to 1/256), 16, or 32 (jax.random.bernoulli, nn.Dropout bitwise);
  # docs/method.md, "The train step's non-matmul work on the CPU".
  config.model.lora.dropout_bits = 8
  # The linear layers carrying LoRA: any of qkv, proj, fc1, fc2 (every block) and reduction
  # (the patch-merging reductions, MTLoRA+).
  config.model.lora.modules = ("qkv", "proj", "fc1", "fc2")
  # 'lora': the layer adds scale * x A B; 'dora': FAAR's DoRA form, x (m V^ - W0) with
  # V^ = colnorm(colnorm(W0) + scale A B) and a trained magnitude m per output unit, for the
  # shared LoRA and the task LoRA (models/dora.py). Set by the 'faar' config arg.
  config.model.lora.form = "lora"
  # DoRA: weight of FAAR's magnitude regulariser, sum over layers of mean((m / ||W0|| - 1)^2),
  # added to the training loss (the shared LoRA's magnitudes only, as FAAR).
  config.model.lora.dora_magnitude_reg = 1e-4

  # The task-specific (TS) path of each stage's last block: sine_awb (Free Sinewich) |
  # task_lora (MTLoRA: per-task low-rank A_t B_t) | dynamic_filter (TADFormer: a depthwise filter
  # generated per example and task, in the shared LoRA's rank space) | none (shared LoRA only).
  config.model.task_path = "sine_awb"
  # The linear layers of a stage's last block carrying the task path (whatever model.task_path;
  # config version 1 called it model.sine_awb.modules).
  config.model.task_path_modules = ("proj", "fc1", "fc2")
  # Where a task stream's frozen linear reads from in fc1/fc2: task (Free Sinewich,
  # Phi(f_t) + update) | shared (MTLoRA, TADFormer: Phi of the shared stream + the task update).
  config.model.task_frozen_input = "task"
  # TADFormer builds its prompt LayerNorm in every block's proj although only the stages' last
  # blocks use it: True declares the unused ones too (they count, never train).
  config.model.prompt_norm_every_block = False
  # True: one independent model per task (the single-task reference row), each its own backbone
  # and head; False: one multi-task model.
  config.model.separate_models = False

  config.model.task_lora = ml_collections.ConfigDict()  # task_path = task_lora (MTLoRA)
  config.model.task_lora.rank = 4  # rank of each task's A_t (C_in x r) and B_t (r x C_out)
  config.model.task_lora.scale = 4.0  # fixed output scale of each task's product

  config.model.dynamic_filter = ml_collections.ConfigDict()  # task_path = dynamic_filter (TADFormer)
  config.model.dynamic_filter.kernel_size = 3  # k of the generated depthwise k x k filter

  # Sine-AWB, the task-specific path in each stage's last block: per task t the kernel
  # K_t = lowpass((rho/omega_0) sin(omega_0 omega_t A.W.B / rho)), rho = RMS of each tap.
  config.model.sine_awb = ml_collections.ConfigDict()
  config.model.sine_awb.kernel_size = 3  # k of the k x k convolutional prior W (1: a matrix)
  config.model.sine_awb.w_mode = "full"  # W: full (r x r x k x k) | depthwise (r x k x k)
  config.model.sine_awb.w_init = "identity"  # W init: identity (centre tap = I) | kaiming
  config.model.sine_awb.scale = 4.0  # output gain of the task path (as lora.scale)
  # True: per-task A, W, B instead of one shared base ("independent bases" ablation).
  config.model.sine_awb.independent_bases = False
  # sine | linear (omega_t * A.W.B, the "w/o sine" ablation).
  config.model.sine_awb.modulation = "sine"
  # Base frequency omega_0 of the normalised sine: the argument has RMS omega_0 * omega_t per
  # tap (docs/method.md, "Where the sine acts", for the measurements behind 3).
  config.model.sine_awb.omega_0 = 3.0
  # Normalisation rho of the fused kernel: tap_rms (per k x k tap) | rms (whole kernel) | none
  # (the literal sin(omega_0 omega_t M), inert at trained weight scales).
  config.model.sine_awb.base_norm = "tap_rms"
  # Gaussian low-pass of each task kernel: matrix (over C_in x C_out per tap) | taps (over the
  # k x k taps) | taps_full (full convolution of the taps) | none.
  config.model.sine_awb.lowpass = "matrix"
  config.model.sine_awb.lowpass_size = 7  # low-pass filter size K
  config.model.sine_awb.lowpass_sigma = 1.0  # low-pass filter sigma

  config.model.decoder = ml_collections.ConfigDict()  # per-task heads (HRNet-style)
  # shared: one 270->1080 base modulated per task (Free Sinewich) | independent: a full head
  # per task ("independent decoder" ablation) | tspd: a full head per task whose branches first
  # pass FAAR's task-spectral filters and cross-task term (models/tspd.py; the 'faar' arg).
  config.model.decoder.kind = "shared"
  # tspd's radial grid: code (FAAR's code: linspace over rfft2's unshifted rows, so its "low
  # band" holds the highest vertical frequencies) | frequency (each bin's true frequency).
  config.model.decoder.tspd_grid = "code"
  config.model.decoder.proj_channels = (18, 36, 72, 144)  # 1x1 projections of the 4 scales
  config.model.decoder.head_channels = 1080  # channels of the head's first convolution
  config.model.decoder.modulation = "sine"  # as model.sine_awb.modulation, for the shared base
  config.model.decoder.omega_0 = 3.0  # as model.sine_awb.omega_0, for the shared base
  config.model.decoder.base_norm = "tap_rms"  # as model.sine_awb.base_norm, for the shared base
  config.model.decoder.lowpass = "matrix"  # matrix | none, for the shared base
  config.model.decoder.lowpass_size = 7  # low-pass filter size K of the shared base
  config.model.decoder.lowpass_sigma = 1.0  # low-pass filter sigma of the shared base

  # How the model is computed: speed and memory only, never the function (docs/method.md,
  # "Computation"; measured in docs/benchmarks.md). A checkpoint resumes under other choices.
  config.model.compute = ml_collections.ConfigDict()
  # How the per-task k x k kernels are applied: gemm (CPU: one GEMM per task over taps x
  # channels) | conv (TPU/GPU: a grouped convolution) | winograd (F(2x2, 3x3), 3x3 kernels only).
  config.model.compute.task_conv = "gemm"
  # Where the 'matrix' low-pass acts (exact either way): auto (the smaller array per layer) |
  # kernel | activations.
  config.model.compute.lowpass_site = "auto"
  # True: the backward pass rebuilds each layer's task kernels instead of keeping them.
  config.model.compute.task_path_remat = True
  # stacked (every task's kernels in one batched computation) | scan (one task after another:
  # the kernel-sized temporaries of one task at a time; docs/method.md, Memory).
  config.model.compute.task_loop = "stacked"
  # none | blocks | recompute: recompute each Swin block's activations in the backward pass,
  # with nn.remat (blocks: jax.checkpoint, which XLA:CPU merges back into the forward pass) or
  # with layers.recompute_in_backward (recompute: tied to the block's output cotangent).
  config.model.compute.block_remat = "none"
  # The real-data configs (pascal_context, nyud, cityscapes) use block_remat='recompute' and
  # task_loop='scan' for Free Sinewich (configs/common.py LEAN_COMPUTE).

  config.optim = ml_collections.ConfigDict()  # AdamW + warmup/cosine (MTLoRA's recipe)
  config.optim.lr_base = 5e-4  # peak learning rate for a global batch of lr_reference_batch
  config.optim.warmup_lr_base = 5e-7  # learning rate at step 0 (same batch scaling)
  config.optim.min_lr_base = 5e-6  # learning rate at the end of the cosine (same batch scaling)
  config.optim.lr_reference_batch = 512  # lr = lr_base * input.batch_size / lr_reference_batch
  config.optim.scale_lr_with_batch = True  # False: use the *_lr_base values as they are
  config.optim.b1 = 0.9  # AdamW beta1
  config.optim.b2 = 0.999  # AdamW beta2
  config.optim.eps = 1e-8  # AdamW epsilon
  config.optim.weight_decay = 0.05  # decoupled weight decay of 'params' leaves with ndim >= 2
  config.optim.grad_clip = 5.0  # clip the gradient's global norm to this; <= 0 disables

  config.train = ml_collections.ConfigDict()  # the loop: length, logging, checkpoints
  config.train.num_epochs = 300  # the schedule's length in epochs
  config.train.warmup_epochs = 20  # linear warmup epochs, then cosine decay
  # Stop after this many steps (None: num_epochs); the schedule still spans num_epochs.
  config.train.max_steps = ml_collections.FieldReference(None, field_type=int)
  # Examples per epoch (None: the size of the train split).
  config.train.num_train_examples = ml_collections.FieldReference(None, field_type=int)
  # Progress line, metrics.jsonl and TensorBoard scalars every N steps.
  config.train.log_every_steps = 50
  # TensorBoard image of the eval.qualitative_examples every N steps (and at the end); 0: never.
  config.train.image_every_steps = 1000
  # Split each global batch into N micro-batches run one after another, their gradients summed
  # into one update (the losses are normalised over the whole batch, so without batch
  # statistics the update equals the full batch's; BatchNorm sees micro-batches). Activation
  # memory of batch_size / N.
  config.train.grad_accum_steps = 1
  # PRNG implementation of the dropout and drop-path masks: 'threefry' (jax's default),
  # 'rbg' or 'unsafe_rbg' (XLA's RngBitGenerator, what the JAX TPU codebases use; no faster on
  # XLA:CPU, measured: docs/method.md, "The train step's non-matmul work on the CPU").
  # Parameter initialisation and the checkpointed key stay threefry whatever this is.
  config.train.dropout_rng = "threefry"
  # Orbax checkpoint every N steps, at the end, and when SIGTERM stops training (preemption).
  config.train.checkpoint_every_steps = 500
  config.train.max_checkpoints_to_keep = 3  # older checkpoints are deleted
  config.train.async_checkpointing = True  # write checkpoints in the background
  # A non-finite loss or gradient: 'stop' ends the run naming the step and task(s), keeping the
  # last good checkpoint; 'skip' leaves the parameters unchanged for that step (docs/training.md).
  config.train.on_nonfinite = "stop"
  config.train.eval_every_steps = 0  # evaluate every N steps; 0: only at the end
  # Evaluate the step-0 model too and report per task whether training beat it.
  config.train.untrained_baseline = True
  # Add tasks to a trained model: comma-separated tasks (e.g. 'depth') trained from the latest
  # checkpoint of the run in init_from, config.tasks being that run's tasks followed by these.
  # Only the new tasks' own parameters train (their prompt rows, frequencies, decoder heads);
  # every other weight stays bitwise as trained, and the old tasks' outputs do not change
  # (docs/training.md, "Adding a task to a trained model"). Part of the model: evaluate and export need it too.
  config.train.new_tasks = ""
  # Workdir of the trained run that train.new_tasks starts from ('' with new_tasks: an error).
  config.train.init_from = ""
  # FAAR's performance-driven rank selection (freesine_jax/pdrs.py; docs/method.md,
  # "Baselines"): every LoRA pair trains with nested rank dropout, its ranks are scored from the
  # gradients, and its kept rank count (cap) shrinks at every interval. Set by the 'faar' arg.
  config.train.pdrs = ml_collections.ConfigDict()
  config.train.pdrs.enabled = False  # True: rank selection on every LoRA pair
  config.train.pdrs.rho = 0.95  # share of the score the kept ranks reach (paper 0.95; code 0.2)
  config.train.pdrs.beta = 0.98  # EMA factor of the per-rank scores
  config.train.pdrs.clip = 100.0  # a step's scores clipped at clip x their median
  config.train.pdrs.margin = 1  # ranks kept beyond the K that reach rho (FAAR's main.py: 1)
  config.train.pdrs.floor = 2  # never fewer ranks than this per set (FAAR's main.py: 2)
  config.train.pdrs.explore = 0.0  # probability of a step drawing from all R ranks, not cap
  config.train.pdrs.shrink_every_steps = 0  # steps between shrinks; 0: once per epoch (FAAR)

  config.eval = ml_collections.ConfigDict()  # evaluation
  # Single-task reference metrics {task: {headline metric: value}} for delta_m; None: no delta_m.
  config.eval.reference = ml_collections.FieldReference(None, field_type=dict)
  # Evaluate only the first N batches of eval_split (None: all of it). With P processes, each
  # host's first N of its contiguous 1/P of the split: another subset than on one process.
  config.eval.max_batches = ml_collections.FieldReference(None, field_type=int)
  # How many examples (the first of eval_split) freesine_jax.evaluate_main draws as PNG grids and
  # training draws in TensorBoard.
  config.eval.qualitative_examples = 4

  config.lock()
  return config
