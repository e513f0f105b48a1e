"""Reading JSON files that users edit (config.json, generation_config.json, training configs).

Every problem is a `ConfigFileError` that names the file and, where there is one, the key: a missing
file, invalid JSON (with line and column), a list where an object belongs, a missing key or a value of
the wrong type. One definition, so every config file in the project fails the same clear way.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping

_MISSING = object()


class ConfigFileError(ValueError):
  """A config file that cannot be used; the message names the file and the key."""

  def __init__(self, file: str | os.PathLike, problem: str, key: str | None = None):
    self.file, self.key, self.problem = os.fspath(file), key, problem
    where = f'{self.file}: key {key!r}: ' if key else f'{self.file}: '
    super().__init__(where + problem)


def read_object(file: str | os.PathLike) -> dict[str, Any]:
  """The JSON object in `file`; anything else (missing, not JSON, a list...) raises ConfigFileError."""
  file = pathlib.Path(file)
  try:
    text = file.read_text(encoding='utf-8')
  except FileNotFoundError:
    raise ConfigFileError(file, 'file not found') from None
  except IsADirectoryError:
    raise ConfigFileError(file, 'is a directory, not a JSON file') from None
  except UnicodeDecodeError as e:
    raise ConfigFileError(file, f'not UTF-8 text ({e.reason} at byte {e.start})') from None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigFileError(file, f'not valid JSON: {e.msg} at line {e.lineno} column {e.colno}') from None
  if not isinstance(value, dict):
    raise ConfigFileError(file, f'expected a JSON object ({{...}}) at the top level, found {_kind(value)}')
  return value


def _kind(value: Any) -> str:
  if value is None:
    return 'null'
  return {bool: 'a boolean', int: 'an integer', float: 'a number', str: 'a string', list: 'a list',
          dict: 'an object'}.get(type(value), type(value).__name__)


def get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], file: str | os.PathLike,
        default: Any = _MISSING, *, prefix: str = '') -> Any:
  """`d[key]` checked against `kind` (int, float, bool, str, list, dict or a tuple of them).

  An int is accepted where a float is asked for; a bool never counts as a number; floats must be finite.
  `prefix` names the enclosing object in messages ('visual.' for nested keys).
  """
  name = prefix + key
  if key not in d:
    if default is _MISSING:
      raise ConfigFileError(file, 'missing (required)', name)
    return default
  value = d[key]
  kinds = kind if isinstance(kind, tuple) else (kind,)
  ok = any(_is(value, k) for k in kinds)
  if not ok:
    wanted = ' or '.join(_kind(_example(k)) for k in kinds)
    raise ConfigFileError(file, f'expected {wanted}, found {_kind(value)} {value!r}', name)
  if isinstance(value, float) and not math.isfinite(value):
    raise ConfigFileError(file, f'must be finite, found {value!r}', name)
  return float(value) if float in kinds and int not in kinds and isinstance(value, int) else value


def _is(value: Any, kind: type) -> bool:
  if isinstance(value, bool):
    return kind is bool
  if kind is float:
    return isinstance(value, (int, float))
  return isinstance(value, kind)


def _example(kind: type) -> Any:
  return {int: 0, float: 0.0, bool: True, str: '', list: [], dict: {}}.get(kind, kind)
