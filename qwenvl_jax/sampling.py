"""Choosing the next token from logits: Hugging Face's warpers, min_new_tokens, greedy or seeded sampling.

One computation serves two callers: `generate`, whose settings are static (a `Sampler`, one compile per
setting, one key for the batch), and the server's engine, whose rows each bring their own settings as
arrays (`RowSampling`, traced: any values run in the same program) and their own key.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwenvl_jax.generation_config import GenerationConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampler:
  """The static part of a GenerationConfig: changing it recompiles, changing token counts does not."""
  do_sample: bool
  temperature: float
  top_k: int
  top_p: float
  stop_ids: tuple[int, ...]
  pad_id: int
  vocab_limit: int | None = None

  @classmethod
  def of(cls, g: GenerationConfig) -> 'Sampler':
    if g.greedy:  # greedy ignores the warpers, as Hugging Face does
      return cls(False, 1.0, 0, 1.0, g.stop_ids, g.pad_id, g.vocab_limit)
    return cls(True, g.temperature, g.top_k, g.top_p, g.stop_ids, g.pad_id, g.vocab_limit)


class RowSampling(NamedTuple):
  """A Sampler per row, as arrays (a jit argument: new values compile nothing). Greedy rows hold
  temperature 1, top_k 0 and top_p 1 (no warping)."""
  do_sample: Array  # [b] bool
  temperature: Array  # [b] float32
  top_k: Array  # [b] int32, 0: off
  top_p: Array  # [b] float32, 1: off
  stop_ids: Array  # [b, S] int32, padded with -1
  vocab_limit: Array  # [b] int32; ids at or past it are never chosen


# top-k up to this many and top-p look among this many best tokens first; a full sort costs ~35 ms at 152k
_CANDIDATES = 256


def candidate_width(top_k, vocab: int) -> int:
  """The best tokens `warp_logits` must look among for rows of these top_k (0: off): the next power of two
  holding each top_k below the vocabulary, at least 256 (top_k >= vocab keeps every token). A server
  passes it for the rows it chooses for, so that one request's top_k of 1000 costs a top-1024 of its
  batch's logits, never a sort of the whole vocabulary."""
  ks = [int(k) for k in top_k if 0 < k < vocab]
  return min(vocab, max([_CANDIDATES] + [1 << (k - 1).bit_length() for k in ks]))


def _rows(x) -> bool:
  """Whether a setting is given per row (an array) rather than as one Python number for all."""
  return not isinstance(x, (int, float))


def _top_p_threshold(descending: Array, lse: Array, top_p) -> tuple[Array, Array]:
  """(smallest kept logit [b, 1], whether the candidates hold top_p of the mass [b]).

  Hugging Face removes a token when the ascending cumulative probability up to it is <= 1 - top_p,
  i.e. when the tokens above it already hold top_p: the kept tokens are a prefix of `descending`.
  """
  probs = jnp.exp(descending - lse[:, None])
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  n_kept = jnp.maximum((mass_above < top_p).sum(-1), 1)  # the best token always stays
  enough = (probs.sum(-1, keepdims=True) >= top_p)[:, 0]
  return jnp.take_along_axis(descending, n_kept[:, None] - 1, axis=-1), enough


def _kth(descending: Array, k: Array) -> Array:
  """The k-th best logit [b, 1] of each row (k [b] >= 1; past the width: the last)."""
  return jnp.take_along_axis(descending, jnp.clip(k, 1, descending.shape[-1])[:, None] - 1, axis=-1)


