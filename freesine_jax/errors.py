"""The one exception type for mistakes a user can fix: a config key, a task name, a path.

Command lines (freesine_jax/cli.py) print a `UserError` as one line and exit with code 2; any
other exception is a bug and keeps its traceback. The message says what is wrong and what would
work, on one line.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Iterable


class UserError(ValueError):
  """A mistake in the command line, the config or the files it names; the message is one line."""

  def __init__(self, message: str):
    if "\n" in message:
      raise ValueError(f"UserError messages are one line, got {message!r}")
    super().__init__(message)


def first_line(exc: BaseException) -> str:
  """The first line of an exception's message ('no message' when it has none): what a one-line
  error quotes of a library's multi-line message."""
  text = str(exc).strip()
  return text.splitlines()[0] if text else "no message"


def causes(exc: BaseException, limit: int = 10) -> list[BaseException]:
  """`exc` and the exceptions it was raised from or during (__cause__, else __context__),
  outermost first, at most `limit`."""
  chain = []
  while exc is not None and len(chain) < limit:
    chain.append(exc)
    exc = exc.__cause__ or exc.__context__
  return chain


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
  """' (did you mean 'x'?)' for the closest candidate, or '' when none is close."""
  close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def resolve(reference: str, what: str) -> Any:
  """The attribute a 'package.module:attribute' reference names, imported on first use: the one
  resolver of the task registry, config.model.factory and the dataset registry. A reference
  that is malformed, whose module does not import or lacks the attribute is a UserError naming
  `what` (where the reference came from) and the reference."""
  module_name, sep, attribute = reference.partition(":")
  if not sep or not module_name or not attribute:
    raise UserError(f"{what}: {reference!r} is not 'package.module:attribute'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UserError(f"{what}: {reference!r}: cannot import {module_name} "
                    f"({first_line(e)}); is its directory on PYTHONPATH?") from None
  if not hasattr(module, attribute):
    raise UserError(f"{what}: {reference!r}: {module_name} has no {attribute!r}")
  return getattr(module, attribute)
