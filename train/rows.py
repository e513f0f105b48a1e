"""Sequence packing: a window's samples placed into a fixed number of rows (first-fit decreasing).

With `samples_per_row` P > 1 a batch of B samples travels as B / P rows: stage 1's samples are an image
span and a caption of ~20 tokens, so one sample per row of a bucket leaves most of it padding. The loader
(train/loader.py) packs each window of `bucket_window` batches at once: its samples go, longest first, into
the first of the window's rows with room for their tokens (the longest bucket) and images (P x
max_images slots per row); the rows are then cut into batches in order (so the fullest rows travel
together, and a window's last, emptier rows pick a shorter bucket). The window's rows are fixed, so batch
k stays a pure function of (seed, k) and a resume needs nothing but k.

A sample that finds no row (P set too high for these lengths) is not placed; the loader reports it as a
bad record (on_bad_record) with that reason: nothing is dropped silently.

Grain's own packers (FirstFitPackIterDataset) work on a stream: the batch they make depends on everything
before it in the process's stream (a resume needs grain's iterator state, tied to the worker count) and
on the process count; they would also pack after decoding, where each process decodes only its own rows'
images. Hence this small packer over the loader's windows.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def first_fit(lengths: Sequence[int], images: Sequence[int], rows: int, max_tokens: int,
              max_images: int) -> tuple[list[list[int]], list[int]]:
  """(sample indices of each of `rows` rows, indices that fit in none), each row at most max_tokens
  tokens and max_images images: longest samples first (then those with more images; ties in index order),
  each into the first row with room.

  Samples of one (length, images) size come one after another, and each goes to the first row with room,
  so such a run fills the rows in order, each up to what it can take: one vectorised pass over the rows per
  distinct size. That is at most max_tokens x (max_images + 1) passes whatever the window's sample count:
  stage 1's window (250k samples, 35k rows) packs in well under a second instead of a scan of every row
  for every sample.
  """
  lengths, images = np.asarray(lengths, np.int64), np.asarray(images, np.int64)
  order = np.lexsort((np.arange(len(lengths)), -images, -lengths))
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
