"""Writes docs/configuration.md, the configuration reference, from the configs themselves.

  python scripts/config_reference.py          # rewrite docs/configuration.md
  python scripts/config_reference.py --check  # exit 1 if it is stale (tests/test_configs.py)

Every key of configs/base.py with its default (the expression written there) and its meaning
(the comments on and right above its line), then what each experiment config and each config
arg changes (computed by loading them).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import io
import os
import sys
import tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(REPO, "configs", "base.py")
OUTPUT = os.path.join(REPO, "docs", "configuration.md")
# (config module, default arg, the args shown in the arg table)
EXPERIMENTS = (("pascal_context", "r64"), ("nyud", "r64"), ("cityscapes", "r64"),
               ("synthetic", ""))


def _comments(source: str) -> dict[int, tuple[str, bool]]:
  """{line: (comment text, whether the line holds only the comment)}."""
  out = {}
  lines = source.splitlines()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      line = token.start[0]
      alone = lines[line - 1].strip().startswith("#")
      out[line] = (token.string.lstrip("#").strip(), alone)
  return out


def _path(target: ast.expr) -> str | None:
  """'a.b' for the assignment target config.a.b, else None."""
  parts = []
  while isinstance(target, ast.Attribute):
    parts.append(target.attr)
    target = target.value
  if isinstance(target, ast.Name) and target.id == "config" and parts:
    return ".".join(reversed(parts))
  return None


def _default_text(value: ast.expr, source: str) -> tuple[str, bool]:
  """(the default as written, whether the key is a section): FieldReference(x, ...) -> x."""
  if isinstance(value, ast.Call):
    name = ast.get_source_segment(source, value.func) or ""
    if name.endswith("ConfigDict"):
      return "", True
    if name.endswith("FieldReference"):
      return ast.get_source_segment(source, value.args[0]), False
  return " ".join((ast.get_source_segment(source, value) or "").split()), False


def declarations(source: str) -> list[dict]:
  """Every `config.<key> = <value>  # meaning` of base.py's get_config(), in order."""
  tree = ast.parse(source)
  function = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                  and n.name == "get_config")
  comments = _comments(source)
  lines = source.splitlines()
  entries = []
  for statement in function.body:
    if not isinstance(statement, ast.Assign) or len(statement.targets) != 1:
      continue
    key = _path(statement.targets[0])
    if key is None:
      continue
    above = []
    line = statement.lineno - 1
    while line >= 1 and line in comments and comments[line][1]:
      above.insert(0, comments[line][0])
      line -= 1
    trailing = [comments[n][0] for n in range(statement.lineno, statement.end_lineno + 1)
                if n in comments and not comments[n][1]]
    default, section = _default_text(statement.value, source)
    entries.append(dict(key=key, default=default, section=section,
                        meaning=" ".join(above + trailing),
                        line=lines[statement.lineno - 1]))
  return entries


def _flatten(config, prefix: str = "") -> dict:
  import ml_collections  # pylint: disable=g-import-not-at-top
  out = {}
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, f"{prefix}{name}."))
    else:
      out[f"{prefix}{name}"] = value
  return out


def _changes(config, reference, order: list[str]) -> list[tuple[str, object]]:
  """(key, value) of the keys whose values differ, in declaration order."""
  a, b = _flatten(config), _flatten(reference)
  return [(k, a[k]) for k in order if a[k] != b[k]]


def _md(value: object) -> str:
  return "`" + repr(value).replace("|", "\\|") + "`"


