"""The device side of continuous batching: one preallocated KV cache of `rows` decode rows of `length`
key slots each. Prompts of one length bucket are prefilled together (each left-padded to the bucket, its
images encoded once), each into a free row; one step then advances every row by one token, each at its
own slot.

Each row keeps what `generate` keeps for it (`RowState`): its key mask (slots from its prompt's first
real token on, kept as that slot), its dynamic-NTK factor (chosen at its prefill) and the slot its next
token is written at; positions follow from the mask. Stale keys of an earlier request in the row are
never seen: a query sees slots up to its own, and those past the prompt were written by this request's
own steps. So a row's tokens are the ones `generate` gives the same request alone.

A step runs over the first rows only, up to the last busy one rounded up to a power of two (new requests
take the lowest free row), and over their first slots only, up to a power of two covering the slot the
furthest of them writes (`bucket`): a server of 8 rows of 2048 slots serving rows of 100 tokens reads 128
slots of each, not 2048. It writes and reads those rows where they lie in the whole cache. The row state
lives on the device: the engine sends it when a row starts or ends, and the step programs advance it.

Compiles: the prefill once per prompt-length bucket, count of prompts (a power of two) and image-count
bucket, the step once per (power of two of rows, slot bucket) (the token choice: `serve/choice.py`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
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


class RowState(NamedTuple):
  """Where each row stands, one entry per row of the cache (a free row: at slot 0, seeing slot 0 only)."""
  token: Array  # int32: its last token, fed at the next step
  index: Array  # int32: the slot that token is written at
  steps: Array  # int32: tokens generated so far
  start: Array  # int32: its first real slot; its key mask is every slot from there
  alpha: Array  # float32: its dynamic-NTK factor
  live: Array  # bool: a request holds it

  def advanced(self, token: Array) -> 'RowState':
    """After a step over the first len(token) rows: their new tokens, the busy rows one slot further."""
    return self._replace(token=self.token.at[:len(token)].set(token), index=self.index + self.live,
                         steps=self.steps + self.live)


def _step(params, cache, rows: RowState, *, config: QwenVLConfig, n: int, slots: int):
  """One token for each of the first n rows (the busy ones all lie there), over their first `slots` slots
  (each busy row's next one among them): a step over n rows costs a batch of n, not of every row, and
  reads n x slots of the cache, not every row's whole length. The cache is written where the rows lie."""
  key_mask = jnp.arange(slots) >= rows.start[:n, None]
  out = decoding_model(config).apply({'params': params}, rows.token[:n, None], attention_mask=key_mask,
                                     alpha=rows.alpha[:n], cache=cache, cache_index=rows.index[:n])
  return out['cache'], out['logits'][:, 0]


_JIT = dict(donate_argnums=1)  # the cache is updated in place
_STATIC = {_prefill_rows: ('config',), _step: ('config', 'n', 'slots')}
_PLAIN = tuple(jax.jit(f, static_argnames=names, **_JIT) for f, names in _STATIC.items())
MIN_SLOTS = 64  # the smallest slot bucket of a step


def step_bucket(busy: int, last_slot: int, rows: int, length: int, min_slots: int = MIN_SLOTS) -> tuple[int, int]:
  """(rows, slots) of a step over a cache of rows x length when row busy - 1 is the last busy one and
  last_slot the furthest slot a row writes: powers of two (slots at least min_slots), capped at the cache's."""
  return min(Buckets.count(busy), rows), min(max(Buckets.count(last_slot + 1), min_slots), length)


class Slots:
  """The cache, per-row key-mask starts and NTK factors, and the compiled prefill and step over them.

  mesh, rules: parameters sharded on `mesh` (`sharding.shard_params`); the programs are traced under the
  rules (their own jit, `sharding.sharded_jit`) and the cache is split by rows over the batch axes where
  they divide the rows. min_slots: the smallest slot bucket of a step (a power of two).
  """

  def __init__(self, config: QwenVLConfig, params: dict, rows: int, length: int,
               buckets: Buckets = Buckets(), mesh: Mesh | None = None, rules: str | None = None,
               min_slots: int = MIN_SLOTS):
    self.config, self.params, self.rows, self.length, self.buckets = config, params, rows, length, buckets
    self.mesh, self.rules, self.min_slots = mesh, rules, min_slots
    if mesh is None:
      self._prefill, self._step = _PLAIN
    else:
      self._prefill, self._step = (sharding.sharded_jit(f, mesh, rules, static_argnames=names, **_JIT)
                                   for f, names in _STATIC.items())
    self.reset()

  def reset(self) -> None:
    """Every row free, the cache allocated afresh."""
    self.cache = empty_cache(self.config, self.rows, self.length)
    if self.mesh is not None and self.rows > 1:  # (one row may be stored without its row axis)
      self.cache = jax.tree.map(
          lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, x.shape)), self.cache)
    self.start = np.zeros((self.rows,), np.int32)
    self.alpha = np.ones((self.rows,), np.float32)

  def broken(self) -> bool:
    """Whether a failed program was handed the cache (donated) and left none."""
    return any(c.k.is_deleted() for c in self.cache)

  def prompt_slots(self, n_tokens: int) -> int:
    """Slots a prompt of n_tokens takes: its length bucket (the new tokens follow it)."""
    return self.buckets.length(n_tokens)

  def bucket(self, busy: int, last_slot: int) -> tuple[int, int]:
    """(rows, slots) a step reads when row busy - 1 is the last busy one and last_slot the furthest slot
    a row writes (`step_bucket`)."""
    return step_bucket(busy, last_slot, self.rows, self.length, self.min_slots)

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
    for i, (r, (tokens, _)) in enumerate(zip(rows, prompts)):
      self.start[r], self.alpha[r] = p - len(tokens), alpha[i]
    return logits, p

  def free(self, row: int) -> None:
    self.start[row], self.alpha[row] = 0, 1.0

  def state(self, token: np.ndarray, index: np.ndarray, steps: np.ndarray, live: np.ndarray) -> RowState:
    """The row state on the device, from the engine's view of its rows (each [rows]) and the key-mask
    starts and NTK factors of their prefills: one transfer, when rows start or end."""
    rows = RowState(token.astype(np.int32), index.astype(np.int32), steps.astype(np.int32), self.start.copy(),
                    self.alpha.copy(), live.astype(bool))
    if self.mesh is None:
      return jax.device_put(rows)
    return jax.device_put(rows, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

  def step(self, rows: RowState, n: int, slots: int) -> Array:
    """Feeds each row's token to the first n rows over their first `slots` slots (`bucket`); returns
    their logits [n, v]. Everything it reads is on the device already."""
    self.cache, logits = self._step(self.params, self.cache, rows, config=self.config, n=n, slots=slots)
    return logits

  def warm(self, n_tokens: int, new_tokens: int | None = None) -> list[Array]:
    """Runs once (compiling them) the programs serving prompts of n_tokens: the prefill of each power of
    two of prompts up to the rows (padding prompts, written nowhere) and the step over each power of two
    of rows and each slot bucket from the prompt's to the cache's (or to the one of `new_tokens` tokens
    after the prompt); returns the logits of each, for the token choice to compile on. Call it with every
    row free."""
    p, logits = self.prompt_slots(n_tokens), []
    features = image_features(self.params, None, self.config, 0)
    free = self.state(*(np.zeros((self.rows,), np.int32) for _ in range(4)))  # free rows: slot 0 only
    end = self.length if new_tokens is None else min(p + new_tokens, self.length)
    spans = sorted({self.bucket(1, last)[1] for last in range(p, end)})
    for n in (1 << i for i in range(Buckets.count(self.rows).bit_length())):
      ids, mask = np.zeros((n, p), np.int32), np.ones((n, p), bool)
      self.cache, prefilled, _ = self._prefill(self.params, self.cache, np.full((n,), self.rows, np.int32), ids,
                                               mask, features, config=self.config)
      logits.append(prefilled)
      for slots in spans:
        logits.append(self.step(free, min(n, self.rows), slots))
    return logits
