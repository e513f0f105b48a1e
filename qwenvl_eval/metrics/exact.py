"""Exact match (OCR-VQA, AI2D, GQA) as the original `evaluate_vqa.py` computes it.

Stripped, lower-cased equality with any annotation. GQA answers first go through the original's clean-up
(`gqa_answer`): first sentence/clause, lower case, the text after 'is '/'are '/'a '/'an '/'the ', before
' of' -- substring tests, as the original (so 'this ' also counts as 'is ').
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from qwenvl_eval.metrics.common import MetricInputError, annotations_of, as_list, entry_field


def gqa_answer(answer: str) -> str:
  text = answer.strip().split('.')[0].split(',')[0].split('!')[0].lower()
  for word in ('is ', 'are ', 'a ', 'an ', 'the '):
    if word in text:
      text = text.split(word)[1]
  if ' of' in text:
    text = text.split(' of')[0]
  return text.strip()


def entry_scores(entries: Sequence[Mapping[str, Any]], *, gqa: bool = False) -> list[float]:
  out = []
  for i, e in enumerate(as_list(entries, 'entries')):
    answer = entry_field(e, 'answer', str, f'entries[{i}]')
    answer = gqa_answer(answer) if gqa else answer
    out.append(max(1.0 if answer.strip().lower() == a.strip().lower() else 0.0
                   for a in annotations_of(e, f'entries[{i}]')))
  return out


def score(entries: Sequence[Mapping[str, Any]], *, gqa: bool = False) -> dict:
  per_entry = entry_scores(entries, gqa=gqa)
  if not per_entry:
    raise MetricInputError('no entry to score')
  out = {'accuracy': sum(per_entry) / len(per_entry), 'per_entry': per_entry}
  if gqa:
    out['processed_answers'] = [gqa_answer(e['answer']) for e in entries]
  return out
