"""ANLS (DocVQA, InfographicVQA) as the official `infographicsvqa_eval.py` computes it.

Per question: 1 - the smallest normalised Levenshtein distance to a ground-truth answer (both stripped,
lower-cased, whitespace collapsed; divided by the longer *raw* string's length), then 0 below 0.5.
The score is the mean over the ground-truth questions.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from qwenvl_eval.metrics.common import MetricInputError, as_list, entry_field

THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
  if len(a) > len(b):
    a, b = b, a
  row = list(range(len(a) + 1))
  for j, cb in enumerate(b, 1):
    prev, row[0] = row[0], j
    for i, ca in enumerate(a, 1):
      prev, row[i] = row[i], prev if ca == cb else 1 + min(prev, row[i], row[i - 1])
  return row[-1]


def _collapse(text: str) -> str:
  return ' '.join(text.strip().lower().split())


def question_score(prediction: str, gt_answers: Sequence[str]) -> float:
  distances = []
  for gt in gt_answers:
    length = max(len(gt.upper()), len(prediction.upper()))  # upper(): as the official code measures
    distances.append(0.0 if length == 0 else levenshtein(_collapse(gt), _collapse(prediction)) / length)
  value = 1 - min(distances)
  return 0 if value < THRESHOLD else value


def score(gt: Mapping[str, Any], submission: Sequence[Mapping[str, Any]], *, subset: bool = False) -> dict:
  """{'score', 'per_sample': {questionId: score}}.

  gt: {"data": [{questionId, answers}]}; submission: [{questionId, answer}], one per question (the
  official check), unless `subset`: then only the submitted questions are scored (a partial run).
  """
  data = as_list(gt.get('data') if isinstance(gt, Mapping) else None, "gt: 'data'")
  answers = {}
  for i, s in enumerate(as_list(submission, 'submission')):
    qid = entry_field(s, 'questionId', (int, str), f'submission[{i}]')
    answers[int(qid)] = entry_field(s, 'answer', str, f'submission[{i}]')
  gt_ids = [int(entry_field(g, 'questionId', (int, str), f'gt data[{i}]')) for i, g in enumerate(data)]
  missing = [q for q in gt_ids if q not in answers]
  unknown = sorted(set(answers) - set(gt_ids))
  if unknown or (missing and not subset) or len(answers) != len(as_list(submission, 'submission')):
    raise MetricInputError(f'the submission must answer each ground-truth question once: {len(missing)} '
                           f'unanswered (e.g. {missing[:3]}), {len(unknown)} unknown (e.g. {unknown[:3]}), '
                           f'{len(submission)} rows for {len(answers)} questions')
  per_sample = {}
  for i, (qid, g) in enumerate(zip(gt_ids, data)):
    if qid not in answers:
      continue
    gts = entry_field(g, 'answers', list, f'gt data[{i}]')
    if not gts or not all(isinstance(a, str) for a in gts):
      raise MetricInputError(f'gt data[{i}]: answers must be a non-empty list of strings, got {gts!r}')
    per_sample[str(g['questionId'])] = question_score(answers[qid], gts)
  if not per_sample:
    raise MetricInputError('no question to score')
  return {'score': sum(per_sample.values()) / len(per_sample), 'per_sample': per_sample}
