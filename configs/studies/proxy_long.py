"""Does the proxy study's ranking hold at 4x its training length? (docs/results.md)

  python -m freesine_jax.tools.study --plan=proxy_long --out=docs/results/proxy_long
  python -m freesine_jax.tools.study --plan=proxy_long --out=docs/results/proxy_long --table

The proxy plan's setting (configs/studies/proxy.py) with 24 epochs instead of 6 (1152 steps of
batch 8, warmup 4 epochs), seed 0, for three of its rows: Free Sinewich, w/o sine (the sine's
effect) and MTLoRA (the strongest baseline there).
"""
from configs.studies import proxy
from freesine_jax.tools import study

LONG_ARGS = ("--config.train.num_epochs=24", "--config.train.warmup_epochs=4")


def get_plan() -> study.Plan:
  short = proxy.get_plan()
  rows = tuple(short.row(name) for name in ("free_sinewich", "no_sine", "mtlora"))
  tables = (study.Table("At 4x the training length (Δm vs w/o sine)", reference="no_sine",
                        rows=("free_sinewich", "no_sine", "mtlora")),)
  return study.Plan("proxy_long", rows, seeds=(0,),
                    common_args=proxy.STUDY_ARGS + LONG_ARGS, tables=tables)
