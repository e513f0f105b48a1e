"""The device side of continuous batching: one preallocated KV cache of `rows` decode rows of `length`
key slots each. A prompt is prefilled on its own (left-padded to its length bucket, images encoded
once) and put into a free row; one step then advances every row by one token, each at its own slot.

Each row keeps what `generate` keeps for it: its key mask (the prompt's real tokens, then every slot),
its dynamic-NTK factor (chosen at its prefill) and the slot its next token is written at; positions
follow from the mask. Stale keys of an earlier request in the row are never seen: a query sees slots up
to its own, and those past the prompt were written by this request's own steps. So a row's tokens are
the ones `generate` gives the same request alone.

A step runs over the first rows only, up to the last busy one rounded up to a power of two (new requests
take the lowest free row), so a server of many rows serving few requests pays for few.

Compiles: the prefill once per prompt-length bucket and image-count bucket, the step once per power of
two of rows, and the token choice (`sampling.select`) once per distinct sampler and shape.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from jax.sharding import Mesh

from qwenvl_jax import sharding
from qwenvl_jax.batching import Buckets, decode_form
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.decode import decoding_model, image_features, prompt_forward
from qwenvl_jax.decoder import KVCache
from qwenvl_jax.model import check_image_spans
from qwenvl_jax.sampling import Sampler, select

Array = jax.Array


def _prefill_row(params, cache, row, ids, mask, features, *, config: QwenVLConfig):
  one, logits, _, alpha = prompt_forward(params, ids, mask, features, config=config, slots=ids.shape[1])
  return tuple(c.put_rows(r, row) for c, r in zip(cache, one)), logits, alpha[0]


def _step(params, cache, tokens, key_mask, alpha, index, *, config: QwenVLConfig):
  """One token for each of the first n = len(tokens) rows (the busy ones all lie there): a step over n
  rows costs a batch of n, not of every row, at the price of copying those rows of the cache."""
  n, whole = tokens.shape[0], _rows(cache) == tokens.shape[0]
  part = cache if whole else tuple(c.first_rows(n) for c in cache)
  out = decoding_model(config).apply({'params': params}, tokens[:, None], attention_mask=key_mask, alpha=alpha,
                                     cache=part, cache_index=index)
  if whole:
    return out['cache'], out['logits'][:, 0]
  return tuple(c.put_rows(p, 0) for c, p in zip(cache, out['cache'])), out['logits'][:, 0]


def _rows(cache: tuple[KVCache, ...]) -> int:
  """Rows of a batch's cache (one row may be stored without its b axis)."""
  return cache[0].k.shape[0] if cache[0].k.ndim == 4 else 1


_JIT = dict(static_argnames='config', donate_argnums=1)  # the cache is updated in place
_PLAIN = jax.jit(_prefill_row, **_JIT), jax.jit(_step, **_JIT)


@functools.partial(jax.jit, static_argnames='sampler')
def _select_all(logits, step, min_new, key, *, sampler: Sampler):
  """`select` over every row of logits [b, v], each at its own step and min_new_tokens [b]: one program
  for all greedy rows (greedy ignores the key)."""
  return select(logits, step[:, None], min_new[:, None], key, sampler)


@functools.partial(jax.jit, static_argnames='sampler')
def _select_one(logits, row, step, min_new, key, *, sampler: Sampler):
  """`select` for one sampled row as `generate` samples it alone: logits [1, v], its own key."""
  return select(jax.lax.dynamic_slice_in_dim(logits, row, 1), step, min_new, key, sampler)[0]


