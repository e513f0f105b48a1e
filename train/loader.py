"""The training loader: a grain pipeline of global batch indices, each turned into this process's rows.

Batch k is a pure function of (seed, k), whatever the source (a JSON/JSONL file's records or a packed
directory, train/packed.py): epoch e = k // batches_per_epoch shuffles the records with seed (seed, e);
each window of `window` batches is sorted by length, cut into batches, and the batches of the window
shuffled. Every process computes the same global batch shape (it reads the texts of the whole window),
but reads and decodes the images of its own rows only: the processes' rows are disjoint and together
cover the epoch's records once. Decoding, resizing and tokenizing run in `worker_count` grain worker
processes (0: a background thread), batches ahead of the step; pixels leave as uint8, normalised on the
device (train/step.py).

The state is the index of the next batch: restarting the pipeline there gives exactly the next batch,
with any worker_count (grain's own multi-worker state would tie a resume to the same worker count).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator, Mapping

import numpy as np

from qwenvl_jax.preprocess import resize_rgb
from train.data import Batch, Encoder, Example, truncate
from train.packed import RecordSource

ON_BAD_RECORD = ('error', 'skip')
_END = 2 ** 50  # batch indices run on until the run stops reading


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  batch_size: int  # global
  seq_buckets: tuple[int, ...]
  target_step: int
  max_images: int
  image_size: int
  seed: int
  window: int = 8  # batches sorted by length together
  worker_count: int = 0  # grain worker processes decoding images; 0: a thread of the training process
  on_bad_record: str = 'error'  # a record that fails when its batch is made: 'error' stops, 'skip' blanks it
  max_bad_fraction: float = 0.001  # with 'skip': more bad records than this fraction of an epoch stop the run
  on_overlong: str = 'truncate'  # for records not checked up front (packed): 'truncate', 'skip', 'error'


def round_up(n: int, step: int) -> int:
  return max(step, int(math.ceil(n / step)) * step)


class Batches:
  """Global batch k -> (this process's rows, their metadata); picklable, as it runs in grain workers."""

  def __init__(self, source: RecordSource, encoder: Encoder, cfg: LoaderConfig, rows: slice):
    self.source, self.encoder, self.cfg, self.rows = source, encoder, cfg, rows
    self.batches_per_epoch = len(source) // cfg.batch_size
    self._window: tuple[tuple[int, int], list[list[tuple[int, Example, str]]]] | None = None

  def __getstate__(self):
    return {**self.__dict__, '_window': None}

  def __call__(self, k: int) -> dict[str, Any]:
    epoch, b = divmod(int(k), self.batches_per_epoch)
    w, j = divmod(b, self.cfg.window)
    return self._collate(k, self._window_batches(epoch, w)[j])

  def _window_batches(self, epoch: int, w: int) -> list[list[tuple[int, Example, str]]]:
    if self._window is not None and self._window[0] == (epoch, w):
      return self._window[1]
    c = self.cfg
    perm = np.random.default_rng([c.seed, epoch]).permutation(len(self.source))
    lo = w * c.window * c.batch_size
    hi = min(lo + c.window * c.batch_size, self.batches_per_epoch * c.batch_size)
    indices = [int(i) for i in perm[lo:hi]]
    examples = [(i, *self._encode(r)) for i, r in zip(indices, self.source.records(indices))]
    order = np.argsort([len(e.ids) for _, e, _ in examples], kind='stable')
    batches = [[examples[i] for i in chunk] for chunk in order.reshape(-1, c.batch_size)]
    shuffle = np.random.default_rng([c.seed, epoch, w, 1]).permutation(len(batches))
    batches = [batches[i] for i in shuffle]
    self._window = ((epoch, w), batches)
    return batches

  def _encode(self, record: Any) -> tuple[Example, str]:
    """(the example, '') or (a blank, why the record cannot be used); every process decides alike."""
    tok, max_len = self.encoder.tok, self.cfg.seq_buckets[-1]
    try:
      ex = self.encoder(record)
    except (ValueError, TypeError, KeyError) as e:
      return self._blank(), str(e)
    if len(ex.ids) > max_len and self.cfg.on_overlong != 'truncate':
      return self._blank(), f'{len(ex.ids)} tokens, over the longest bucket ({max_len}) (on_overlong=' \
                            f'{self.cfg.on_overlong})'
    cut = truncate(ex, max_len, tok.img_start_id, tok.img_end_id)
    if not cut.target[1:].any():
      return self._blank(), 'no token to train on' + (' after truncation' if cut.truncated else '')
    return cut, ''

  def _blank(self) -> Example:
    return Example(np.asarray([self.encoder.tok.eod_id], np.int32), np.zeros(1, bool), ())

  def _collate(self, k: int, examples: list[tuple[int, Example, str]]) -> dict[str, Any]:
    c = self.cfg
    longest = max(len(e.ids) for _, e, _ in examples)
    t = next(b for b in c.seq_buckets if b >= longest)
    n = min(t, round_up(max(int(e.target[1:].sum()) for _, e, _ in examples), c.target_step))
    mine = examples[self.rows]
    rows = len(mine)
    batch = {
        'input_ids': np.full((rows, t), self.encoder.tok.eod_id, np.int32),
        'attention_mask': np.zeros((rows, t), np.int32),
        'targets': np.zeros((rows, n), np.int32),
        'target_mask': np.zeros((rows, n), np.float32),
        'pixel_values': np.zeros((rows, c.max_images, c.image_size, c.image_size, 3), np.uint8),
    }
    bad = []
    for r, (i, ex, reason) in enumerate(mine):
      if not reason:
        try:
          for slot, path in enumerate(ex.images):
            batch['pixel_values'][r, slot] = resize_rgb(self.source.image(i, path), c.image_size)
        except (ValueError, OSError) as e:
          batch['pixel_values'][r] = 0
          reason, ex = str(e), self._blank()
      if reason:
        bad.append({'batch': int(k), 'record': self.source.where(i), 'reason': reason})
      batch['input_ids'][r, :len(ex.ids)] = ex.ids
      batch['attention_mask'][r, :len(ex.ids)] = 1
      positions = np.flatnonzero(ex.target[1:])  # predicting token p+1 from position p
      batch['targets'][r, :len(positions)] = positions
      batch['target_mask'][r, :len(positions)] = 1.0
    meta = {'truncated': sum(e.truncated for _, e, _ in examples), 'bad': bad}
    return {'batch': batch, 'meta': json.dumps(meta)}


def _grain():
  import grain
  from absl import flags
  if not flags.FLAGS.is_parsed():  # grain reads absl flags that a program without absl never parses
    flags.FLAGS.mark_as_parsed()
  return grain


class Loader:
  """Deterministic, resumable, per-process sharded batches with length bucketing (see the module doc)."""

  def __init__(self, source: RecordSource, encoder: Encoder, cfg: LoaderConfig, process_index: int = 0,
               process_count: int = 1):
    if cfg.batch_size % process_count:
      raise ValueError(f'batch_size {cfg.batch_size} is not divisible by the {process_count} processes')
    if len(source) < cfg.batch_size:
      raise ValueError(f'{source.name} has {len(source)} usable records, fewer than one batch of '
                       f'{cfg.batch_size}')
    if cfg.on_bad_record not in ON_BAD_RECORD:
      raise ValueError(f'on_bad_record must be one of {ON_BAD_RECORD}, got {cfg.on_bad_record!r}')
    self.source, self.encoder, self.cfg = source, encoder, cfg
    rows = slice(process_index * cfg.batch_size // process_count,
                 (process_index + 1) * cfg.batch_size // process_count)
    self.make = Batches(source, encoder, cfg, rows)
    self.batches_per_epoch = self.make.batches_per_epoch
    self.rows_per_epoch = self.batches_per_epoch * (rows.stop - rows.start)
    self.next_batch = 0
    self.bad = [0, 0]  # [epoch, bad records of this process's rows in it]
    self.skipped_file: str | os.PathLike | None = None  # where skipped records are appended
    self.last_truncated = 0  # truncated samples in the batch `__iter__` yielded last (all processes' rows)
    self.last_skipped = 0  # bad records skipped in that batch (this process's rows)

  def state(self) -> dict[str, Any]:
    return {'next_batch': self.next_batch, 'seed': self.cfg.seed, 'records': len(self.source),
            'batch_size': self.cfg.batch_size, 'bad': list(self.bad)}

  def restore(self, state: Mapping[str, Any]) -> None:
    mine = self.state()
    for key in ('seed', 'records', 'batch_size'):
      if state.get(key) != mine[key]:
        raise ValueError(f'cannot resume the data order: the checkpoint has {key}={state.get(key)}, '
                         f'this run has {key}={mine[key]}')
    self.next_batch = int(state['next_batch'])
    self.bad = list(state.get('bad', [0, 0]))

  def batch(self, k: int) -> Batch:
    """Global batch k, this process's rows (bad records handled as by iteration, without the log)."""
    return self._take(self.make(k), log=False)

  def __iter__(self) -> Iterator[Batch]:
    """Batches from next_batch on, made ahead of their use by grain (workers or a thread)."""
    grain = _grain()
    ds = grain.MapDataset.range(self.next_batch, _END).map(self.make)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if self.cfg.worker_count:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.worker_count,
                                                       per_worker_buffer_size=2))
    it = iter(ds)
    try:
      for element in it:
        batch = self._take(element, log=True)
        self.next_batch += 1
        yield batch
    finally:
      it.close()

  def _take(self, element: Mapping[str, Any], log: bool) -> Batch:
    meta = json.loads(element['meta'])
    bad = meta['bad']
    if bad and self.cfg.on_bad_record == 'error':
      b = bad[0]
      raise ValueError(f'{b["record"]}: {b["reason"]} (on_bad_record=error; on_bad_record=skip leaves such '
                       'records out, listed in skipped.jsonl)')
    if log:
      self._count(bad)
    self.last_truncated, self.last_skipped = meta['truncated'], len(bad)
    return element['batch']

  def _count(self, bad: list[dict]) -> None:
    epoch = self.next_batch // self.batches_per_epoch
    if self.bad[0] != epoch:
      self.bad = [epoch, 0]
    self.bad[1] += len(bad)
    if bad and self.skipped_file:
      with open(self.skipped_file, 'a', encoding='utf-8') as f:
        f.writelines(json.dumps(b) + '\n' for b in bad)
    allowed = self.cfg.max_bad_fraction * self.rows_per_epoch
    if self.bad[1] > allowed:
      raise ValueError(f'{self.bad[1]} bad records in epoch {epoch} of {self.source.name}, over '
                       f'max_bad_fraction={self.cfg.max_bad_fraction} of its {self.rows_per_epoch} records '
                       f'here (last: {bad[-1]["record"]}: {bad[-1]["reason"]})')
