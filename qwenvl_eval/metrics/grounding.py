"""RefCOCO / RefCOCO+ / RefCOCOg Precision@1 as the original `evaluate_grounding.py` computes it.

The first `(x1,y1),(x2,y2)` of the answer is the prediction (a point without a comma, a value that is
not a number, or no match at all gives the box (0,0,0,0)); it is divided by 999 and scaled by the image
width and height, then compared with the pixel ground truth by IoU in float32 (torchvision's box_iou, as
the original computes it in torch). IoU >= 0.5 is correct.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from qwenvl_eval.metrics.common import MetricInputError, as_list, entry_field

BOX_PATTERN = re.compile(r'\((.*?)\),\((.*?)\)')
BOX_SCALE = 999  # the original divides by 999 (boxes are written on a [0, 1000) grid)
IOU_THRESHOLD = 0.5
_ZERO = (0.0, 0.0, 0.0, 0.0)


def parse_box(answer: str) -> tuple[float, float, float, float]:
  found = BOX_PATTERN.findall(answer)
  if not found or ',' not in found[0][0] or ',' not in found[0][1]:
    return _ZERO
  try:
    (x1, y1), (x2, y2) = ([float(v) for v in point.split(',')] for point in found[0])
  except ValueError:  # not numbers, or not exactly two per point
    return _ZERO
  return x1, y1, x2, y2


def box_iou(a: np.ndarray, b: np.ndarray) -> np.float32:
  """IoU of two float32 [x1, y1, x2, y2] boxes with torchvision's operations and their order."""
  area_a = (a[2] - a[0]) * (a[3] - a[1])
  area_b = (b[2] - b[0]) * (b[3] - b[1])
  wh = np.maximum(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), np.float32(0))
  inter = wh[0] * wh[1]
  with np.errstate(invalid='ignore', divide='ignore'):  # 0/0 for two empty boxes: nan, as torch
    return inter / (area_a + area_b - inter)


def item_iou(answer: str, gt_bbox: Sequence[float], hw: Sequence[int]) -> float:
  pred = np.asarray(parse_box(answer), np.float32) / np.float32(BOX_SCALE)
  h, w = hw
  pred[0::2] *= np.float32(w)
  pred[1::2] *= np.float32(h)
  return float(box_iou(pred, np.asarray(gt_bbox, np.float32)))


def score(items: Sequence[Mapping[str, Any]]) -> dict:
  """items: [{answer, gt_bbox [x1, y1, x2, y2] in pixels, hw [height, width]}] ->
  {'precision_at_1', 'per_item': [{'iou', 'correct'}]}."""
  per_item = []
  for i, item in enumerate(as_list(items, 'items')):
    where = f'items[{i}]'
    answer = entry_field(item, 'answer', str, where)
    box = entry_field(item, 'gt_bbox', list, where)
    hw = entry_field(item, 'hw', list, where)
    numbers = lambda v: all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    if len(box) != 4 or not numbers(box) or len(hw) != 2 or not numbers(hw):
      raise MetricInputError(f'{where}: gt_bbox must be 4 numbers and hw [height, width], got {box!r}, {hw!r}')
    iou = item_iou(answer, box, hw)
    per_item.append({'iou': iou, 'correct': bool(iou >= IOU_THRESHOLD)})
  if not per_item:
    raise MetricInputError('no item to score')
  return {'precision_at_1': sum(p['correct'] for p in per_item) / len(per_item), 'per_item': per_item}
