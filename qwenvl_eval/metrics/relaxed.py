"""ChartQA relaxed accuracy as the original `evaluate_vqa.py` computes it (pix2struct's definition).

A number within 5% of a non-zero number counts (a trailing '%' divides by 100), anything else needs
case-insensitive equality; an entry scores its best annotation. Faithful detail: the original passes the
stripped answer as the *target* and the annotation as the *prediction*, so the relative change is
measured against the answer, and the answer's number must be non-zero.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from qwenvl_eval.metrics.common import MetricInputError, annotations_of, as_list, entry_field

MAX_RELATIVE_CHANGE = 0.05


def _to_float(text: str) -> float | None:
  try:
    return float(text.rstrip('%')) / 100.0 if text.endswith('%') else float(text)
  except ValueError:
    return None


def relaxed_correct(target: str, prediction: str) -> bool:
  prediction_value, target_value = _to_float(prediction), _to_float(target)
  if prediction_value is not None and target_value:
    return abs(prediction_value - target_value) / abs(target_value) <= MAX_RELATIVE_CHANGE
  return prediction.lower() == target.lower()


def entry_scores(entries: Sequence[Mapping[str, Any]]) -> list[bool]:
  out = []
  for i, e in enumerate(as_list(entries, 'entries')):
    answer = entry_field(e, 'answer', str, f'entries[{i}]').strip()
    out.append(max(relaxed_correct(answer, ann) for ann in annotations_of(e, f'entries[{i}]')))
  return out


def score(entries: Sequence[Mapping[str, Any]]) -> dict:
  per_entry = entry_scores(entries)
  if not per_entry:
    raise MetricInputError('no entry to score')
  return {'relaxed_accuracy': sum(per_entry) / len(per_entry), 'per_entry': per_entry}
