"""Sequence packing: a window's samples placed into a fixed number of rows (first-fit decreasing).

With `samples_per_row` P > 1 a batch of B samples travels as B / P rows: stage 1's samples are an image
span and a caption of ~20 tokens, so one sample per row of a bucket leaves most of it padding. The loader
(train/loader.py) packs each window of `bucket_window` batches at once: its samples go, longest first, into
the first of the window's rows with room for their tokens (the longest bucket) and images (P x
max_images slots per row); the rows are then cut into batches in order (so the fullest rows travel
together, and a window's last, emptier rows pick a shorter bucket).

A window's rows are fixed (its `bucket_window` batches of B / P rows), its sample count is not: samples
that find no room (first-fit leaves some room unused, so at P near row length / mean sample length a few
percent do) are carried into the next window, placed there before its own samples, and the next window
takes that many fewer new samples from the epoch's order. Nothing is dropped or counted as a bad record;
a batch then holds somewhat fewer than B samples. The carry makes window w depend on the windows before
it: the loader state holds the start of the current window (its first position in the order and the
records carried into it), from which a resume recomputes it exactly.

Grain's own packers (FirstFitPackIterDataset) work on a stream: the batch they make depends on everything
before it in the process's stream (a resume needs grain's iterator state, tied to the worker count) and
on the process count; they would also pack after decoding, where each process decodes only its own rows'
images. Hence this small packer over the loader's windows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def first_fit(lengths: Sequence[int], images: Sequence[int], rows: int, max_tokens: int,
              max_images: int, first: int = 0) -> tuple[list[list[int]], list[int]]:
  """(sample indices of each of `rows` rows, indices that fit in none), each row at most max_tokens
  tokens and max_images images: longest samples first (then those with more images; ties in index order),
  each into the first row with room. The samples before index `first` (carried over from the window
  before, oldest first) go before the others: as any sample fits an empty row, all of them are placed when
  they are no more than the rows; when they are more (samples_per_row far too high), oldest first, so that
  none waits forever.

  Samples of one (length, images) size come one after another, and each goes to the first row with room,
  so such a run fills the rows in order, each up to what it can take: one vectorised pass over the rows per
  run of one size (whatever the sizes before it, hence also with the carried samples first). That is at
  most max_tokens x (max_images + 1) passes, plus the carried ones, whatever the window's sample count:
  stage 1's window (250k samples, 35k rows) packs in well under a second instead of a scan of every row
  for every sample.
  """
  lengths, images = np.asarray(lengths, np.int64), np.asarray(images, np.int64)
  index = np.arange(len(lengths))
  fresh = index >= first
  if first > rows:
    order = np.lexsort((index, np.where(fresh, -images, 0), np.where(fresh, -lengths, 0), fresh))  # by age
  else:
    order = np.lexsort((index, -images, -lengths, fresh))
  room = np.full(rows, max_tokens, np.int64)
  image_room = np.full(rows, max_images, np.int64)
  out: list[list[int]] = [[] for _ in range(rows)]
  left: list[int] = []
  sizes = np.stack([lengths[order], images[order]], 1)
  starts = np.flatnonzero(np.r_[True, (sizes[1:] != sizes[:-1]).any(1)]).tolist() + [len(order)]
  for lo, hi in zip(starts[:-1], starts[1:]):
    run, (length, n_images) = order[lo:hi], sizes[lo].tolist()
    can = room // length if length else np.where(room >= 0, len(run), 0)
    if n_images:
      can = np.minimum(can, image_room // n_images)
    before = np.cumsum(can) - can  # the run's samples taken by the rows before each row
    take = np.clip(len(run) - before, 0, can)
    room -= take * length
    image_room -= take * n_images
    placed = 0
    for r in np.flatnonzero(take).tolist():
      out[r].extend(run[placed:placed + take[r]].tolist())
      placed += int(take[r])
    left.extend(run[placed:].tolist())
  return out, left
