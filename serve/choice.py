"""The token choice of the engine's rows: each row's sampling settings, and one program choosing the next
token of many rows at once, whatever settings they hold.

A row's settings (greedy or sampled, temperature, top_k, top_p, stop ids, min_new_tokens, vocab limit)
and its PRNG key are arguments of the program, not constants in it: a client's new temperature or stop
list compiles nothing. They are kept on the host and copied to the device in one transfer when a row
takes a request (`set`), so that a decode step in which no row changes sends nothing to the device.
Programs: one per count of rows chosen for (a power of two), stop-id width and top-k width (a power of
two holding the largest top_k among the rows, `sampling.candidate_width`: one client's top_k of 1000 makes
its steps look among the best 1024 tokens, not sort the vocabulary).
A sampled row draws `categorical(fold_in(key, step), logits [1, v])`, what `generate` draws for the same
request alone with its seed (`sampling.select`), and a greedy row takes the first maximum as it does.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from qwenvl_jax.batching import Buckets
from qwenvl_jax.generation_config import GenerationConfig
from qwenvl_jax.sampling import RowSampling, candidate_width, select
from serve.slots import RowState

STOP_WIDTH = 8  # stop ids per row; a request with more widens every row to the next power of two
_NO_LIMIT = np.iinfo(np.int32).max


class _Table(NamedTuple):
  sampling: RowSampling
  min_new: np.ndarray | jax.Array
  key_data: np.ndarray | jax.Array  # a threefry key per row


def _pick(logits, table: _Table, steps, candidates: int):
  return select(logits, steps, table.min_new, jax.random.wrap_key_data(table.key_data), table.sampling, candidates)


@functools.partial(jax.jit, static_argnames='candidates')
def _choose(logits, table: _Table, steps, *, candidates: int):
  return _pick(logits, table, steps, candidates)


@functools.partial(jax.jit, static_argnames='candidates')
def _choose_step(logits, table: _Table, rows: RowState, *, candidates: int):
  """The tokens of the first n = len(logits) rows, and `rows` advanced past them (the busy rows' step
  counts and slots; each chosen token is fed at the next step)."""
  n = len(logits)
  token = _pick(logits, jax.tree.map(lambda x: x[:n], table), rows.steps[:n], candidates)
  return token, rows.advanced(token)


class Choices:
  """Per-row settings of `rows` rows; a free row holds greedy defaults (its choice is never read).
  `uploads` counts the transfers of the settings to the device."""

  def __init__(self, rows: int):
    self._host = _Table(RowSampling(np.zeros((rows,), bool), np.ones((rows,), np.float32),
                                    np.zeros((rows,), np.int32), np.ones((rows,), np.float32),
                                    np.full((rows, STOP_WIDTH), -1, np.int32), np.full((rows,), _NO_LIMIT, np.int32)),
                        np.zeros((rows,), np.int32), np.zeros((rows, 2), np.uint32))
    self._device: _Table | None = None  # the host table's copy, None once a setting changed
    self.uploads = 0

  @property
  def stop_ids(self) -> np.ndarray:
    return self._host.sampling.stop_ids

  def set(self, row: int, g: GenerationConfig, seed: int) -> None:
    """The row takes a new request's settings; greedy rows skip the warpers, as `Sampler.of` does."""
    s, sample = self._host.sampling, not g.greedy
    s.do_sample[row] = sample
    s.temperature[row], s.top_k[row], s.top_p[row] = \
        (g.temperature, min(g.top_k, _NO_LIMIT), g.top_p) if sample else (1.0, 0, 1.0)
    stops = g.stop_ids
    if len(stops) > s.stop_ids.shape[1]:  # widened for good: one more program per width, never per value
      wider = np.full((len(s.stop_ids), Buckets.count(len(stops))), -1, np.int32)
      wider[:, :s.stop_ids.shape[1]] = s.stop_ids
      self._host = self._host._replace(sampling=s._replace(stop_ids=wider))
      s = self._host.sampling
    s.stop_ids[row] = -1
    s.stop_ids[row, :len(stops)] = [min(i, _NO_LIMIT) for i in stops]
    s.vocab_limit[row] = _NO_LIMIT if g.vocab_limit is None else min(g.vocab_limit, _NO_LIMIT)
    self._host.min_new[row] = g.min_new_tokens
    self._host.key_data[row] = jax.random.key_data(jax.random.key(seed))
    self._device = None

  def clear(self, row: int) -> None:
    """A freed row: greedy, so that a step of greedy rows alone draws nothing for it (and looks among no
    more candidates than the others need)."""
    self._host.sampling.do_sample[row] = False
    self._host.sampling.top_k[row] = 0
    self._device = None

  def _width(self, rows, vocab: int) -> int:
    s = self._host.sampling
    return candidate_width(s.top_k[rows][s.do_sample[rows]], vocab)

  def choose(self, logits: jax.Array, rows: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The next token [n] of each of `rows` [n] from their logits [n, v], each the steps[i]-th new token
    of its row (n a power of two; a row may repeat as padding): a prefill's first tokens."""
    table = jax.tree.map(lambda x: x[rows], self._host)
    return np.asarray(_choose(logits, table, steps.astype(np.int32),
                              candidates=self._width(rows, logits.shape[-1])))

  def choose_step(self, logits: jax.Array, rows: RowState) -> tuple[jax.Array, RowState]:
    """The next token [n] of the first n = len(logits) rows from their logits [n, v] at a decode step,
    and `rows` advanced past them; on the device, the settings copied there first if they changed."""
    if self._device is None:
      self._device = jax.device_put(self._host)
      self.uploads += 1
    n = logits.shape[0]
    return _choose_step(logits, self._device, rows, candidates=self._width(slice(0, n), logits.shape[-1]))
