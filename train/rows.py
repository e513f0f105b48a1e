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
  tokens and max_images images; longest samples first (ties in index order), each into the first row with
  room."""
  lengths, images = np.asarray(lengths, np.int64), np.asarray(images, np.int64)
  room = np.full(rows, max_tokens, np.int64)
  image_room = np.full(rows, max_images, np.int64)
  out: list[list[int]] = [[] for _ in range(rows)]
  left = []
  for i in np.argsort(-lengths, kind='stable'):
    fits = np.flatnonzero((room >= lengths[i]) & (image_room >= images[i]))
    if not fits.size:
      left.append(int(i))
      continue
    r = fits[0]
    out[r].append(int(i))
    room[r] -= lengths[i]
    image_room[r] -= images[i]
  return out, left
