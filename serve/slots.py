"""The device side of continuous batching: one preallocated KV cache of `rows` decode rows of `length`
key slots each. Prompts of one length bucket are prefilled together (each left-padded to the bucket, its
images encoded once), each into a free row; one step then advances every row by one token, each at its
own slot.

Each row keeps what `generate` keeps for it: its key mask (the prompt's real tokens, then every slot),
its dynamic-NTK factor (chosen at its prefill) and the slot its next token is written at; positions
follow from the mask. Stale keys of an earlier request in the row are never seen: a query sees slots up
to its own, and those past the prompt were written by this request's own steps. So a row's tokens are
the ones `generate` gives the same request alone.

A step runs over the first rows only, up to the last busy one rounded up to a power of two (new requests
take the lowest free row), so a server of many rows serving few requests pays for few; it writes and reads
those rows where they lie in the whole cache (no copy of them out and back).

Compiles: the prefill once per prompt-length bucket, count of prompts (a power of two) and image-count
bucket, the step once per power of two of rows (the token choice: `serve/choice.py`).
"""
from __future__ import annotations

import jax
import numpy as np

from jax.sharding import Mesh

from qwenvl_jax import sharding
from qwenvl_jax.batching import Buckets
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.decode import decoding_model, empty_cache, image_features, prompt_forward
from qwenvl_jax.model import check_image_spans

Array = jax.Array


def _prefill_rows(params, cache, rows, ids, mask, features, *, config: QwenVLConfig):
  """The left-padded prompts ids [k, p] into rows [k] of the cache (an index past the last row: a
  padding prompt, written nowhere); returns the cache, logits [k, v] at the last tokens, NTK factors [k]."""
  new, logits, _, alpha = prompt_forward(params, ids, mask, features, config=config, slots=ids.shape[1])
  return tuple(c.put_rows(n, rows) for c, n in zip(cache, new)), logits, alpha


def _step(params, cache, tokens, key_mask, alpha, index, *, config: QwenVLConfig):
  """One token for each of the first n = len(tokens) rows (the busy ones all lie there): a step over n
  rows costs a batch of n, not of every row; the cache's rows are written and read where they lie."""
  out = decoding_model(config).apply({'params': params}, tokens[:, None], attention_mask=key_mask, alpha=alpha,
                                     cache=cache, cache_index=index)
  return out['cache'], out['logits'][:, 0]


_JIT = dict(static_argnames='config', donate_argnums=1)  # the cache is updated in place
_PLAIN = jax.jit(_prefill_rows, **_JIT), jax.jit(_step, **_JIT)


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
      self._prefill, self._step = _PLAIN
    else:
      self._prefill, self._step = (sharding.sharded_jit(f, mesh, rules, **_JIT) for f in (_prefill_rows, _step))
    self.reset()

  def reset(self) -> None:
    """Every row free, the cache allocated afresh."""
    self.cache = empty_cache(self.config, self.rows, self.length)
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

  def prefill(self, rows: list[int], prompts: list[tuple[tuple[int, ...], np.ndarray | None]]) -> tuple[Array, int]:
    """Prefills the prompts (token ids, pixels of their image spans or None; all of one length bucket) into
    `rows`, one program for all; returns (logits [n, v] at their last tokens, n = len(rows) rounded up to a
    power of two: past len(rows) padding; the slot of the first new token)."""
    p = self.prompt_slots(len(prompts[0][0]))
    if p >= self.length:
      raise ValueError(f'a prompt of {len(prompts[0][0])} tokens takes {p} slots, the rows hold {self.length}')
    n = Buckets.count(len(rows))
    ids, mask = np.zeros((n, p), np.int32), np.zeros((n, p), bool)
    for i, (tokens, _) in enumerate(prompts):
      if self.prompt_slots(len(tokens)) != p:
        raise ValueError(f'prompts prefilled together must share a length bucket: {len(tokens)} tokens take '
                         f'{self.prompt_slots(len(tokens))} slots, the first prompt {p}')
      ids[i, p - len(tokens):], mask[i, p - len(tokens):] = tokens, True
    pixels = [x for _, x in prompts if x is not None]
    features = image_features(self.params, np.concatenate(pixels) if pixels else None, self.config,
                              check_image_spans(ids, self.config))
    index = np.full((n,), self.rows, np.int32)  # padding prompts go past the last row: written nowhere
    index[:len(rows)] = rows
    self.cache, logits, alpha = self._prefill(self.params, self.cache, index, ids, mask, features,
                                              config=self.config)
    alpha = np.asarray(alpha)
    for i, r in enumerate(rows):
      self.key_mask[r] = np.arange(self.length) >= p - int(mask[i].sum())
      self.alpha[r] = alpha[i]
    return logits, p

  def warm(self, n_tokens: int) -> list[Array]:
    """Runs once (compiling them) the programs serving prompts of n_tokens: the prefill of each power of
    two of prompts up to the rows (padding prompts, written nowhere) and the step over each power of two
    of rows; returns the logits of each, for the token choice to compile on. Call it with every row free."""
    p, logits = self.prompt_slots(n_tokens), []
    features = image_features(self.params, None, self.config, 0)
    for n in (1 << i for i in range(Buckets.count(self.rows).bit_length())):
      ids, mask = np.zeros((n, p), np.int32), np.ones((n, p), bool)
      self.cache, prefilled, _ = self._prefill(self.params, self.cache, np.full((n,), self.rows, np.int32), ids,
                                               mask, features, config=self.config)
      logits.append(prefilled)
      # free rows attend to slot 0 only, and are written there
      logits.append(self.step(np.zeros((self.rows,), np.int32), np.zeros((self.rows,), np.int32), min(n, self.rows)))
    return logits

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
