"""What every metric module shares: the error for unusable inputs and small input checks."""
from __future__ import annotations

from typing import Any


class MetricInputError(ValueError):
  """Inputs a metric cannot score; the message names the entry and what is wrong with it."""


def as_list(value: Any, what: str) -> list:
  if not isinstance(value, list):
    raise MetricInputError(f'{what} must be a list, got {type(value).__name__}')
  return value


def entry_field(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
  if not isinstance(entry, dict) or key not in entry:
    raise MetricInputError(f'{where} has no {key!r}: {entry!r}'[:300])
  if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
    raise MetricInputError(f'{where}: {key!r} must be {getattr(kind, "__name__", kind)}, got {entry[key]!r}')
  return entry[key]


def annotations_of(entry: Any, where: str) -> list[str]:
  """An entry's 'annotation': one string or a non-empty list of strings (the original accepts both)."""
  ann = entry_field(entry, 'annotation', (str, list), where)
  ann = [ann] if isinstance(ann, str) else ann
  if not ann or not all(isinstance(a, str) for a in ann):
    raise MetricInputError(f'{where}: annotation must be a string or a non-empty list of strings, got {ann!r}')
  return ann
