"""Scoring a merged predictions file (the original's layouts) with the task's metric."""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Sequence

from qwenvl_jax.jsonfile import read_object

from qwenvl_eval.metrics import anls, cider, exact, grounding, relaxed, vqa
from qwenvl_eval.metrics.common import MetricInputError, as_list, entry_field
from qwenvl_eval.tasks import Task, get_task


def prediction_row(task: Task, record_fields: Mapping[str, Any], answer: Any) -> dict[str, Any]:
  """One row of the original's merged predictions file for `answer` (text, or a choice index)."""
  d = record_fields
  if task.family == 'grounding':
    return {'answer': answer, 'gt_bbox': d['bbox'], 'hw': [d['height'], d['width']]}
  if task.family == 'caption':
    image_id = d['id']
    return {'image_id': int(image_id) if str(image_id).lstrip('-').isdigit() else image_id, 'caption': answer}
  if task.family == 'multiple_choice':
    return {'prediction': answer, 'answer': d['answer']}
  if task.metric == 'vqa_score':
    return {'question_id': d['question_id'], 'answer': answer}
  row = {task.id_key: d['question_id']} if task.id_key else {}
  return {**row, 'answer': answer, 'annotation': d.get('answer')}


def read_predictions(file: str | os.PathLike) -> list[dict[str, Any]]:
  """A JSON list (the original's merged file) or JSON lines (this harness's predictions.jsonl)."""
  file = pathlib.Path(file)
  try:
    text = file.read_text(encoding='utf-8')
  except (FileNotFoundError, IsADirectoryError):
    raise MetricInputError(f'{file}: predictions file not found') from None
  try:
    value = json.loads(text)
    if isinstance(value, list):
      return value
    if not isinstance(value, dict):
      raise MetricInputError(f'{file}: expected a JSON list of predictions or JSON lines')
  except json.JSONDecodeError:
    pass
  rows = []
  for n, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise MetricInputError(f'{file}: line {n}: not valid JSON ({e.msg} at column {e.colno})') from None
  return rows


def _anls_gt(rows: Sequence[Mapping[str, Any]], key: str) -> dict:
  """The gt file's layout built from the rows' own annotations (when no gt file is given)."""
  data = []
  for i, r in enumerate(rows):
    answers = entry_field(r, 'annotation', (list, str), f'predictions[{i}] (no --annotations given)')
    data.append({'questionId': entry_field(r, key, (int, str), f'predictions[{i}]'),
                 'answers': [answers] if isinstance(answers, str) else answers})
  return {'data': data}


def score(task: str | Task, predictions: Sequence[Mapping[str, Any]], annotations: Any = None,
          questions: Any = None, *, subset: bool = False) -> dict[str, Any]:
  """{'task', 'metric', 'score', 'count', 'details'} for the original's merged predictions.

  annotations: VQA score -- the official annotation JSON (required); ANLS -- the gt JSON (optional:
  else the rows' 'annotation'); captions -- the COCO caption JSON (required). `subset`: score only the
  answered questions of an annotation file (a partial run); the original refuses that.
  """
  task = get_task(task)
  rows = as_list(predictions, 'predictions')
  if task.metric in ('vqa_score', 'cider') and annotations is None:
    raise MetricInputError(f'{task.name} is scored against an annotation file: pass --annotations')
  if task.metric == 'precision_at_1':
    r = grounding.score(rows)
    value, details = r['precision_at_1'], {}
  elif task.metric == 'vqa_score':
    r = vqa.score(annotations, rows, questions, subset=subset)
    value, details = r['overall'], {'per_answer_type': r['per_answer_type']}
  elif task.metric == 'anls':
    gt = annotations if annotations is not None else _anls_gt(rows, task.id_key)
    submission = [{'questionId': entry_field(x, task.id_key, (int, str), f'predictions[{i}]'),
                   'answer': entry_field(x, 'answer', str, f'predictions[{i}]')} for i, x in enumerate(rows)]
    value, details = anls.score(gt, submission, subset=subset)['score'], {}
  elif task.metric == 'relaxed_accuracy':
    value, details = relaxed.score(rows)['relaxed_accuracy'], {}
  elif task.metric in ('accuracy', 'gqa_accuracy'):
    value, details = exact.score(rows, gqa=task.metric == 'gqa_accuracy')['accuracy'], {}
  elif task.metric == 'cider':
    value, details = cider.score(annotations, rows)['CIDEr'], {}
  elif task.metric == 'choice_accuracy':
    hits = [entry_field(x, 'prediction', int, f'predictions[{i}]') == entry_field(x, 'answer', int, f'predictions[{i}]')
            for i, x in enumerate(rows)]
    if not hits:
      raise MetricInputError('no prediction to score')
    value, details = sum(hits) / len(hits), {}
  else:
    raise ValueError(f'task {task.name}: no metric {task.metric!r}')
  return {'task': task.name, 'metric': task.metric, 'score': value, 'count': len(rows), **details}


def read_reference(file: str | os.PathLike | None) -> Any:
  """An annotation / question / gt JSON file (an object), or None."""
  return None if file is None else read_object(file)
