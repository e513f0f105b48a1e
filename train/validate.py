"""The whole training set checked before step 1, every problem reported at once.

A record that cannot be trained on would otherwise stop a run when its batch comes up, hours in. So
every record is checked up front: its fields and their types, the `<img>`, `<ref>`, `<box>` and `<quad>`
tags of every text (closed, not nested, boxes of integers in [0, 1000)), its image files (present under
the data root and with a readable header: `PIL.Image.verify`, no pixel decoding), and its length against
the longest bucket (`on_overlong`). Problems are listed by record (and line of a .jsonl file), field and
reason; a full decode that fails later is handled by on_bad_record (train/loader.py): stop with a
checkpoint, or skip and log. Packed datasets are checked when packed (train/packing.py).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

from PIL import Image

from qwenvl_jax.images import ImageLoader
from qwenvl_jax.tokenizer import QwenVLTokenizer
from train.data import IMG_TAG, TASK_FIELDS, Encoder, truncate
from train.loader import Loader, LoaderConfig
from train.packed import ListSource

MAX_LISTED = 50  # problems listed in an error; the rest are counted
_TAG = re.compile(r'<(/?)(img|ref|box|quad)>')
_POINT = r'\(\s*(\d+)\s*,\s*(\d+)\s*\)'
_POINTS = {'box': 2, 'quad': 4}
_URL = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')


@dataclasses.dataclass(frozen=True)
class Problem:
  where: str  # 'train.jsonl record 7 (line 8)'
  field: str  # 'image', 'conversations[1].value'; '' for the record as a whole
  reason: str

  def __str__(self) -> str:
    return f'{self.where}: ' + (f'{self.field}: ' if self.field else '') + self.reason


class DataError(ValueError):
  """Training data that cannot be used; the message lists the problems (at most MAX_LISTED)."""

  def __init__(self, source: str, problems: Sequence[Problem], total: int):
    self.problems = list(problems)
    listed = [f'  {p}' for p in self.problems[:MAX_LISTED]]
    if len(self.problems) > MAX_LISTED:
      listed.append(f'  ... and {len(self.problems) - MAX_LISTED} more')
    super().__init__(f'{source}: {len(self.problems)} problem(s) in {total} records, nothing trained yet; '
                     'fix them and run again:\n' + '\n'.join(listed))


@dataclasses.dataclass(frozen=True)
class DataReport:
  """What validation decided: the records to train on (indices into the file), which of them are cut to
  the longest bucket, and the records left out, each with its reason."""
  source: str
  total: int
  used: tuple[int, ...]
  truncated: tuple[int, ...]
  skipped: tuple[dict, ...]  # {'record', 'line'?, 'id'?, 'tokens', 'reason'}

  def summary(self, max_len: int, skipped_file: str | os.PathLike | None = None) -> str:
    listed = f' (listed in {skipped_file})' if skipped_file and self.skipped else ''
    return (f'data: {self.total} records in {self.source}: {len(self.used)} used, {len(self.truncated)} '
            f'truncated to the longest bucket ({max_len} tokens), {len(self.skipped)} skipped{listed}')

  def write_skipped(self, path: str | os.PathLike) -> None:
    with open(path, 'w', encoding='utf-8') as f:
      for s in self.skipped:
        f.write(json.dumps(s) + '\n')


def where(source: str, i: int, record: Any, lines: Sequence[int] | None) -> str:
  line = f' (line {lines[i]})' if lines is not None else ''
  named = f' (id {record["id"]})' if isinstance(record, Mapping) and 'id' in record else ''
  return f'{source} record {i}{line}{named}'


def texts(encoder: Encoder, record: Mapping[str, Any]) -> list[tuple[str, str]]:
  """(field, text) of every text the record contributes, image paths as `<img>` tags; the record has
  passed `encoder.check`."""
  if encoder.format == 'chat':
    return [(f'conversations[{k}].value', t['value']) for k, t in enumerate(record['conversations'])]
  fields = ('image', 'caption') if encoder.format == 'caption' else TASK_FIELDS[record['task']]
  return [(f, f'<img>{record[f]}</img>' if f == 'image' else record[f]) for f in fields if f != 'box']


def tag_problems(text: str) -> list[str]:
  """What is wrong with the markup of `text`: unclosed, stray or nested tags, malformed boxes."""
  problems, open_tag, start = [], None, 0
  for m in _TAG.finditer(text):
    closing, name = m.group(1) == '/', m.group(2)
    if open_tag == 'img' and not (closing and name == 'img'):
      continue  # an image path is bytes, not markup
    if not closing:
      if open_tag is not None:
        problems.append(f'<{name}> inside <{open_tag}> (tags do not nest)')
        return problems
      open_tag, start = name, m.end()
    elif name != open_tag:
      problems.append(f'</{name}> without an open <{name}>')
      return problems
    else:
      if name in _POINTS:
        problems += _coordinate_problems(name, text[start:m.start()])
      open_tag = None
  if open_tag is not None:
    problems.append(f'<{open_tag}> is never closed')
  return problems


def _coordinate_problems(name: str, inner: str) -> list[str]:
  n = _POINTS[name]
  if not re.fullmatch(r'\s*' + r'\s*,\s*'.join([_POINT] * n) + r'\s*', inner):
    shape = ','.join(f'(x{k},y{k})' for k in range(1, n + 1))
    return [f'<{name}>{inner[:40]}</{name}> is not {shape} with integer coordinates']
  values = [int(v) for v in re.findall(r'\d+', inner)]
  if any(v >= 1000 for v in values):
    return [f'<{name}>{inner}</{name}> has coordinates outside [0, 1000)']
  return []


def image_problem(loader: ImageLoader, path: str) -> str | None:
  """Why the image at `path` cannot be trained on, or None; reads the header only."""
  if _URL.match(path):
    return f'{path!r} is a URL: training reads images from files under data_root only'
  try:
    resolved = loader.resolve(path)
    with Image.open(resolved) as im:
      im.verify()  # the header and the file's structure, without decoding pixels
  except FileNotFoundError:
    return f'image not found: {path}'
  except PermissionError as e:
    return str(e)
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
    return f'cannot read image {path}: {e}'
  return None


def validate(records: Sequence[Any], encoder: Encoder, loader: ImageLoader, max_len: int,
             on_overlong: str, source: str, lines: Sequence[int] | None = None,
             threads: int = 8) -> DataReport:
  """Checks every record; raises DataError listing every problem, else returns what to train on."""
  problems: list[Problem] = []
  images: dict[str, list[tuple[str, str]]] = {}  # path -> [(where, field)]
  checked = []
  for i, record in enumerate(records):
    at = where(source, i, record, lines)
    try:
      encoder.check(record, at)
    except ValueError as e:
      problems.append(Problem(at, '', str(e).removeprefix(f'{at}: ')))
      continue
    bad = False
    for field, text in texts(encoder, record):
      for reason in tag_problems(text):
        problems.append(Problem(at, field, reason))
        bad = True
      for path in IMG_TAG.findall(text):
        images.setdefault(path, []).append((at, field))
    if not bad:
      checked.append(i)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # header reads wait on the disk
    verdicts = dict(zip(images, pool.map(lambda p: image_problem(loader, p), images)))
  unusable = set()
  for path, reason in verdicts.items():
    for at, field in images[path] if reason else ():
      problems.append(Problem(at, field, reason))
      unusable.add(at)

  used, truncated, skipped = [], [], []
  tok = encoder.tok
  for i in checked:
    record, at = records[i], where(source, i, records[i], lines)
    if at in unusable:
      continue
    try:
      ex = encoder(record)
    except ValueError as e:
      problems.append(Problem(at, '', str(e)))
      continue
    n = len(ex.ids)
    if not ex.target[1:].any():
      problems.append(Problem(at, '', 'no token to train on (e.g. no assistant turn)'))
      continue
    if n <= max_len:
      used.append(i)
      continue
    over = f'{n} tokens, over the longest bucket ({max_len})'
    if on_overlong == 'error':
      problems.append(Problem(at, '', f'{over} (on_overlong=error; or set on_overlong=truncate or skip, '
                                      'or add a longer seq_buckets entry)'))
    elif on_overlong == 'skip':
      skipped.append(_skip(i, record, lines, n, f'{over} (on_overlong=skip)'))
    elif not truncate(ex, max_len, tok.img_start_id, tok.img_end_id).target[1:].any():
      skipped.append(_skip(i, record, lines, n, f'{over}: cutting it leaves no token to train on'))
    else:
      used.append(i)
      truncated.append(i)
  if problems:
    problems.sort(key=lambda p: _record_number(p.where))
    raise DataError(source, problems, len(records))
  return DataReport(source, len(records), tuple(used), tuple(truncated), tuple(skipped))


def _skip(i: int, record: Any, lines: Sequence[int] | None, tokens: int, reason: str) -> dict:
  out: dict[str, Any] = {'record': i}
  if lines is not None:
    out['line'] = lines[i]
  if isinstance(record, Mapping) and 'id' in record:
    out['id'] = record['id']
  return {**out, 'tokens': tokens, 'reason': reason}


def _record_number(at: str) -> int:
  m = re.search(r' record (\d+)', at)
  return int(m.group(1)) if m else -1


def read_records(path: str | os.PathLike) -> tuple[list[Any], list[int] | None]:
  """(records, their line numbers for a .jsonl file else None) of a .json list or a .jsonl file; every
  line that is not JSON is reported at once."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'data file not found: {path}')
  try:
    text = path.read_text(encoding='utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start})') from None
  if path.suffix == '.jsonl':
    records, lines, problems = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
        lines.append(n)
      except json.JSONDecodeError as e:
        problems.append(Problem(f'{path} line {n}', '', f'not valid JSON: {e.msg} at column {e.colno}'))
    if problems:
      raise DataError(str(path), problems, len(records) + len(problems))
  else:
    try:
      records, lines = json.loads(text), None
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}') from None
    if not isinstance(records, list):
      raise ValueError(f'{path}: expected a JSON list of records (or a .jsonl file, one record a line)')
  if not records:
    raise ValueError(f'{path}: holds no records')
  return records, lines


def make_loader(records: Sequence[Any], tokenizer: QwenVLTokenizer, data_format: str, chat_labels: str,
                cfg: LoaderConfig, image_root: str | os.PathLike, process_index: int = 0,
                process_count: int = 1, source: str = 'data', lines: Sequence[int] | None = None,
                on_overlong: str = 'truncate') -> tuple[Loader, DataReport]:
  """A loader over the usable records (DataError listing every problem otherwise), and the report."""
  encoder = Encoder(tokenizer, data_format, chat_labels, cfg.max_images)
  images = ImageLoader(allowed_root=image_root)
  report = validate(records, encoder, images, cfg.seq_buckets[-1], on_overlong, source, lines)
  source = ListSource([records[i] for i in report.used], image_root, source, report.used, lines)
  return Loader(source, encoder, cfg, process_index, process_count), report
