"""The epoch order of the loader: a keyed bijection of [0, n), evaluated at the positions a window asks for.

`np.random.permutation(n)` per epoch would hold n int64 (11 GB at stage 1's 1.4B records) in every worker
of every process; this index shuffle costs O(positions asked for), whatever n. It is a balanced Feistel
network on the 2h bits of the smallest 4**h >= n (8 rounds of the splitmix64 finaliser, keyed by numpy's
SeedSequence of the key), restricted to [0, n) by cycle walking: a value that lands at or past n is
encrypted again until it lands inside, which keeps the map a bijection of [0, n) (fewer than 4 walks on
average, as 4**h < 4n). Pure uint64 arithmetic: the same order on every machine and in every process.

Ours rather than grain's `index_shuffle` (a scalar call per index, 4 rounds): the order is part of a run's
resume contract (the loader state names it, `SCHEME`), so its definition must not move with a library.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SCHEME = 'feistel-v1'  # the loader state records it: a resumed run continues the order it began with
ROUNDS = 8
_M1, _M2 = np.uint64(0xbf58476d1ce4e5b9), np.uint64(0x94d049bb133111eb)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser (wrapping uint64 arithmetic)."""
  x = (x ^ (x >> np.uint64(30))) * _M1
  x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def index_shuffle(positions: np.ndarray | Sequence[int], n: int, key: Sequence[int]) -> np.ndarray:
  """The records (int64) at `positions` of the order of [0, n) keyed by `key` (e.g. (seed, epoch))."""
  if n < 1:
    raise ValueError(f'index_shuffle needs n >= 1, got {n}')
  x = np.asarray(positions, np.int64)
  if x.size and (x.min() < 0 or x.max() >= n):
    raise ValueError(f'positions must lie in [0, {n})')
  half = max(1, (int(n - 1).bit_length() + 1) // 2)
  mask = np.uint64((1 << half) - 1)
  keys = np.random.SeedSequence([int(k) for k in key]).generate_state(ROUNDS, np.uint64)

  def encrypt(v: np.ndarray) -> np.ndarray:
    left, right = v >> np.uint64(half), v & mask
    for k in keys:
      left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << np.uint64(half)) | right

  with np.errstate(over='ignore'):
    y = encrypt(x.astype(np.uint64))
    outside = np.flatnonzero(y >= np.uint64(n))
    while outside.size:  # cycle walking: finite, as the network permutes [0, 4**half)
      y[outside] = encrypt(y[outside])
      outside = outside[y[outside] >= np.uint64(n)]
  return y.astype(np.int64)