def warp_logits(logits: Array, temperature, top_k, top_p, candidates: int = _CANDIDATES) -> Array:
  """Hugging Face's TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper in that order; [b, v].

  Each setting is a Python number (the same for every row; 1.0, 0 and 1.0 skip their warper) or an array
  of one value per row [b] (traced: temperature 1 changes nothing, top_k 0 and top_p 1 are off). A row's
  result does not depend on the others'. Removed tokens get -inf. Ties at a threshold are all kept (torch
  keeps an arbitrary subset). candidates: the best tokens looked among first (`candidate_width`); rows of
  a larger top_k, and rows whose top_p needs more, sort every token.
  """
  b, v = logits.shape
  column = lambda x: jnp.reshape(jnp.asarray(x), (b, 1)) if _rows(x) else x
  temperature, top_p = column(temperature), column(top_p)
  if _rows(temperature) or temperature != 1.0:
    logits = logits / temperature
  # the best logits, descending: top-k's and then top-p's (top_k over a -inf tail is slow)
  width, candidates = min(candidates, v), None
  if _rows(top_k) or 0 < top_k <= width:
    k = jnp.broadcast_to(jnp.reshape(jnp.asarray(top_k, jnp.int32), (-1,)), (b,))
    k = jnp.where(k >= v, 0, k)  # keeping the whole vocabulary removes nothing: off
    candidates = jax.lax.top_k(logits, width)[0]
    kth = _kth(candidates, k)
    if _rows(top_k) and v > width:  # rows keeping more than the candidates sort every token
      kth = jax.lax.cond((k > width).any(),
                         lambda: jnp.where(k[:, None] > width, _kth(-jnp.sort(-logits, axis=-1), k), kth),
                         lambda: kth)
    kth = jnp.where(k[:, None] > 0, kth, -jnp.inf)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    candidates = jnp.where(candidates < kth, -jnp.inf, candidates)
  elif top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, v))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if _rows(top_p) or top_p < 1.0:
    lse = jax.nn.logsumexp(logits, axis=-1)
    if candidates is None:
      candidates = jax.lax.top_k(logits, width)[0]
    threshold, enough = _top_p_threshold(candidates, lse, top_p)
    enough = enough | jnp.reshape(top_p >= 1.0, (-1,))
    threshold = jax.lax.cond(  # rows of flat distributions need every token sorted
        enough.all(), lambda: threshold,
        lambda: jnp.where(enough[:, None], threshold, _top_p_threshold(-jnp.sort(-logits, axis=-1), lse, top_p)[0]))
    threshold = jnp.where(top_p < 1.0, threshold, -jnp.inf)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def argmax_last(logits: Array) -> Array:
  """jnp.argmax(logits, -1) (first maximum; first NaN if any) as int32, in two plain reductions: XLA's
  CPU backend runs argmax's (value, index) reduction element by element, 2.7 ms against 0.6 ms for
  [8, 151936], 2% of a batch-8 decode step on the bench dims."""
  top = logits.max(-1, keepdims=True)
  first = (logits == top) | jnp.isnan(logits)
  return jnp.min(jnp.where(first, jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1]), axis=-1)


def _masked(logits: Array, s: Sampler | RowSampling, held: Array) -> Array:
  """Ids at or past the vocab limit, and the stop ids of rows where `held` [b] or [] (min_new_tokens not
  reached: Hugging Face's MinNewTokensLengthLogitsProcessor), get an exact -inf whatever they held."""
  b, v = logits.shape
  limit = s.vocab_limit
  if _rows(limit) and limit is not None:
    logits = jnp.where(jnp.arange(v) < jnp.reshape(limit, (-1, 1)), logits, -jnp.inf)
  elif limit is not None and limit < v:
    logits = jnp.where(jnp.arange(v) < limit, logits, -jnp.inf)
  stops = s.stop_ids
  if isinstance(stops, tuple):
    stops = jnp.array([i for i in stops if i < v] or [-1], jnp.int32)[None]
  # ids past the vocabulary, padding (-1) and rows not held point past the end, and are dropped
  stops = jnp.where((stops >= 0) & (stops < v) & jnp.reshape(held, (-1, 1)), stops, v)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, stops.shape[1]))
  return logits.at[rows, jnp.broadcast_to(stops, rows.shape)].set(-jnp.inf, mode='drop')


def _draw(key: Array, step: Array, logits: Array) -> Array:
  """categorical(fold_in(key, step)) over logits [b, v]: one key for the batch (key []), or one key and
  step per row (key [b]), each row then drawn as it is alone ([1, v])."""
  if key.ndim == 0:
    return jax.random.categorical(jax.random.fold_in(key, step), logits, axis=-1)
  draw = lambda k, s, row: jax.random.categorical(jax.random.fold_in(k, s), row[None], axis=-1)[0]
  return jax.vmap(draw)(key, jnp.broadcast_to(step, key.shape), logits)


def select(logits: Array, step: Array, min_new: Array, key: Array, s: Sampler | RowSampling,
           candidates: int = _CANDIDATES) -> Array:
  """The next token [b] from raw logits [b, v] for the step-th new token; never an id >= vocab_limit.

  step, min_new: [] or [b]. key: one for the batch, or one per row [b]. candidates: `warp_logits`'s.
  """
  logits = _masked(jnp.asarray(logits), s, jnp.asarray(step) < min_new)
  if s.do_sample is False:
    return argmax_last(logits)  # a first maximum (or first NaN) is never a masked -inf

  def sampled():
    # Masked again after warping: arithmetic on -inf can give NaN (-inf / inf, inf - inf), and both
    # argmax and categorical would pick a NaN first.
    warped = _masked(warp_logits(logits, s.temperature, s.top_k, s.top_p, candidates), s, step < min_new)
    return _draw(key, step, warped).astype(jnp.int32)
  if s.do_sample is True:
    return sampled()
  greedy = argmax_last(logits)  # rows of both kinds: draw only when some row samples
  return jnp.where(s.do_sample, jax.lax.cond(s.do_sample.any(), sampled, lambda: greedy), greedy)
