"""Every command in README.md and docs/quickstart.md runs as printed, with tiny settings.

The commands are read from the documents' ```bash blocks. Each is run with its placeholder paths
(/tmp/run, /data/PASCAL_MT, /weights/swin_t, ...) replaced by test directories and, where a
command would train for long, tiny settings appended as further --config.<key> overrides (the
last value of a key wins): the tiny synthetic split, the small conv model of test_train.py, a
few steps. A command of a form this test does not know fails the test, so a new documented
command must come with its tiny settings here.
"""
import os
import re
import shlex

import pytest

import fake_datasets as fake
from conftest import REPO, TINY_FACTORY, run_cli

DOCUMENTS = ("README.md", os.path.join("docs", "quickstart.md"))
# Set up an environment or run everything: not run here (they install packages, or run the suite).
NOT_RUN = ("scripts/setup.sh", "scripts/demo.sh", "scripts/test.sh", "source .venv/bin/activate")
TINY_TRAINING = ["--config.dataset.builder_config=tiny", "--config.dataset.image_size=(32, 32)",
                 f"--config.model.factory={TINY_FACTORY}", "--config.model.backbone_weights=",
                 "--config.train.max_steps=2",
                 "--config.train.log_every_steps=1", "--config.train.image_every_steps=2",
                 "--config.eval.max_batches=1"]
TINY_EVALUATION = ["--config.dataset.builder_config=tiny", "--config.dataset.image_size=(32, 32)",
                   f"--config.model.factory={TINY_FACTORY}", "--config.model.backbone_weights=",
                   "--config.eval.max_batches=1"]
# A Swin small enough to initialise in seconds, for the command that loads pretrained weights.
MINIMAL_SWIN = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window=2,
                    patch_size=2)


def documented_commands() -> list[str]:
  """Every command of the documents' bash blocks (continuation lines joined, comments off)."""
  commands = []
  for document in DOCUMENTS:
    with open(os.path.join(REPO, document), encoding="utf-8") as f:
      text = f.read()
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
      block = block.replace("\\\n", " ")
      for line in block.splitlines():
        line = line.split("  #")[0].strip()
        if line and not line.startswith("#"):
          commands.append(" ".join(line.split()))
  return commands


def minimal_swin_pth(path: str) -> str:
  """A Microsoft-layout .pth of a randomly initialised MINIMAL_SWIN (torch reference)."""
  torch = pytest.importorskip("torch")
  import torch_swin_reference as ref  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = ref.SwinReference(img_size=32, patch=MINIMAL_SWIN["patch_size"],
                            embed_dim=MINIMAL_SWIN["embed_dim"], depths=MINIMAL_SWIN["depths"],
                            num_heads=MINIMAL_SWIN["num_heads"], window=MINIMAL_SWIN["window"])
  torch.save({"model": model.state_dict()}, path)
  return path


@pytest.fixture(scope="module")
def places(tmp_path_factory, tiny_run, free_sinewich_run, synthetic_data_dir):
  """Placeholder path in the documents -> the test's path."""
  root = tmp_path_factory.mktemp("readme")
  fake_nyud = fake.make_nyud(str(root / "NYUD_MT"))
  from freesine_jax.data import prepare  # pylint: disable=g-import-not-at-top
  prepare.prepare("nyud", fake_nyud, synthetic_data_dir)
  return {
      "/tmp/run": str(root / "run"),
      "/tmp/tiny": tiny_run,
      "/tmp/pascal": str(root / "pascal"),
      "/tmp/nyud": str(root / "nyud"),
      "/data/tfds": synthetic_data_dir,  # where the prepare command writes (FREESINE_DATA_DIR)
      "/data/PASCAL_MT": fake.make_pascal(str(root / "PASCAL_MT")),
      "swin_tiny_patch4_window7_224.pth": str(root / "swin_minimal.pth"),
      "/weights/swin_t": str(root / "weights"),
      "workdir/synthetic": free_sinewich_run[1],
      "runA": tiny_run, "runB": str(root / "run"), "runC": tiny_run, "runD": str(root / "run"),
  }


def substitute(command: str, places: dict) -> list[str]:
  argv = shlex.split(command)
  out = []
  for arg in argv:
    for placeholder in sorted(places, key=len, reverse=True):
      arg = re.sub(rf"(?<![\w/]){re.escape(placeholder)}(?![\w])", places[placeholder], arg)
    out.append(arg)
  return out