def render() -> str:
  """The Markdown of docs/configuration.md."""
  sys.path.insert(0, REPO)
  from configs import base  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  with open(BASE, encoding="utf-8") as f:
    entries = declarations(f.read())
  out = [
      "# Configuration reference",
      "",
      "Generated from `configs/base.py` by `python scripts/config_reference.py` (the tests fail",
      "when this page is stale). Every config has exactly these keys: `configs/base.py` declares",
      "them with their defaults (the paper's setting: Free Sinewich r=64, Swin-T, PASCAL-Context,",
      "MTLoRA's recipe) and returns a locked config, and the experiment configs only change",
      "values (last sections). On the command line, set a key with `--config.<key>=<value>`;",
      "write a tuple as a quoted Python literal, `--config.tasks=\"('semseg', 'normals')\"`. A",
      "key that is not declared here is an error naming the closest one. Dict-valued keys",
      "(`eval.reference`) are set in a config file.",
  ]
  from freesine_jax import config_checks  # pylint: disable=g-import-not-at-top
  out += ["", "## Config versions", "",
          "A config is versioned data: `version` (top level) is the layout of its keys, now",
          f"{config_checks.CONFIG_VERSION}. A run saves its config with its checkpoints and",
          "exports; a config saved under an older version is brought to this layout when it is",
          "read (evaluating, resuming, adding tasks to, exporting or analysing an older run),",
          "so older runs keep working. A key renamed since is refused in one line naming its",
          "new key, on the command line and in a config file (with the file's line). The",
          "renames:", "",
          "| old key | new key | since version |", "|---|---|---|"]
  out += [f"| `{old}` | `{new}` | {since} |"
          for old, (new, since) in config_checks.RENAMED.items()]
  meanings = {e["key"]: e["meaning"] for e in entries if e["section"]}
  current = None
  for entry in entries:
    if entry["section"]:
      continue
    if not entry["meaning"]:
      raise ValueError(f"configs/base.py: {entry['key']} has no comment saying what it means")
    parent = entry["key"].rpartition(".")[0]
    if parent != current:
      out += ["", f"## `{parent}`" if parent else "## Top level", ""]
      if parent:
        meaning = meanings[parent].rstrip(".")
        out += [meaning[:1].upper() + meaning[1:] + ".", ""]
      out += ["| key | default | meaning |", "|---|---|---|"]
      current = parent
    out.append(f"| `{entry['key']}` | `{entry['default']}` | "
               f"{entry['meaning'].replace('|', chr(92) + '|')} |")

  order = [e["key"] for e in entries if not e["section"]]
  reference = base.get_config()
  out += ["", "## What each config changes", "",
          "Relative to `configs/base.py`, with the config's default arg.", ""]
  for name, arg in EXPERIMENTS:
    module = importlib.import_module(f"configs.{name}")
    changes = _changes(module.get_config(arg), reference, order)
    label = f"`configs/{name}.py`" + (f" (arg `{arg}`)" if arg else "")
    out += [f"### {label}", ""]
    out += ["| key | value |", "|---|---|"] + [f"| `{k}` | {_md(v)} |" for k, v in changes]
    out.append("")
  out += ["## Config args", "",
          "`r<rank>` sets `model.lora.rank` (paper configs); `tiny` (`configs/synthetic.py`)",
          "and the ablations change, relative to the same config without them:", "",
          "| arg | changes |", "|---|---|"]
  from configs import pascal_context, synthetic  # pylint: disable=g-import-not-at-top
  tiny = _changes(synthetic.get_config("tiny"), synthetic.get_config(""), order)
  out.append("| `tiny` | " + ", ".join(f"`{k}` = {_md(v)}" for k, v in tiny) + " |")
  for ablation in common.ABLATIONS:
    changes = _changes(pascal_context.get_config(ablation), pascal_context.get_config(""),
                       order)
    out.append(f"| `{ablation}` | " + ", ".join(f"`{k}` = {_md(v)}" for k, v in changes)
               + " |")
  return "\n".join(out) + "\n"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale")
  args = parser.parse_args()
  text = render()
  if args.check:
    with open(OUTPUT, encoding="utf-8") as f:
      stale = f.read() != text
    if stale:
      print(f"{OUTPUT} is stale: run python scripts/config_reference.py", file=sys.stderr)
    return 1 if stale else 0
  with open(OUTPUT, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"wrote {OUTPUT}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
