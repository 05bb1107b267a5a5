"""The comparison on the pretrained proxy (docs/results.md, "The study on the proxy").

  python -m freesine_jax.tools.study --plan=proxy --out=docs/results/proxy --budget_minutes=60
  python -m freesine_jax.tools.study --plan=proxy --out=docs/results/proxy --table

Setting (STUDY_ARGS): configs/synthetic.py adapting the proxy backbone ('proxy:synthetic'), the
four PASCAL-Context tasks (semseg, human_parts, sal, normals) at 64x64, 288 steps of batch 8, no
untrained-baseline evaluation (not a row's result). Rows: Free Sinewich, its ablations and sine
parametrisations, the baselines, and diagnostic rows asking why Free Sinewich trails (its decoder
group's sine, the low-pass, a larger ω₀, the sine with per-task heads); 3 seeds each
(config.seed: initialisation and data order).
"""
from freesine_jax.tools import study

SYNTHETIC = "configs/synthetic.py"
STUDY_ARGS = ("--config.tasks=('semseg', 'human_parts', 'sal', 'normals')",
              "--config.train.untrained_baseline=False")
OMEGA = lambda w: (f"--config.model.sine_awb.omega_0={w}", f"--config.model.decoder.omega_0={w}")
LITERAL = ("--config.model.sine_awb.base_norm=none", "--config.model.decoder.base_norm=none",
           *OMEGA(1), "--config.model.clock_spread=0")


def get_plan() -> study.Plan:
  rows = (
      study.Row("free_sinewich", "Free Sinewich", SYNTHETIC),
      study.Row("no_sine", "w/o sine", f"{SYNTHETIC}:no_sine"),
      study.Row("no_lcn", "w/o Clock Net", f"{SYNTHETIC}:no_lcn"),
      study.Row("independent_decoder", "independent decoder",
                f"{SYNTHETIC}:independent_decoder"),
      study.Row("literal", "literal sin(ω_t·M)", SYNTHETIC, LITERAL),
      study.Row("omega1", "ω₀ = 1", SYNTHETIC, OMEGA(1)),
      study.Row("omega2", "ω₀ = 2", SYNTHETIC, OMEGA(2)),
      study.Row("mtlora", "MTLoRA", f"{SYNTHETIC}:mtlora"),
      study.Row("tadformer", "TADFormer", f"{SYNTHETIC}:tadformer"),
      study.Row("faar", "FAAR", f"{SYNTHETIC}:faar"),
      study.Row("lora", "LoRA", f"{SYNTHETIC}:lora"),
      study.Row("decoder_only", "decoder-only", f"{SYNTHETIC}:decoder_only"),
      study.Row("full_ft", "full fine-tuning", f"{SYNTHETIC}:full_ft"),
      # Diagnostics: why Free Sinewich trails here (issue 33, point 5).
      study.Row("decoder_no_sine", "decoder group w/o sine", SYNTHETIC,
                ("--config.model.decoder.modulation=linear",)),
      study.Row("no_lowpass", "no low-pass", SYNTHETIC,
                ("--config.model.sine_awb.lowpass=none", "--config.model.decoder.lowpass=none")),
      study.Row("omega4", "ω₀ = 4", SYNTHETIC, OMEGA(4)),
      study.Row("independent_decoder_no_sine", "independent decoder, w/o sine",
                f"{SYNTHETIC}:independent_decoder,no_sine"),
      # FAAR's parts: what its TS-PD heads (and their radial grid) give.
      study.Row("faar_frequency_grid", "FAAR, TS-PD on true frequencies", f"{SYNTHETIC}:faar",
                ("--config.model.decoder.tspd_grid=frequency",)),
      study.Row("faar_no_tspd", "FAAR w/o TS-PD (plain HRNet heads)", f"{SYNTHETIC}:faar",
                ("--config.model.decoder.kind=independent",)),
  )
  tables = (
      study.Table("Free Sinewich and its sine (Δm vs w/o sine)", reference="no_sine",
                  rows=("free_sinewich", "no_sine", "no_lcn", "independent_decoder", "literal",
                        "omega1", "omega2")),
      study.Table("Against the baselines (Δm vs decoder-only)", reference="decoder_only",
                  rows=("free_sinewich", "mtlora", "tadformer", "faar", "lora", "decoder_only",
                        "full_ft")),
      study.Table("Diagnostics (Δm vs Free Sinewich)", reference="free_sinewich",
                  rows=("free_sinewich", "decoder_no_sine", "no_lowpass", "omega2", "omega4",
                        "independent_decoder", "independent_decoder_no_sine")),
      study.Table("FAAR's decoder (Δm vs FAAR)", reference="faar",
                  rows=("faar", "faar_frequency_grid", "faar_no_tspd", "mtlora")),
  )
  return study.Plan("proxy", rows, seeds=(0, 1, 2), common_args=STUDY_ARGS, tables=tables)
