"""The model side of a run: prompts -> greedy answers (generation tasks) or the chosen option (multiple
choice), for one batch of records at a time.

Generation is `qwenvl_jax.generate` over a left-padded batch, greedy, stopping at `<|endoftext|>` with the
task's min/max new tokens, as the original's `model.generate` calls; each row generates what it generates
alone (the original's batches do not: its rotary positions run over the padding), so answers do not
depend on --batch. Answers are decoded with special tokens skipped, then stripped where the original strips.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.decode import Buckets, GenerationConfig, decode_params, generate
from qwenvl_jax.images import ImageLoader
from qwenvl_jax.model import lm_loss
from qwenvl_jax.preprocess import preprocess_images
from qwenvl_jax.tokenizer import QwenVLTokenizer, check_tokenizer

from qwenvl_eval.data import DataError, Record
from qwenvl_eval.tasks import CHOICE_LETTERS, Task


def prompt_text(task: Task, record: Record) -> str:
  d = record.fields
  if task.family == 'grounding':
    return task.prompt.format(record.image, d['sent'])
  if task.family == 'vqa':
    return task.prompt.format(record.image, d['question'])
  if task.family == 'caption':
    return task.prompt.format(record.image)
  choices = '\n'.join(f'{CHOICE_LETTERS[i]}. {c}' for i, c in enumerate(d['choices']))
  return task.prompt.format(record.image, d.get('hint') or 'N/A', d['question'], choices)


class Predictor:
  """Answers batches of a task's records with one model; `where(record)` names a record in errors."""

  def __init__(self, task: Task, model, params, tokenizer: QwenVLTokenizer, loader: ImageLoader,
               where=lambda record: f'line {record.line}'):
    check_tokenizer(tokenizer, model.config)
    self.task, self.model, self.tokenizer, self.loader, self.where = task, model, tokenizer, loader, where
    if task.family == 'multiple_choice':
      self.params = params
      self._losses = jax.jit(functools.partial(_option_losses, model), static_argnames='span')
    else:
      self.params = decode_params(params)  # once, not at every batch
      self.generation = GenerationConfig(
          max_new_tokens=task.max_new_tokens, min_new_tokens=task.min_new_tokens, do_sample=False,
          stop_ids=(tokenizer.eod_id,), pad_id=tokenizer.eod_id, vocab_limit=tokenizer.vocab_size)

  def _encode(self, record: Record) -> list[int]:
    try:
      return self.tokenizer.encode(prompt_text(self.task, record))
    except ValueError as e:  # e.g. an image path longer than the image span
      raise DataError(f'{self.where(record)}: {e}') from None

  def _pixels(self, records: Sequence[Record]) -> np.ndarray:
    images = []
    for r in records:
      try:
        images.append(self.loader.load(r.image))
      except (OSError, ValueError) as e:
        raise DataError(f'{self.where(r)}: {e}') from None
    return preprocess_images(images, self.model.config.vision.image_size)

  def __call__(self, records: Sequence[Record]) -> list[Any]:
    return self._choose(records) if self.task.family == 'multiple_choice' else self._generate(records)

  def _generate(self, records: Sequence[Record]) -> list[str]:
    prompts = [self._encode(r) for r in records]
    out = generate(self.model, self.params, prompts, self._pixels(records), generation_config=self.generation)
    longest = max(len(p) for p in prompts)
    answers = [self.tokenizer.decode(row[longest:], skip_special_tokens=True) for row in out]
    return [a.strip() for a in answers] if self.task.strip else answers

  def _choose(self, records: Sequence[Record]) -> list[int]:
    """Per record, the option whose letter (' A', ' B', ...) after the prompt has the lowest mean loss."""
    rows, targets, owners = [], [], []
    for i, r in enumerate(records):
      prompt = self._encode(r)
      for letter in CHOICE_LETTERS[:len(r.fields['choices'])]:
        target = self.tokenizer.encode(' ' + letter)
        rows.append(prompt + target)
        targets.append(len(target))
        owners.append(i)
    n, length = Buckets.count(len(rows)), Buckets().length(max(len(x) for x in rows))
    ids, mask, loss_mask = (np.zeros((n, length), np.int32), np.zeros((n, length), bool),
                            np.zeros((n, length), bool))
    for k, (row, t) in enumerate(zip(rows, targets)):  # left padding, as the original
      ids[k, length - len(row):], mask[k, length - len(row):] = row, True
      loss_mask[k, length - t:] = True
    pixels = self._pixels(records)
    pixels = np.concatenate([pixels[owners], np.zeros((n - len(rows),) + pixels.shape[1:], pixels.dtype)])
    losses = np.asarray(self._losses(self.params, ids, mask, pixels, loss_mask, span=max(targets)))
    losses = losses[:len(rows)]
    chosen, start = [], 0
    for i in range(len(records)):
      count = owners.count(i)
      chosen.append(int(np.argmin(losses[start:start + count])))
      start += count
    return chosen


def _option_losses(model, params, ids, mask, pixels, loss_mask, *, span: int):
  """Each row's mean next-token loss over its `loss_mask` tokens, all within the last `span` tokens. As
  the original, the model sees the row without its last token; each row gets its own positions, so
  padding does not change its loss. Only the last `span` positions' logits are computed."""
  length = ids.shape[1]
  at = jnp.broadcast_to(jnp.arange(length - 1 - span, length - 1), (ids.shape[0], span))
  logits = model.apply({'params': params}, ids[:, :-1], pixels, attention_mask=mask[:, :-1], logits_at=at)
  logits = jnp.pad(logits, ((0, 0), (0, 1), (0, 0)))  # lm_loss drops the last position's logits
  labels, weights = ids[:, length - 1 - span:], loss_mask[:, length - 1 - span:]
  return jax.vmap(lambda l, y, m: lm_loss(l[None], y[None], m[None]))(logits, labels, weights)
