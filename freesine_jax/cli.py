"""What every command line shares.

* Flags are defined when the command runs, never on import, so any modules can be imported
  together (two tools defining --out would otherwise collide).
* A user's mistake ends with ONE line on stderr, `<command>: <what is wrong; what would work>`,
  and exit code 2: a flag that does not parse, a --config file that does not exist, a config
  arg its get_config() rejects, a --config.<key> the config does not declare, a value out of
  its range (freesine_jax/config_checks.py), and every
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
import logging
import os
import re
import sys
import threading
import traceback
from typing import Any, Callable, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging
import ml_collections
from ml_collections import config_flags

from freesine_jax import config_checks
from freesine_jax import errors

EXIT_CODE = 2
# Set (to anything) to print a UserError's traceback before its line (e.g. to see which library
# call failed under a storage fault).
VERBOSE_ENV = "FREESINE_VERBOSE"
CONFIG_FLAG = "config"
CONFIG_HELP = "Config file and optional arg: configs/<file>.py[:<arg>]; override keys with " \
              "--config.<key>=<value> (docs/configuration.md)."


def fail(prog: str, message: Any) -> NoReturn:
  """Prints `prog: message` as one line on stderr and exits with EXIT_CODE.

  An error whose `exit_at_once` is set (a storage fault) ends the process without running the
  exit handlers: writers of a failing disk (TensorBoard's queue, Orbax) would block them
  forever."""
  text = " ".join(str(message).split("\n"))
  print(f"{prog}: {text}", file=sys.stderr, flush=True)
  if getattr(message, "exit_at_once", False):
    sys.stdout.flush()
    absl_logging.flush()
    os._exit(EXIT_CODE)  # pylint: disable=protected-access
  sys.exit(EXIT_CODE)


def define_config_flag() -> None:
  """--config (a locked ml_collections config file: overrides may only change declared keys)."""
  config_flags.DEFINE_config_file(CONFIG_FLAG, None, CONFIG_HELP, lock_config=True)


def define_run_flags(what: str) -> None:
  """--workdir (a training run, whose checkpoints/ are read) and --step (default: the latest),
  the flags every tool that reads a saved run shares; `what` the tool does with the step."""
  flags.DEFINE_string("workdir", None, "A training run's --workdir (its checkpoints/ are read).")
  flags.DEFINE_integer("step", None, f"Checkpoint step to {what} (default: the latest).")


def start_log_file(prog: str, workdir: str | None = None) -> str | None:
  """Sends absl's log lines (and those of jax, Orbax, TFDS, ...) to a file instead of stderr.

  The file gets INFO and up (--verbosity changes that); the console gets FATAL lines only
  (absl's default --stderrthreshold; --alsologtostderr copies everything, --logtostderr keeps
  the old behaviour: no file): the command's own lines and errors are printed, not logged.
  The folder is --log_dir if given, else `<workdir>/logs` for a local workdir, else absl's
  default (the temporary directory). Returns the file's path, or None when logging stays on
  stderr.
  """
  f = flags.FLAGS
  if f["logtostderr"].value:
    return None
  if not f["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.INFO)
  # A log line that cannot be written (the log's disk is full) is dropped, not followed by
  # Python's '--- Logging error ---' traceback on stderr.
  logging.raiseExceptions = False
  folders = [f.log_dir] if f.log_dir else []
  if workdir and "://" not in workdir:
    folders.append(os.path.join(os.path.expanduser(workdir), "logs"))
  handler = absl_logging.get_absl_handler()
  for folder in folders + [None]:  # None: absl's default folder
    try:
      if folder is not None:
        os.makedirs(folder, exist_ok=True)
      handler.start_logging_to_file(program_name=prog, log_dir=folder)
      return handler.python_handler.stream.name
    except OSError:
      continue
  return None


def _thread_failed(prog: str, log_path: str | None):
  """threading.excepthook: a background thread's exception goes to the log file; the console
  gets one line, or none for a storage fault (a checkpoint or TensorBoard writer on a full
  disk), which the command itself reports when it next saves (checkpointing.StorageFault)."""
  def hook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
      return
    absl_logging.error("thread %s failed", getattr(args.thread, "name", "?"),
                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    from freesine_jax import checkpointing  # pylint: disable=g-import-not-at-top
    if checkpointing.storage_fault_reason(args.exc_value) is not None:
      return
    text = " ".join(str(args.exc_value).split())[:300]
    print(f"{prog}: background thread {getattr(args.thread, 'name', '?')} failed: "
          f"{args.exc_type.__name__}: {text} (traceback in {log_path})", file=sys.stderr,
          flush=True)
  return hook


def _unraisable_to_log(unraisable) -> None:
  """sys.unraisablehook: "Exception ignored in ..." reports (e.g. Orbax's restore coroutines
  abandoned after a damaged checkpoint failed to read, each with a page of TensorStore spec)
  go to the log file; the command reports what matters itself."""
  absl_logging.warning("exception ignored in %r: %s", unraisable.object, unraisable.err_msg or "",
                       exc_info=(unraisable.exc_type, unraisable.exc_value,
                                 unraisable.exc_traceback))


def run(prog: str, define_flags: Callable[[], None], main: Callable[[list[str]], None], *,
        positional_args: bool = False, log_file: bool | Callable[[], bool] = True,
        workdir_flag: str | None = None) -> None:
  """Defines the flags, parses argv (one-line errors), runs main (UserError -> one line).

  main gets argv with the program name first; arguments that are not flags are refused unless
  `positional_args`. With `log_file` the log lines go to a file (`start_log_file`; in the
  folder `<--workdir_flag>/logs` when that flag names a local directory) and the first line of
  the output says where; commands whose output is itself a document (a Markdown table) pass
  False (or a function of argv, the flags parsed, saying whether this run writes one).
  """
  define_flags()

  def parse(argv: list[str]) -> list[str]:
    try:
      if CONFIG_FLAG in flags.FLAGS:
        check_config_args(argv)
      rest = flags.FLAGS(argv)
      if CONFIG_FLAG in flags.FLAGS and flags.FLAGS[CONFIG_FLAG].value is not None:
        config_checks.check_values(flags.FLAGS[CONFIG_FLAG].value)
      return rest
    except errors.UserError as e:
      fail(prog, e)
    except flags.Error as e:
      fail(prog, str(e).strip().splitlines()[0])

  def guarded(argv: list[str]) -> None:
    if len(argv) > 1 and not positional_args:
      fail(prog, f"unexpected arguments {' '.join(argv[1:])!r}; every option is a --flag=value")
    if log_file(argv) if callable(log_file) else log_file:
      path = start_log_file(prog, flags.FLAGS[workdir_flag].value if workdir_flag else None)
      if path:
        print(f"full log: {path} (--alsologtostderr also prints it here)", flush=True)
        threading.excepthook = _thread_failed(prog, path)
        sys.unraisablehook = _unraisable_to_log
    try:
      main(argv)
    except errors.UserError as e:
      if os.environ.get(VERBOSE_ENV):
        traceback.print_exc()
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
  except AttributeError as e:
    if "since the config is locked" not in str(e):
      raise
    raise errors.UserError(f"--config={spec}: {_undeclared_key(path, e)}") from None


def _undeclared_key(path: str, e: AttributeError) -> str:
  """One line for a config file that sets a key the locked config does not declare: where in
  the file, and the new key when it is one renamed since (config_checks.RENAMED)."""
  lines = [f for f in traceback.extract_tb(e.__traceback__)
           if os.path.abspath(f.filename) == os.path.abspath(path)]
  source = lines[-1].line if lines else ""
  where = f"{path}:{lines[-1].lineno} `{source}`" if lines else path
  for old in config_checks.RENAMED:
    if ".".join(old.split(".")[-2:]) in source:
      return f"{where}: {config_checks.renamed(old)}"
  what = str(e).strip("'\"").split(" Other fields present")[0].rstrip(".")
  return f"{where}: {what}; docs/configuration.md lists every key"


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
  moved = config_checks.renamed(key)
  if moved:
    raise errors.UserError(f"--{moved}; pass --config.{config_checks.RENAMED[key][0]}=...")
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