class Slots:
  """The cache, per-row key masks, NTK factors, and the compiled prefill and step over them.

  mesh, rules: parameters sharded on `mesh` (`sharding.shard_params`); the programs are traced under the
  rules (their own jit, `sharding.sharded_jit`) and the cache is split by rows over the batch axes where
  they divide the rows.
  """

  def __init__(self, config: QwenVLConfig, params: dict, rows: int, length: int,
               buckets: Buckets = Buckets(), mesh: Mesh | None = None, rules: str | None = None):
    self.config, self.params, self.rows, self.length, self.buckets = config, params, rows, length, buckets
    self.mesh, self.rules = mesh, rules
    if mesh is None:
      self._prefill_row, self._step = _PLAIN
    else:
      self._prefill_row, self._step = (sharding.sharded_jit(f, mesh, rules, **_JIT) for f in (_prefill_row, _step))
    self.reset()

  def reset(self) -> None:
    """Every row free, the cache allocated afresh."""
    dtype = decoding_model(self.config).config.dtype
    self.cache = tuple(KVCache.zeros(self.config.text, self.rows, self.length, dtype, slots_last=decode_form()[1])
                       for _ in range(self.config.text.num_layers))
    if self.mesh is not None and self.rows > 1:  # (one row may be stored without its row axis)
      self.cache = jax.tree.map(
          lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, x.shape)), self.cache)
    # A free row attends to its slot 0 only (it computes something harmless, never read).
    self.key_mask = np.zeros((self.rows, self.length), bool)
    self.key_mask[:, 0] = True
    self.alpha = np.ones((self.rows,), np.float32)

  def broken(self) -> bool:
    """Whether a failed program was handed the cache (donated) and left none."""
    return any(c.k.is_deleted() for c in self.cache)

  def prompt_slots(self, n_tokens: int) -> int:
    """Slots a prompt of n_tokens takes: its length bucket (the new tokens follow it)."""
    return self.buckets.length(n_tokens)

  def prefill(self, row: int, tokens, pixels) -> tuple[Array, int]:
    """Prefills `tokens` (and the images of their spans) into `row`; returns (logits [1, v] at the last
    token, the slot of the first new token)."""
    p = self.prompt_slots(len(tokens))
    if p >= self.length:
      raise ValueError(f'a prompt of {len(tokens)} tokens takes {p} slots, the rows hold {self.length}')
    ids, mask = np.zeros((1, p), np.int32), np.zeros((1, p), bool)
    ids[0, p - len(tokens):], mask[0, p - len(tokens):] = tokens, True
    features = image_features(self.params, pixels, self.config, check_image_spans(ids, self.config))
    self.cache, logits, alpha = self._prefill_row(self.params, self.cache, np.int32(row), ids, mask, features,
                                             config=self.config)
    self.key_mask[row] = np.arange(self.length) >= p - len(tokens)
    self.alpha[row] = alpha
    return logits, p

  def free(self, row: int) -> None:
    self.key_mask[row] = False
    self.key_mask[row, 0] = True
    self.alpha[row] = 1.0

  def step(self, tokens: np.ndarray, index: np.ndarray, busy: int) -> Array:
    """Feeds tokens [rows] (written at slots index [rows]) to the first rows up to the last busy one
    (row busy - 1), rounded up to a power of two (one program each); returns their logits [n, v]."""
    n = min(Buckets.count(busy), self.rows)
    self.cache, logits = self._step(self.params, self.cache, tokens[:n], self.key_mask[:n], self.alpha[:n],
                                    index[:n], config=self.config)
    return logits


def choose(logits: Array, rows: list[int], steps: list[int], min_new: list[int], sampler: Sampler,
           keys: list[Array]) -> list[int]:
  """The next token of each of `rows` (all with `sampler`) from logits [b, v], as `generate` would pick
  it: greedy rows in one program, each sampled row with its own key over its own logits."""
  if not sampler.do_sample:
    step, least = np.zeros((logits.shape[0],), np.int32), np.zeros((logits.shape[0],), np.int32)
    step[rows], least[rows] = steps, min_new
    picked = np.asarray(_select_all(logits, step, least, keys[0], sampler=sampler))
    return [int(picked[r]) for r in rows]
  picked = [_select_one(logits, np.int32(r), np.int32(s), np.int32(m), k, sampler=sampler)
            for r, s, m, k in zip(rows, steps, min_new, keys)]
  return [int(t) for t in jax.device_get(picked)]
