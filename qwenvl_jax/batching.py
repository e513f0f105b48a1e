"""A generation request on the host: prompts left-padded to length buckets, images loaded, limits checked."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import numpy as np

from qwenvl_jax import budget, param_layout
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.generation_config import GenerationConfig
from qwenvl_jax.images import ImageLoader, ImageSource
from qwenvl_jax.preprocess import preprocess_images


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Padded sizes: lengths are powers of two from `min_length` up to `step`, then multiples of `step`.

  Batch and image counts are padded to powers of two. Each bucket compiles once.
  """
  min_length: int = 32
  step: int = 512

  def __post_init__(self):
    powers = all(n > 0 and n & (n - 1) == 0 for n in (self.min_length, self.step))
    if not powers or self.min_length > self.step:
      raise ValueError(f'Buckets need powers of two with min_length <= step, got {self}')

  def length(self, n: int) -> int:
    if n <= self.step:
      return max(self.min_length, 1 << max(n - 1, 0).bit_length())
    return -(-n // self.step) * self.step

  @staticmethod
  def count(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()



class Batch(NamedTuple):
  ids: np.ndarray  # [b', p'] left-padded to the buckets, padding id 0
  mask: np.ndarray  # [b', p']
  prompt: np.ndarray  # [b, p] the prompts as returned: left-padded with pad_id to the longest
  n_rows: int


def _as_rows(input_ids, attention_mask) -> list[np.ndarray]:
  """The real tokens of each row, from ragged lists or a left-padded [b, t] array plus mask."""
  if isinstance(input_ids, (np.ndarray, jax.Array)) or (
      len(input_ids) and not isinstance(input_ids[0], (list, tuple, np.ndarray))):
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'input_ids must be integer [batch, length], got {ids.dtype} {ids.shape}')
    if attention_mask is None:
      return list(ids)
    mask = np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
      raise ValueError(f'attention_mask {mask.shape} does not match input_ids {ids.shape}')
    if np.any(mask[:, :-1] & ~mask[:, 1:]):
      raise ValueError('attention_mask must be left padding (zeros, then ones) in every row')
    return [row[m] for row, m in zip(ids, mask)]
  if attention_mask is not None:
    raise ValueError('attention_mask is only accepted with a [batch, length] array of input_ids')
  return [np.asarray(row, np.int64).reshape(-1) for row in input_ids]


def make_batch(input_ids, attention_mask, config: QwenVLConfig, pad_id: int, buckets: Buckets) -> Batch:
  rows = _as_rows(input_ids, attention_mask)
  if not rows:
    raise ValueError('input_ids holds no rows')
  vocab = config.text.vocab_size
  for r, row in enumerate(rows):
    if row.size == 0:
      raise ValueError(f'row {r} of input_ids holds no tokens')
    if row.min() < 0 or row.max() >= vocab:
      raise ValueError(f'row {r} of input_ids holds ids outside the vocabulary [0, {vocab})')
  longest = max(len(r) for r in rows)
  b, p = buckets.count(len(rows)), buckets.length(longest)
  ids, mask = np.zeros((b, p), np.int32), np.zeros((b, p), bool)
  prompt = np.full((len(rows), longest), pad_id, np.int64)
  for r, row in enumerate(rows):
    ids[r, p - len(row):], mask[r, p - len(row):] = row, True
    prompt[r, longest - len(row):] = row
  return Batch(ids, mask, prompt, len(rows))


def load_images(images: Sequence[ImageSource], config: QwenVLConfig,
                loader: ImageLoader | None = None) -> np.ndarray:
  """Paths, URLs, bytes, PIL images or HWC arrays -> normalised pixels [n, S, S, 3] for the model.

  Loading happens on the host through `loader` (default: `ImageLoader()`, no URLs).
  """
  loader = loader or ImageLoader()
  return preprocess_images([loader.load(im) for im in images], config.vision.image_size)


def decode_form() -> tuple[bool, bool]:
  """(scan_layers, weight_major) of the model decoding runs: one module per layer, and weight-major
  kernels on the CPU backend, whose dots read them fastest that way."""
  return False, jax.default_backend() == 'cpu'


def check_request(config: QwenVLConfig, prompt_lengths: Sequence[int], n_images: int, g: GenerationConfig,
                  *, buckets: Buckets = Buckets(), output_logits: bool = False, params=None) -> None:
  """Raises `budget.GenerationLimitError` when the longest prompt plus max_new_tokens passes the model's
  window, or when the request's estimated memory passes what is free; host arithmetic only.

  `params`: when given in another form than decoding reads (`decode_params`), its converted copy is
  counted too.
  """
  longest = int(max(prompt_lengths))
  budget.check_window(config, longest, g.max_new_tokens)
  prompt_slots = buckets.length(longest)
  copy = 0
  if params is not None and param_layout.form(params) != decode_form():
    copy = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  budget.check_memory(budget.estimate(
      config, Buckets.count(len(prompt_lengths)), prompt_slots, prompt_slots + buckets.length(g.max_new_tokens),
      Buckets.count(n_images) if n_images else 0, output_logits=output_logits, params_bytes=copy))
