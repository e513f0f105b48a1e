"""A run over a data file: this process's slice in batches, predictions appended as they come, a rerun
continuing where a stopped one left off, and process 0 merging and scoring.

Files in the output directory:
  run.json              the task and data the predictions belong to (a rerun with other data is refused)
  predictions.jsonl     process 0's predictions, one JSON line per record as soon as its batch is done
                        ({"line": data line, ...the original's row}); after the merge: every record's
  predictions.<k>.jsonl process k's (k > 0) until the merge folds them into predictions.jsonl
  predictions.json      the merged list in the original's layout and data order (what its scripts write)
  metrics.json          {"task", "metric", "score", "count", ...}
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Callable, Sequence

from tqdm import tqdm

from qwenvl_eval import scoring
from qwenvl_eval.data import DataError, Record
from qwenvl_eval.tasks import Task

PREDICTIONS = 'predictions.jsonl'


def shard(items: Sequence, process: int, count: int) -> Sequence:
  """Process `process`'s contiguous share, sizes differing by at most one (the original's sampler)."""
  size, extra = divmod(len(items), count)
  start = process * size + min(process, extra)
  return items[start:start + size + (process < extra)]


def _own_file(out: pathlib.Path, process: int) -> pathlib.Path:
  return out / (PREDICTIONS if process == 0 else f'predictions.{process}.jsonl')


def _prediction_files(out: pathlib.Path) -> list[pathlib.Path]:
  return sorted(out.glob('predictions*.jsonl'))


def _read_rows(file: pathlib.Path, repair: bool) -> dict[int, dict]:
  """Rows of a predictions file by data line. A last line without its newline is what a killed run
  leaves: it is dropped (and cut off the file when `repair`, the file being this process's own)."""
  data = file.read_bytes()
  complete = data[:data.rfind(b'\n') + 1]
  if repair and len(complete) != len(data):
    with open(file, 'r+b') as f:
      f.truncate(len(complete))
  rows = {}
  for n, line in enumerate(complete.decode('utf-8').splitlines(), 1):
    try:
      row = json.loads(line)
      rows[int(row.pop('line'))] = row
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
      raise DataError(f'{file}: line {n}: not a prediction row of this harness ({line[:80]!r}); '
                      'move the file away or use another --out') from None
  return rows


def _check_run(out: pathlib.Path, meta: dict, process: int, barrier: Callable[[str], None]) -> None:
  file = out / 'run.json'
  if process == 0 and not file.exists():
    out.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(meta, indent=1) + '\n')
  barrier('run.json')
  if file.exists():  # absent on a process that does not share the directory: nothing to compare
    saved = json.loads(file.read_text())
    if saved != meta:
      raise DataError(f'{out} holds predictions of another run ({saved}), not of this one ({meta}); '
                      'use another --out or remove it')


def run(task: Task, records: Sequence[Record], predict: Callable[[Sequence[Record]], list], out_dir,
        *, meta: dict, batch_size: int = 1, process: int = 0, process_count: int = 1,
        gather: Callable[[list], list[list]] = lambda rows: [rows], barrier: Callable[[str], None] = lambda name: None,
        progress: bool = True, score: Callable[[list[dict]], dict] | None = None) -> dict | None:
  """Predicts the records not yet in `out_dir`, merges and scores; returns the metrics (process 0).

  `gather(rows)` returns every process's rows (a list per process); `barrier(name)` waits for all.
  """
  if batch_size < 1:
    raise ValueError(f'--batch must be at least 1, got {batch_size}')
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  _check_run(out, meta, process, barrier)
  own = _own_file(out, process)
  known: dict[int, dict] = {}
  for file in _prediction_files(out):
    known.update(_read_rows(file, repair=file == own))
  wanted = {r.line for r in records}
  stray = sorted(set(known) - wanted)
  if stray:
    raise DataError(f'{out}: predictions for data lines {stray[:5]} that this run does not cover; '
                    'use another --out or remove it')
  barrier('read')  # every process has read the files before any appends
  pending = shard([r for r in records if r.line not in known], process, process_count)
  batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
  bar = tqdm(total=len(pending), desc=task.name, unit='item', disable=not progress or process != 0)
  with open(own, 'a', encoding='utf-8') as f:
    for batch in batches:
      answers = predict(batch)
      for r, answer in zip(batch, answers):
        row = scoring.prediction_row(task, r.fields, answer)
        known[r.line] = row
        f.write(json.dumps({'line': r.line, **row}, ensure_ascii=False) + '\n')
      f.flush()
      os.fsync(f.fileno())
      bar.update(len(batch))
  bar.close()
  everyone = gather([[line, row] for line, row in known.items()])
  metrics = None
  if process == 0:
    merged = {line: row for rows in everyone for line, row in rows}
    missing = sorted(wanted - set(merged))
    if missing:
      raise DataError(f'records of data lines {missing[:5]} got no prediction')
    ordered = [(r.line, merged[r.line]) for r in records]
    _write(out / PREDICTIONS, ''.join(json.dumps({'line': n, **row}, ensure_ascii=False) + '\n'
                                      for n, row in ordered))
    _write(out / 'predictions.json', json.dumps([row for _, row in ordered], ensure_ascii=False))
    for file in _prediction_files(out):
      if file.name != PREDICTIONS:
        file.unlink(missing_ok=True)
    if score is not None:
      metrics = score([row for _, row in ordered])
      _write(out / 'metrics.json', json.dumps(metrics, indent=1) + '\n')
  barrier('merged')
  if process != 0:
    own.unlink(missing_ok=True)
  return metrics


def _write(file: pathlib.Path, text: str) -> None:
  """Atomically: a stopped run never leaves a half-written merge behind."""
  tmp = file.with_name(file.name + '.tmp')
  tmp.write_text(text, encoding='utf-8')
  os.replace(tmp, file)
