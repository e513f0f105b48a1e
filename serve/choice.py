"""The token choice of the engine's rows: each row's sampling settings kept as host arrays, and one
program choosing the next token of many rows at once, whatever settings they hold.

A row's settings (greedy or sampled, temperature, top_k, top_p, stop ids, min_new_tokens, vocab limit)
and its PRNG key are arguments of the program, not constants in it: a client's new temperature or stop
list compiles nothing. Programs: one per count of rows chosen for (a power of two) and stop-id width.
A sampled row draws `categorical(fold_in(key, step), logits [1, v])`, what `generate` draws for the same
request alone with its seed (`sampling.select`), and a greedy row takes the first maximum as it does.
"""
from __future__ import annotations

import jax
import numpy as np

from qwenvl_jax.batching import Buckets
from qwenvl_jax.generation_config import GenerationConfig
from qwenvl_jax.sampling import RowSampling, select

STOP_WIDTH = 8  # stop ids per row; a request with more widens every row to the next power of two
_NO_LIMIT = np.iinfo(np.int32).max


@jax.jit
def _choose(logits, sampling: RowSampling, step, min_new, key_data):
  return select(logits, step, min_new, jax.random.wrap_key_data(key_data), sampling)


class Choices:
  """Per-row settings of `rows` rows; a free row holds greedy defaults (its choice is never read)."""

  def __init__(self, rows: int):
    self.do_sample = np.zeros((rows,), bool)
    self.temperature = np.ones((rows,), np.float32)
    self.top_k = np.zeros((rows,), np.int32)
    self.top_p = np.ones((rows,), np.float32)
    self.stop_ids = np.full((rows, STOP_WIDTH), -1, np.int32)
    self.vocab_limit = np.full((rows,), _NO_LIMIT, np.int32)
    self.min_new = np.zeros((rows,), np.int32)
    self.key_data = np.zeros((rows, 2), np.uint32)  # a threefry key per row

  def set(self, row: int, g: GenerationConfig, seed: int) -> None:
    """The row takes a new request's settings; greedy rows skip the warpers, as `Sampler.of` does."""
    sample = not g.greedy
    self.do_sample[row] = sample
    self.temperature[row], self.top_k[row], self.top_p[row] = \
        (g.temperature, min(g.top_k, _NO_LIMIT), g.top_p) if sample else (1.0, 0, 1.0)
    stops = g.stop_ids
    if len(stops) > self.stop_ids.shape[1]:  # widened for good: one more program per width, never per value
      wider = np.full((len(self.min_new), Buckets.count(len(stops))), -1, np.int32)
      wider[:, :self.stop_ids.shape[1]] = self.stop_ids
      self.stop_ids = wider
    self.stop_ids[row] = -1
    self.stop_ids[row, :len(stops)] = [min(i, _NO_LIMIT) for i in stops]
    self.vocab_limit[row] = _NO_LIMIT if g.vocab_limit is None else min(g.vocab_limit, _NO_LIMIT)
    self.min_new[row] = g.min_new_tokens
    self.key_data[row] = jax.random.key_data(jax.random.key(seed))

  def clear(self, row: int) -> None:
    """A freed row: greedy, so that a step of greedy rows alone draws nothing for it."""
    self.do_sample[row] = False

  def choose(self, logits: jax.Array, rows: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The next token [n] of each of `rows` [n] from their logits [n, v], each the steps[i]-th new token
    of its row (n a power of two; a row may repeat as padding)."""
    sampling = RowSampling(self.do_sample[rows], self.temperature[rows], self.top_k[rows], self.top_p[rows],
                           self.stop_ids[rows], self.vocab_limit[rows])
    return np.asarray(_choose(logits, sampling, steps.astype(np.int32), self.min_new[rows], self.key_data[rows]))