def tiny_settings(argv: list[str]) -> list[str] | None:
  """What runs the command with tiny settings (appended flags), or None for unknown forms."""
  command = " ".join(argv[:4])
  if argv[:3] == ["python", "-m", "freesine_jax.main"]:
    if "--config=configs/synthetic.py" in argv:
      return TINY_TRAINING
    if "--config=configs/synthetic.py:tiny" in argv:
      return []
    if any(a.startswith("--config=configs/nyud.py") for a in argv):
      return ["--config.dataset.image_size=(32, 32)", f"--config.model.factory={TINY_FACTORY}",
              "--config.input.batch_size=2", "--config.input.eval_batch_size=2",
              "--config.input.num_workers=0", "--config.train.max_steps=2",
              "--config.train.image_every_steps=0"]
    if any(a.startswith("--config=configs/pascal_context.py") for a in argv):
      # Loads the converted weights into a minimal Swin; no step and no batch (seconds).
      return ["--config.model.variant=custom",
              f"--config.model.embed_dim={MINIMAL_SWIN['embed_dim']}",
              f"--config.model.depths={MINIMAL_SWIN['depths']}",
              f"--config.model.num_heads={MINIMAL_SWIN['num_heads']}",
              f"--config.model.window_size={MINIMAL_SWIN['window']}",
              f"--config.model.patch_size={MINIMAL_SWIN['patch_size']}",
              "--config.dataset.image_size=(32, 32)", "--config.input.batch_size=2",
              "--config.input.eval_batch_size=2", "--config.input.num_workers=0",
              "--config.train.max_steps=0", "--config.train.untrained_baseline=False",
              "--config.eval.max_batches=0"]
  if command.startswith("python -m freesine_jax.evaluate_main --config=configs/synthetic.py"):
    return TINY_EVALUATION
  if argv[:3] == ["python", "-m", "freesine_jax.tools.count_params"]:
    return []
  if argv[:3] == ["python", "-m", "freesine_jax.data.prepare"]:
    return []
  if argv[:3] == ["python", "-m", "freesine_jax.tools.convert_swin"]:
    return []
  if argv[:2] == ["python", "benchmarks/flops.py"]:
    return ["--size=224", "--rank=4"]
  if argv[:3] == ["python", "-m", "freesine_jax.tools.analyze"]:
    return []
  if argv[:3] == ["python", "-m", "freesine_jax.tools.table"]:
    return []
  return None


# Dependencies first: data and weights before training, training before what reads runs.
ORDER = ("freesine_jax.data.prepare", "freesine_jax.tools.convert_swin", "configs/synthetic.py ",
         "freesine_jax.main", "freesine_jax.evaluate_main", "")


def _rank(command: str) -> int:
  return next(i for i, key in enumerate(ORDER) if key in command + " ")


def test_every_documented_command_runs(places, cli_env, tmp_path):
  commands = documented_commands()
  assert len(commands) >= 15, commands
  to_run = [c for c in commands if not c.startswith(NOT_RUN)]
  assert all(c in NOT_RUN for c in commands if c.startswith(NOT_RUN)), commands
  unknown = [c for c in to_run if tiny_settings(shlex.split(c)) is None]
  assert not unknown, f"documented commands without tiny settings in this test: {unknown}"
  minimal_swin_pth(places["swin_tiny_patch4_window7_224.pth"])
  outputs = {}
  for command in sorted(dict.fromkeys(to_run), key=_rank):
    # tools.analyze reads Sine-AWB layers: point it at the Free Sinewich run.
    argv = substitute(command, dict(places, **{"/tmp/run": places["workdir/synthetic"]})
                      if "tools.analyze" in command else places)
    if argv[:3] == ["python", "-m", "freesine_jax.main"] and "/tmp/tiny" in command:
      continue  # that run is conftest.tiny_run, trained by exactly this command
    proc = run_cli(argv[1:] + tiny_settings(argv), cli_env)
    assert proc.returncode == 0, (command, proc.stderr[-3000:])
    outputs[command] = proc.stdout
  by_program = lambda name: [out for c, out in outputs.items() if name in c]
  # What each kind of command must have said.
  trained = by_program("freesine_jax.main")
  assert all("final evaluation at step" in out for out in trained), trained
  assert any("step 2 of" in out and "wrote" in out for out in by_program("freesine_jax.evaluate_main"))
  count = by_program("count_params")[0].strip().splitlines()[-1]
  r = 64  # closed form of docs/method.md (tests/test_model.py checks the breakdown)
  assert count == ("trainable_params="
                   f"{70_656 * r + 12 * 9 * r * r + 387_072 + 2_880 + 4 + 483 + 51_258 + 1_072_904}")
  assert "prepared pascal_context" in by_program("freesine_jax.data.prepare")[0]
  assert "converted" in by_program("convert_swin")[0]
  assert "GFLOPs" in by_program("flops.py")[0]
  assert "median encoder layer" in by_program("tools.analyze")[0]
  assert "| ours | 2 |" in by_program("tools.table")[0]
