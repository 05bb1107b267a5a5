"""What every command line shares.

* Flags are defined when the command runs, never on import, so any modules can be imported
  together (two tools defining --out would otherwise collide).
* A user's mistake ends with ONE line on stderr, `<command>: <what is wrong; what would work>`,
  and exit code 2: a flag that does not parse, a --config file that does not exist, a config
  arg its get_config() rejects, a --config.<key> the config does not declare, and every
  `errors.UserError` the command raises. Anything else is a bug and keeps its traceback.

  def define_flags():
    flags.DEFINE_string("workdir", None, "...")
  def main(argv):
    ...
  def run():  # the console script / __main__
    cli.run("freesine_jax.tools.x", define_flags, main)
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from freesine_jax import errors

EXIT_CODE = 2
CONFIG_FLAG = "config"
CONFIG_HELP = "Config file and optional arg: configs/<file>.py[:<arg>]; override keys with " \
              "--config.<key>=<value> (docs/configuration.md)."


def fail(prog: str, message: Any) -> NoReturn:
  """Prints `prog: message` as one line on stderr and exits with EXIT_CODE."""
  text = " ".join(str(message).split("\n"))
  print(f"{prog}: {text}", file=sys.stderr, flush=True)
  sys.exit(EXIT_CODE)


def define_config_flag() -> None:
  """--config (a locked ml_collections config file: overrides may only change declared keys)."""
  config_flags.DEFINE_config_file(CONFIG_FLAG, None, CONFIG_HELP, lock_config=True)


def define_run_flags(what: str) -> None:
  """--workdir (a training run, whose checkpoints/ are read) and --step (default: the latest),
  the flags every tool that reads a saved run shares; `what` the tool does with the step."""
  flags.DEFINE_string("workdir", None, "A training run's --workdir (its checkpoints/ are read).")
  flags.DEFINE_integer("step", None, f"Checkpoint step to {what} (default: the latest).")


def run(prog: str, define_flags: Callable[[], None], main: Callable[[list[str]], None], *,
        positional_args: bool = False) -> None:
  """Defines the flags, parses argv (one-line errors), runs main (UserError -> one line).

  main gets argv with the program name first; arguments that are not flags are refused unless
  `positional_args`.
  """
  define_flags()

  def parse(argv: list[str]) -> list[str]:
    try:
      if CONFIG_FLAG in flags.FLAGS:
        check_config_args(argv)
      return flags.FLAGS(argv)
    except errors.UserError as e:
      fail(prog, e)
    except flags.Error as e:
      fail(prog, str(e).strip().splitlines()[0])

  def guarded(argv: list[str]) -> None:
    if len(argv) > 1 and not positional_args:
      fail(prog, f"unexpected arguments {' '.join(argv[1:])!r}; every option is a --flag=value")
    try:
      main(argv)
    except errors.UserError as e:
      fail(prog, e)

  app.run(guarded, flags_parser=parse)


# ----------------------------------------------------------------------------- --config checks


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of --name=value or --name value in argv (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    if re.fullmatch(rf"--?{name}=.*", arg):
      value = arg.split("=", 1)[1]
    elif re.fullmatch(rf"--?{name}", arg) and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _override_keys(argv: Sequence[str]) -> list[str]:
  """The <key> of every --config.<key>[=value] in argv."""
  keys = []
  for arg in argv:
    match = re.match(rf"--?(?:no)?{CONFIG_FLAG}\.([^=]+)", arg)
    if match:
      keys.append(match.group(1))
  return keys


def config_files(directory: str) -> list[str]:
  """The config files of a directory: the .py files that define get_config()."""
  found = []
  for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
    with open(path, encoding="utf-8") as f:
      if re.search(r"^def get_config\(", f.read(), re.MULTILINE):
        found.append(path)
  return found


def load_config(spec: str) -> ml_collections.ConfigDict:
  """get_config(<arg>) of 'path/to/config.py[:<arg>]', with one-line errors (UserError)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    directory = os.path.dirname(path)
    known = config_files(directory if os.path.isdir(directory or ".") else "configs")
    raise errors.UserError(
        f"--config={spec}: no such file{errors.did_you_mean(path, known)}; the configs are "
        f"{', '.join(known) or 'in configs/ of the repository'}")
  module_spec = importlib.util.spec_from_file_location("_freesine_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise errors.UserError(f"--config={spec}: {path} defines no get_config()")
  try:
    return module.get_config(arg) if arg else module.get_config()
  except errors.UserError as e:
    raise errors.UserError(f"--config={spec}: {e}") from None


def leaf_keys(declared: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every key path of a config ('model.lora.rank', ...), sections and leaves."""
  keys = []
  for name, value in declared.items():
    path = f"{prefix}{name}"
    keys.append(path)
    if isinstance(value, ml_collections.ConfigDict):
      keys += leaf_keys(value, path + ".")
  return keys


def check_key(declared: ml_collections.ConfigDict, key: str) -> None:
  """UserError unless `key` ('a.b.c') is a key of the config `declared`."""
  node = declared
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = leaf_keys(declared)
      hint = errors.did_you_mean(key, known).replace("did you mean '", "did you mean "
                                                     "'--config.")
      raise errors.UserError(
          f"--config.{key}: the config declares no key {key!r}{hint}; docs/configuration.md "
          "lists every key")
    node = node[part]


def check_config_args(argv: Sequence[str]) -> None:
  """Loads --config and checks its arg and each --config.<key> before config_flags parses them."""
  spec = _flag_value(argv, CONFIG_FLAG)
  if spec is None:
    return
  config = load_config(spec)
  for key in _override_keys(argv):
    check_key(config, key)
