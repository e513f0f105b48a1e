"""Training data: the three stages' formats with their loss masks, and truncation (the loader: train/loader.py).

Formats (records from a .json list or a .jsonl file, checked by train/validate.py; image paths relative
to the data root):
  caption (stage 1): {"image": p, "caption": c} -> `<img>p</img>c<|endoftext|>`, loss on c and the end token.
  multitask (stage 2): {"task": ..., ...} in the paper's formats (Table 9), loss on the answer part:
    caption            {"image", "caption"}   <img>p</img>Generate the caption in English: | c
    vqa                {"image", "question", "answer"}   <img>p</img> q Answer: | a
    caption_grounding  {"image", "caption"}   <img>p</img>Generate the caption in English with grounding: | c
                       (c holds <ref>..</ref><box>..</box> markup)
    ref_grounding      {"image", "ref", "box"}   <img>p</img><ref>r</ref> | <box>(x1,y1),(x2,y2)</box>
    grounded_caption   {"image", "box", "caption"}   <img>p</img><ref>This</ref><box>..</box> is | c
    ocr                {"image", "text"}   <img>p</img>OCR: | t
    text               {"text"}   | t
    each answer ends with <|endoftext|>; boxes are [x1, y1, x2, y2] integers in [0, 1000).
  chat (stage 3): the official fine-tuning JSON, [{"id", "conversations": [{"from": "user"|"assistant",
    "value"}]}], in ChatML with the system prompt 'You are a helpful assistant.', as finetune.py's
    preprocess: 'official' labels assistant content plus every turn's <|im_start|>, <|im_end|> and newline;
    'assistant' labels only assistant content and its <|im_end|>.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from qwenvl_jax.chat_format import DEFAULT_SYSTEM
from qwenvl_jax.tokenizer import QwenVLTokenizer

IMG_TAG = re.compile(r'<img>(.*?)</img>', re.DOTALL)
TASK_FIELDS = {
    'caption': ('image', 'caption'),
    'vqa': ('image', 'question', 'answer'),
    'caption_grounding': ('image', 'caption'),
    'ref_grounding': ('image', 'ref', 'box'),
    'grounded_caption': ('image', 'box', 'caption'),
    'ocr': ('image', 'text'),
    'text': ('text',),
}
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Example:
  ids: np.ndarray  # [t] int32
  target: np.ndarray  # [t] bool: the token is a training target (predicted from the one before)
  images: tuple[str, ...]  # in order of their <img> tokens
  truncated: bool = False  # cut to the longest bucket


def format_box(box: Sequence[int]) -> str:
  """[x1, y1, x2, y2] in [0, 1000) -> `<box>(x1,y1),(x2,y2)</box>`."""
  x1, y1, x2, y2 = check_box(box)
  return f'<box>({x1},{y1}),({x2},{y2})</box>'


def check_box(box: Any) -> list[int]:
  if (not isinstance(box, (list, tuple)) or len(box) != 4
      or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1000 for v in box)):
    raise ValueError(f'box must be [x1, y1, x2, y2] integers in [0, 1000), got {box!r}')
  return list(box)


class Encoder:
  """Record -> Example for one data format; `check` validates a record without tokenizing it."""

  def __init__(self, tokenizer: QwenVLTokenizer, data_format: str, chat_labels: str = 'official',
               max_images: int | None = None):
    if data_format not in ('caption', 'multitask', 'chat'):
      raise ValueError(f'unknown data_format {data_format!r}')
    self.tok = tokenizer
    self.format = data_format
    self.chat_labels = chat_labels
    self.max_images = max_images
    self.nl = tokenizer.encode('\n')

  def __call__(self, record: Mapping[str, Any]) -> Example:
    if self.format == 'chat':
      ids, target = self._chat(record)
    else:
      prompt, answer = prompt_answer(record, self.format)
      p, a = self.tok.encode(prompt), self.tok.encode(answer) + [self.tok.eod_id]
      ids, target = p + a, [False] * len(p) + [True] * len(a)
    target[0] = False  # the first token has nothing to be predicted from
    return Example(np.asarray(ids, np.int32), np.asarray(target, bool), tuple(self.tok.image_paths(ids)))

  def check(self, record: Any, where: str) -> None:
    """Raises ValueError naming `where` (e.g. 'data.json record 7') for a malformed record."""
    try:
      check_record(record, self.format, self.tok.image_span_length, self.max_images)
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from None

  def _chat(self, r: Mapping[str, Any]) -> tuple[list[int], list[bool]]:
    """finetune.py's preprocess: ids and which of them carry a label."""
    tok, nl, official = self.tok, self.nl, self.chat_labels == 'official'
    turns = list(r['conversations'])
    if turns[0]['from'] != 'user':  # the original drops a leading non-user turn
      turns = turns[1:]
    system = [tok.im_start_id] + tok.encode('system') + nl + tok.encode(DEFAULT_SYSTEM) + [tok.im_end_id] + nl
    ids = list(system)
    target = [official] + [False] * (len(system) - 3) + [official, official]
    for turn in turns:
      role = [tok.im_start_id] + tok.encode(turn['from'])
      content = tok.encode(turn['value'])
      ids += role + nl + content + [tok.im_end_id] + nl
      if turn['from'] == 'user':
        target += [official] + [False] * (len(role) + len(nl) + len(content) - 1) + [official, official]
      else:
        target += [official] + [False] * (len(role) + len(nl) - 1) + [True] * len(content) + [True, official]
    return ids, target


