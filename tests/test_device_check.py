"""benchmarks/device_check.sh --dry-run: the accelerator check's whole path on the CPU (the
accelerator tests collected, the GEMM roof, the merged eval program of a toy Swin timed, the
JSON and Markdown written). The train program's path is the same code as benchmarks/run.py's
(its dry run takes ~2 min to compile here, so the suite leaves it out)."""
import json
import subprocess

from conftest import REPO


def test_dry_run_writes_the_report(tmp_path, cli_env):
  out = tmp_path / "dc"
  proc = subprocess.run(
      ["bash", "benchmarks/device_check.sh", "--dry-run", f"--out={out}", "--programs=eval"],
      cwd=REPO, env=dict(cli_env, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((out / "device_check.json").read_text())
  assert report["dry_run"] and report["device"]["backend"] == "cpu"
  tests = report["tests"]
  assert tests["exit_code"] == 0 and "--collect-only" in tests["command"]
  collected = int(tests["summary"].split("/")[0])
  assert 20 <= collected < 200, tests["summary"]  # a marked subset, not the whole suite
  assert report["gemm_roof"]["float32"] > 0
  (result,) = report["results"]
  assert result["case"] == "free_sinewich" and result["kind"] == "eval (merged)"
  assert result["step_s"] > 0 and result["flops"] > 0 and result["program_gib"] > 0
  text = (out / "device_check.md").read_text()
  assert "(DRY RUN)" in text and "| free_sinewich | float32 | eval (merged) | 1 |" in text
  assert text in proc.stdout
