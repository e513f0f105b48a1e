"""Training data: the three stages' formats with their loss masks, truncation, and a resumable loader.

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

import concurrent.futures
import dataclasses
import math
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from qwenvl_jax.chat_format import DEFAULT_SYSTEM
from qwenvl_jax.images import ImageLoader
from qwenvl_jax.preprocess import preprocess_images
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
      prompt, answer = self._prompt_answer(record)
      p, a = self.tok.encode(prompt), self.tok.encode(answer) + [self.tok.eod_id]
      ids, target = p + a, [False] * len(p) + [True] * len(a)
    target[0] = False  # the first token has nothing to be predicted from
    return Example(np.asarray(ids, np.int32), np.asarray(target, bool), tuple(self.tok.image_paths(ids)))

  def check(self, record: Any, where: str) -> None:
    """Raises ValueError naming `where` (e.g. 'data.json record 7') for a malformed record."""
    try:
      if not isinstance(record, Mapping):
        raise ValueError('not a JSON object')
      texts = self._chat_values(record) if self.format == 'chat' else self._prompt_answer(record)
      paths = [p for t in texts for p in IMG_TAG.findall(t)]
      for p in paths:
        if len(p.encode('utf-8')) > self.tok.image_span_length:
          raise ValueError(f'image path {p[:48]!r} is longer than the image span of '
                           f'{self.tok.image_span_length} tokens (n_queries)')
      n_images = len(paths)
      if self.max_images is not None and n_images > self.max_images:
        raise ValueError(f'{n_images} images, more than max_images={self.max_images}')
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f'{where}: {e}') from None

  def _prompt_answer(self, r: Mapping[str, Any]) -> tuple[str, str]:
    if self.format == 'caption':
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

  def _chat_values(self, r: Mapping[str, Any]) -> list[str]:
    turns = r.get('conversations')
    if not isinstance(turns, list) or not turns:
      raise ValueError('"conversations" must be a non-empty list')
    for i, turn in enumerate(turns):
      if not isinstance(turn, Mapping) or turn.get('from') not in ('user', 'assistant'):
        raise ValueError(f'turn {i}: needs "from": "user" or "assistant", got {turn!r:.80}')
      if not isinstance(turn.get('value'), str):
        raise ValueError(f'turn {i}: "value" must be a string')
    return [t['value'] for t in turns]

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


def round_up(n: int, step: int) -> int:
  return max(step, int(math.ceil(n / step)) * step)


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  batch_size: int  # global
  seq_buckets: tuple[int, ...]
  target_step: int
  max_images: int
  image_size: int
  seed: int
  window: int = 8  # batches sorted by length together


class Loader:
  """Deterministic, resumable, per-host sharded batches with length bucketing.

  Batch k is a pure function of (seed, k): epoch e = k // batches_per_epoch shuffles the records with
  seed (seed, e); each window of `window` batches is sorted by length, cut into batches, and the batches
  of the window shuffled. Every host computes the same global batch (so all agree on its padded shape),
  but loads the images of its own rows only. The state is the index of the next batch.
  """

  def __init__(self, records: Sequence[Any], encoder: Encoder, cfg: LoaderConfig,
               image_loader: ImageLoader, process_index: int = 0, process_count: int = 1,
               source: str = 'data', record_ids: Sequence[int] | None = None):
    """`records` are checked already (train/validate.py); `record_ids` number them in the data file."""
    if cfg.batch_size % process_count:
      raise ValueError(f'batch_size {cfg.batch_size} is not divisible by the {process_count} processes')
    if len(records) < cfg.batch_size:
      raise ValueError(f'{source} has {len(records)} usable records, fewer than one batch of '
                       f'{cfg.batch_size}')
    self.records, self.encoder, self.cfg, self.images = list(records), encoder, cfg, image_loader
    self.source = source
    self.record_ids = list(record_ids) if record_ids is not None else list(range(len(records)))
    self.rows = slice(process_index * cfg.batch_size // process_count,
                      (process_index + 1) * cfg.batch_size // process_count)
    self.batches_per_epoch = len(records) // cfg.batch_size
    self.next_batch = 0
    self.last_truncated = 0  # truncated samples in the batch `__iter__` yielded last (all hosts' rows)
    self._window: tuple[tuple[int, int], list[list[Example]]] | None = None

  def state(self) -> dict[str, int]:
    return {'next_batch': self.next_batch, 'seed': self.cfg.seed, 'records': len(self.records),
            'batch_size': self.cfg.batch_size}

  def restore(self, state: Mapping[str, int]) -> None:
    mine = self.state()
    for key in ('seed', 'records', 'batch_size'):
      if state.get(key) != mine[key]:
        raise ValueError(f'cannot resume the data order: the checkpoint has {key}={state.get(key)}, '
                         f'this run has {key}={mine[key]}')
    self.next_batch = int(state['next_batch'])

  def __iter__(self) -> Iterator[Batch]:
    """Batches from next_batch on; the following batch is prepared in a thread while one is used."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      pending = pool.submit(self._batch, self.next_batch)
      while True:
        batch, self.last_truncated = pending.result()
        pending = pool.submit(self._batch, self.next_batch + 1)
        self.next_batch += 1
        yield batch

  def batch(self, k: int) -> Batch:
    """Global batch k, this host's rows."""
    return self._batch(k)[0]

  def _batch(self, k: int) -> tuple[Batch, int]:
    epoch, b = divmod(k, self.batches_per_epoch)
    w, j = divmod(b, self.cfg.window)
    examples = self._window_batches(epoch, w)[j]
    return self._collate(examples), sum(e.truncated for e in examples)

  def _window_batches(self, epoch: int, w: int) -> list[list[Example]]:
    if self._window is not None and self._window[0] == (epoch, w):
      return self._window[1]
    c = self.cfg
    perm = np.random.default_rng([c.seed, epoch]).permutation(len(self.records))
    lo = w * c.window * c.batch_size
    hi = min(lo + c.window * c.batch_size, self.batches_per_epoch * c.batch_size)
    examples = [self._encode(int(i)) for i in perm[lo:hi]]
    order = np.argsort([len(e.ids) for e in examples], kind='stable')
    batches = [[examples[i] for i in chunk] for chunk in order.reshape(-1, c.batch_size)]
    shuffle = np.random.default_rng([c.seed, epoch, w, 1]).permutation(len(batches))
    batches = [batches[i] for i in shuffle]
    self._window = ((epoch, w), batches)
    return batches

  def _encode(self, i: int) -> Example:
    try:
      ex = self.encoder(self.records[i])
    except ValueError as e:
      raise ValueError(f'{self.source} record {self.record_ids[i]}: {e}') from None
    tok = self.encoder.tok
    return truncate(ex, self.cfg.seq_buckets[-1], tok.img_start_id, tok.img_end_id)

  def _collate(self, examples: list[Example]) -> Batch:
    c = self.cfg
    longest = max(len(e.ids) for e in examples)
    t = next(b for b in c.seq_buckets if b >= longest)
    n = min(t, round_up(max(int(e.target[1:].sum()) for e in examples), c.target_step))
    mine = examples[self.rows]
    rows = len(mine)
    batch = {
        'input_ids': np.full((rows, t), self.encoder.tok.eod_id, np.int32),
        'attention_mask': np.zeros((rows, t), np.int32),
        'targets': np.zeros((rows, n), np.int32),
        'target_mask': np.zeros((rows, n), np.float32),
        'pixel_values': np.zeros((rows, c.max_images, c.image_size, c.image_size, 3), np.float32),
    }
    for r, ex in enumerate(mine):
      batch['input_ids'][r, :len(ex.ids)] = ex.ids
      batch['attention_mask'][r, :len(ex.ids)] = 1
      positions = np.flatnonzero(ex.target[1:])  # predicting token p+1 from position p
      batch['targets'][r, :len(positions)] = positions
      batch['target_mask'][r, :len(positions)] = 1.0
      if ex.images:
        batch['pixel_values'][r, :len(ex.images)] = self._load_images(ex.images)
    return batch

  def _load_images(self, paths: Sequence[str]) -> np.ndarray:
    return preprocess_images([self.images.load(p) for p in paths], self.cfg.image_size)