def prompt_answer(r: Mapping[str, Any], data_format: str) -> tuple[str, str]:
  """(prompt, answer) of a caption or multitask record; ValueError naming what is wrong."""
  if data_format == 'caption':
    _require(r, ('image', 'caption'))
    return f'<img>{r["image"]}</img>', r['caption']
  task = r.get('task')
  if task not in TASK_FIELDS:
    raise ValueError(f'unknown task {task!r}; expected one of {sorted(TASK_FIELDS)}')
  _require(r, TASK_FIELDS[task])
  img = f'<img>{r["image"]}</img>' if 'image' in TASK_FIELDS[task] else ''
  if task == 'caption':
    return f'{img}Generate the caption in English:', f' {r["caption"]}'
  if task == 'vqa':
    return f'{img} {r["question"]} Answer:', f' {r["answer"]}'
  if task == 'caption_grounding':
    return f'{img}Generate the caption in English with grounding:', f' {r["caption"]}'
  if task == 'ref_grounding':
    return f'{img}<ref>{r["ref"]}</ref>', format_box(r['box'])
  if task == 'grounded_caption':
    return f'{img}<ref>This</ref>{format_box(r["box"])} is', f' {r["caption"]}'
  if task == 'ocr':
    return f'{img}OCR:', f' {r["text"]}'
  return '', r['text']


def chat_values(r: Mapping[str, Any]) -> list[str]:
  turns = r.get('conversations')
  if not isinstance(turns, list) or not turns:
    raise ValueError('"conversations" must be a non-empty list')
  for i, turn in enumerate(turns):
    if not isinstance(turn, Mapping) or turn.get('from') not in ('user', 'assistant'):
      raise ValueError(f'turn {i}: needs "from": "user" or "assistant", got {turn!r:.80}')
    if not isinstance(turn.get('value'), str):
      raise ValueError(f'turn {i}: "value" must be a string')
  return [t['value'] for t in turns]


def image_paths(record: Mapping[str, Any], data_format: str) -> list[str]:
  """The images a record refers to, in order; ValueError when its fields are malformed."""
  texts = chat_values(record) if data_format == 'chat' else prompt_answer(record, data_format)
  return [p for t in texts for p in IMG_TAG.findall(t)]


def check_record(record: Any, data_format: str, span: int, max_images: int | None = None) -> None:
  """Raises ValueError (without the record's name) for a record that cannot be encoded: missing fields or
  wrong types, an image path longer than the image span of `span` tokens, more than max_images images."""
  try:
    if not isinstance(record, Mapping):
      raise ValueError('not a JSON object')
    paths = image_paths(record, data_format)
    for p in paths:
      if len(p.encode('utf-8')) > span:
        raise ValueError(f'image path {p[:48]!r} is longer than the image span of {span} tokens (n_queries)')
    if max_images is not None and len(paths) > max_images:
      raise ValueError(f'{len(paths)} images, more than max_images={max_images}')
  except (TypeError, KeyError) as e:
    raise ValueError(str(e)) from None


def _require(r: Mapping[str, Any], fields: Sequence[str]) -> None:
  for f in fields:
    if f not in r:
      raise ValueError(f'missing field {f!r}')
    if f == 'box':
      check_box(r[f])
    elif not isinstance(r[f], str):
      raise ValueError(f'field {f!r} must be a string, got {type(r[f]).__name__}')


def truncate(ex: Example, max_len: int, image_start_id: int, image_end_id: int) -> Example:
  """At most max_len tokens; a cut that would split an image span is moved before its `<img>`."""
  if len(ex.ids) <= max_len:
    return ex
  cut = max_len
  starts = np.flatnonzero(ex.ids == image_start_id)
  ends = np.flatnonzero(ex.ids == image_end_id)
  for s, e in zip(starts, ends):
    if s < cut <= e:
      cut = int(s)
  kept = int(np.sum(starts < cut))
  return Example(ex.ids[:cut], ex.target[:cut], ex.images[:kept], truncated=True)
