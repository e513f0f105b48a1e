"""Reading a task's data file: one record per line (per image for captions), each checked, so a wrong
line is reported with its file and line number before any model time is spent."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

from qwenvl_jax.jsonfile import ConfigFileError, get, read_object

from qwenvl_eval.tasks import CHOICE_LETTERS, Task

NUMBER = (int, float)


class DataError(ValueError):
  """A data file, line or image the run cannot use; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class Record:
  line: int  # 1-based line of the jsonl file (caption files: 1-based index into "images")
  image: str  # as written in the file: it goes into the prompt, and is read under the image root
  fields: dict[str, Any]


def _where(file: pathlib.Path, line: int, task: Task) -> str:
  return f'{file}: images[{line - 1}]' if task.family == 'caption' else f'{file}: line {line}'


def check_record(task: Task, d: Any, where: str) -> None:
  """Raises DataError naming `where` and the key unless `d` has the task's layout."""
  if not isinstance(d, dict):
    raise DataError(f'{where}: expected a JSON object, found {type(d).__name__}')
  try:
    _check(task, d, where)
  except ConfigFileError as e:
    raise DataError(str(e)) from None


def _check(task: Task, d: dict, where: str) -> None:
  get(d, 'image', str, where)
  if task.family == 'grounding':
    get(d, 'sent', str, where)
    box = get(d, 'bbox', list, where)
    if len(box) != 4 or not all(isinstance(v, NUMBER) and not isinstance(v, bool) for v in box):
      raise ConfigFileError(where, f'expected [x1, y1, x2, y2] (4 numbers), found {box!r}', 'bbox')
    get(d, 'width', NUMBER, where), get(d, 'height', NUMBER, where)
  elif task.family == 'vqa':
    get(d, 'question', str, where)
    get(d, 'question_id', (int, str), where)
    if task.metric in ('relaxed_accuracy', 'accuracy', 'gqa_accuracy'):
      get(d, 'answer', (str, list), where)  # the annotation the metric compares with
  elif task.family == 'caption':
    get(d, 'id', (int, str), where)
  else:
    get(d, 'hint', (str, type(None)), where, None)
    get(d, 'question', str, where)
    choices = get(d, 'choices', list, where)
    if not 1 <= len(choices) <= len(CHOICE_LETTERS) or not all(isinstance(c, str) for c in choices):
      raise ConfigFileError(where, f'expected 1 to {len(CHOICE_LETTERS)} strings, found {choices!r}', 'choices')
    answer = get(d, 'answer', int, where)
    if not 0 <= answer < len(choices):
      raise ConfigFileError(where, f'must index the choices (0..{len(choices) - 1}), found {answer}', 'answer')


def _raw(task: Task, file: pathlib.Path) -> list[tuple[int, Any]]:
  if task.family == 'caption':
    images = get(read_object(file), 'images', list, file)
    return list(enumerate(images, 1))
  try:
    text = file.read_text(encoding='utf-8')
  except (FileNotFoundError, IsADirectoryError):
    raise DataError(f'{file}: data file not found') from None
  except UnicodeDecodeError as e:
    raise DataError(f'{file}: not UTF-8 text ({e.reason} at byte {e.start})') from None
  out = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      out.append((n, json.loads(line)))
    except json.JSONDecodeError as e:
      raise DataError(f'{file}: line {n}: not valid JSON ({e.msg} at column {e.colno})') from None
  return out


def read_records(task: Task, file: str | os.PathLike, limit: int | None = None) -> list[Record]:
  """The task's records, in file order (the first `limit` of them when given)."""
  file = pathlib.Path(file)
  records = []
  try:
    for n, d in _raw(task, file):
      if limit is not None and len(records) >= limit:
        break
      check_record(task, d, _where(file, n, task))
      records.append(Record(n, d['image'], d))
  except ConfigFileError as e:
    raise DataError(str(e)) from None
  if not records:
    raise DataError(f'{file}: holds no records')
  return records


def check_images(records: list[Record], root: pathlib.Path, where) -> None:
  """Every record's image is a file under `root`; the first that is not is reported by `where(record)`."""
  top = root.resolve()
  for r in records:
    path = (top / r.image).resolve()
    inside = path.is_relative_to(top)
    if not inside or not path.is_file():
      raise DataError(f'{where(r)}: image {r.image!r} not found under the image root {root}'
                      + ('' if inside else ' (it points outside)'))


def locator(task: Task, file: str | os.PathLike):
  """record -> 'FILE: line N' (captions: 'FILE: images[i]'), for messages."""
  return lambda r: _where(pathlib.Path(file), r.line, task)


def fingerprint(file: str | os.PathLike) -> str:
  """sha256 of the data file: a rerun continues only predictions made from the same data."""
  h = hashlib.sha256()
  with open(file, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()
