"""Flickr30k / NoCaps CIDEr (CIDEr-D) as `pycocoevalcap` computes it, the library the original calls.

As `COCOEvalCap` after `COCO.loadRes`: the images scored are the results' images, in the order of the
annotation file's `images`; references and results both go through pycocoevalcap's PTB tokenizer, which
runs the Stanford CoreNLP jar shipped inside pycocoevalcap, so **Java must be installed** (`java` on
PATH). Document frequencies come from the references of the scored images. Only CIDEr is computed (the
paper's caption metric); the original also ran BLEU, METEOR, ROUGE-L and SPICE.
"""
from __future__ import annotations

import shutil
from typing import Any, Mapping, Sequence

from qwenvl_eval.metrics.common import MetricInputError, as_list, entry_field

INSTALL_HINT = "pip install 'qwenvl-jax[eval]' (pycocoevalcap>=1.2)"


def _library():
  try:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  except ImportError as e:
    raise RuntimeError(f'CIDEr needs pycocoevalcap: {INSTALL_HINT} ({e})') from None
  if shutil.which('java') is None:
    raise RuntimeError('CIDEr needs Java: pycocoevalcap tokenizes captions with the Stanford CoreNLP jar, '
                       'run by `java`, which is not on PATH (install a JRE, e.g. apt-get install '
                       'default-jre-headless)')
  return Cider, PTBTokenizer


def _inputs(annotations: Mapping[str, Any], results: Sequence[Mapping[str, Any]]):
  """{image_id: [{'caption'}]} for references and results, in the annotation file's image order."""
  if not isinstance(annotations, Mapping):
    raise MetricInputError('annotations must be a COCO caption file ({"images": [...], "annotations": [...]})')
  images = as_list(annotations.get('images'), "annotations: 'images'")
  refs: dict[Any, list] = {}
  for i, ann in enumerate(as_list(annotations.get('annotations'), "annotations: 'annotations'")):
    image_id = entry_field(ann, 'image_id', (int, str), f'annotations[{i}]')
    refs.setdefault(image_id, []).append({'caption': entry_field(ann, 'caption', str, f'annotations[{i}]')})
  hyps: dict[Any, list] = {}
  for i, r in enumerate(as_list(results, 'results')):
    image_id = entry_field(r, 'image_id', (int, str), f'results[{i}]')
    hyps.setdefault(image_id, []).append({'caption': entry_field(r, 'caption', str, f'results[{i}]')})
  order = [entry_field(im, 'id', (int, str), f'images[{i}]') for i, im in enumerate(images)]
  unknown = [i for i in hyps if i not in set(order)]
  if unknown:
    raise MetricInputError(f'results name images that are not in the annotation file: {unknown[:5]}')
  twice = [i for i, h in hyps.items() if len(h) > 1]
  if twice:
    raise MetricInputError(f'results hold more than one caption for images {twice[:5]}')
  scored = [i for i in dict.fromkeys(order) if i in hyps]
  bare = [i for i in scored if i not in refs]
  if bare:
    raise MetricInputError(f'images without reference captions: {bare[:5]}')
  if not scored:
    raise MetricInputError('no caption to score')
  return {i: refs[i] for i in scored}, {i: hyps[i] for i in scored}


def score(annotations: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> dict:
  """annotations: COCO caption layout; results: [{image_id, caption}] -> {'CIDEr', 'per_image'}."""
  gts, res = _inputs(annotations, results)
  Cider, PTBTokenizer = _library()
  tokenizer = PTBTokenizer()
  gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
  overall, per_image = Cider().compute_score(gts, res)
  return {'CIDEr': float(overall), 'per_image': {str(i): float(s) for i, s in zip(gts, per_image)}}
