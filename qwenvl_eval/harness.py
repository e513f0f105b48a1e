"""The library entry points: `evaluate` (a model in memory, records as dicts) and `run` (files, as the
CLI runs them, on one process or every process of a pod)."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any, Mapping, NamedTuple, Sequence

from qwenvl_jax.images import ImageLoader

from qwenvl_eval import runner, scoring
from qwenvl_eval.data import DataError, Record, check_images, check_record, fingerprint, locator, read_records
from qwenvl_eval.predict import Predictor
from qwenvl_eval.tasks import Task, get_task


class Result(NamedTuple):
  metrics: dict[str, Any]  # {'task', 'metric', 'score', 'count', ...}
  predictions: list[dict[str, Any]]  # the original's merged rows, in record order


def _scorer(task: Task, annotations: Any, questions: Any):
  # A run may cover part of an annotation file (--limit, a sample): only its questions are scored.
  return lambda rows: scoring.score(task, rows, annotations, questions, subset=True)


def evaluate(task: str | Task, model, params, tokenizer, records: Sequence[Mapping[str, Any]], *,
             image_root: str | os.PathLike, out_dir: str | os.PathLike | None = None, batch_size: int = 8,
             annotations: Any = None, questions: Any = None, progress: bool = False) -> Result:
  """Scores `model` on `records` (dicts in the task's data layout, see `qwenvl_eval.tasks`), images read
  under `image_root`. E.g. grounding: records [{"image", "sent", "bbox", "width", "height"}] ->
  `Result.metrics['score']` is Precision@1. Predictions go to `out_dir` (default: a temporary
  directory), so a rerun into the same `out_dir` continues."""
  task = get_task(task)
  recs = []
  for i, d in enumerate(records):
    check_record(task, d, f'records[{i}]')
    recs.append(Record(i + 1, d['image'], dict(d)))
  root, where = pathlib.Path(image_root), lambda r: f'records[{r.line - 1}]'
  check_images(recs, root, where)
  predictor = Predictor(task, model, params, tokenizer, ImageLoader(allowed_root=root), where=where)
  digest = hashlib.sha256(json.dumps([r.fields for r in recs], sort_keys=True).encode()).hexdigest()
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(tmp)
    metrics = runner.run(task, recs, predictor, out, meta={'task': task.name, 'records': digest},
                         batch_size=batch_size, progress=progress, score=_scorer(task, annotations, questions))
    predictions = json.loads((out / 'predictions.json').read_text())
  return Result(metrics, predictions)


def run(task: str | Task, model, params, tokenizer, data: str | os.PathLike, *, image_root, out_dir,
        batch_size: int = 1, limit: int | None = None, annotations: Any = None, questions: Any = None,
        checkpoint: str = '', progress: bool = True) -> dict | None:
  """`qwenvl-eval run` after loading: every process calls it; returns the metrics on process 0."""
  import jax
  task = get_task(task)
  records = read_records(task, data, limit)
  if task.metric == 'vqa_score' and annotations is None:
    raise DataError(f'{task.name} is scored with the official annotation file: pass --annotations '
                    '(and --questions)')
  if task.metric == 'cider' and annotations is None:
    annotations = scoring.read_reference(data)  # the caption file holds the references
  root = pathlib.Path(image_root)
  process, count = jax.process_index(), jax.process_count()
  where = locator(task, data)
  check_images(list(runner.shard(records, process, count)), root, where)  # before any model time
  predictor = Predictor(task, model, params, tokenizer, ImageLoader(allowed_root=root), where=where)
  meta = {'task': task.name, 'data_sha256': fingerprint(data), 'checkpoint': checkpoint}
  return runner.run(task, records, predictor, out_dir, meta=meta, batch_size=batch_size, process=process,
                    process_count=count, gather=_gather, barrier=_barrier, progress=progress,
                    score=_scorer(task, annotations, questions))


def _barrier(name: str) -> None:
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'qwenvl_eval.{name}')


def _gather(rows: list) -> list[list]:
  """Every process's rows (JSON bytes through an all-gather of padded uint8 arrays)."""
  import jax
  if jax.process_count() == 1:
    return [rows]
  import numpy as np
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(rows).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(everyone[k, :sizes[k]]).decode()) for k in range(len(sizes))]
