"""Choosing the next token from logits: Hugging Face's warpers, min_new_tokens, greedy or seeded sampling."""
from __future__ import annotations

import dataclasses

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


_TOP_P_CANDIDATES = 256  # top-p first looks among this many best tokens; a full sort costs ~35 ms at 152k


def _top_p_threshold(descending: Array, lse: Array, top_p: float) -> tuple[Array, Array]:
  """(smallest kept logit [b, 1], whether the candidates hold top_p of the mass [b]).

  Hugging Face removes a token when the ascending cumulative probability up to it is <= 1 - top_p,
  i.e. when the tokens above it already hold top_p: the kept tokens are a prefix of `descending`.
  """
  probs = jnp.exp(descending - lse[:, None])
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  n_kept = jnp.maximum((mass_above < top_p).sum(-1), 1)  # the best token always stays
  return jnp.take_along_axis(descending, n_kept[:, None] - 1, axis=-1), probs.sum(-1) >= top_p


def warp_logits(logits: Array, temperature: float, top_k: int, top_p: float) -> Array:
  """Hugging Face's TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper in that order; [b, v].

  Removed tokens get -inf. Ties at a threshold are all kept (torch keeps an arbitrary subset).
  """
  if temperature != 1.0:
    logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    lse = jax.nn.logsumexp(logits, axis=-1)
    candidates = jax.lax.top_k(logits, min(_TOP_P_CANDIDATES, logits.shape[-1]))[0]
    threshold, enough = _top_p_threshold(candidates, lse, top_p)
    threshold = jax.lax.cond(  # flat distributions need every token sorted
        enough.all(), lambda: threshold,
        lambda: _top_p_threshold(-jnp.sort(-logits, axis=-1), lse, top_p)[0])
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def argmax_last(logits: Array) -> Array:
  """jnp.argmax(logits, -1) (first maximum; first NaN if any) as int32, in two plain reductions: XLA's
  CPU backend runs argmax's (value, index) reduction element by element, 2.7 ms against 0.6 ms for
  [8, 151936], 2% of a batch-8 decode step on the bench dims."""
  top = logits.max(-1, keepdims=True)
  first = (logits == top) | jnp.isnan(logits)
  return jnp.min(jnp.where(first, jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1]), axis=-1)


def _within_limit(logits: Array, limit: int | None) -> Array:
  """Ids at or past `limit` get -inf (an exact -inf, whatever the logits held: NaN included)."""
  if limit is None or limit >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < limit, logits, -jnp.inf)


def select(logits: Array, step: Array, min_new: Array, key: Array, s: Sampler) -> Array:
  """The next token [b] from raw logits [b, v] for the step-th new token; never an id >= vocab_limit."""
  logits = _within_limit(logits, s.vocab_limit)
  stops = [i for i in s.stop_ids if i < logits.shape[-1]]
  if stops:  # Hugging Face's MinNewTokensLengthLogitsProcessor, applied to every stop id
    logits = logits.at[:, jnp.array(stops)].set(jnp.where(step < min_new, -jnp.inf, logits[:, stops]))
  if not s.do_sample:
    return argmax_last(logits)  # a first maximum (or first NaN) is never a masked -inf
  # Masked again after warping: arithmetic on -inf can give NaN (-inf / inf, inf - inf), and both
  # argmax and categorical would pick a NaN first.
  logits = _within_limit(warp_logits(logits, s.temperature, s.top_k, s.top_p), s.vocab_limit)
  return jax.random.categorical(jax.random.fold_in(key, step), logits, axis=-1).astype(jnp.int32)
