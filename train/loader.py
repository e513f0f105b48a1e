"""The training loader: a grain pipeline of global batch indices, each turned into this process's rows.

Batch k is made by train/batches.py, whatever the source (a JSON/JSONL file's records or a packed
directory, train/packed.py): each epoch's order is an index shuffle of the records keyed by (seed, epoch),
computed for the positions a window reads (nothing of the size of the dataset); each window of `window`
batches is sorted by length (or packed, carrying samples without room into the next window), cut into
batches, and the batches of the window shuffled. Every process computes the same global batch shape (it
reads the texts of the whole window), but reads and decodes the images of its own rows only: the
processes' rows are disjoint and together cover the epoch's records once. Decoding, resizing and tokenizing
run in `worker_count` grain worker processes (0: a background thread), batches ahead of the step; pixels
leave as uint8, normalised on the device (train/step.py).

The state is the index of the next batch and the start of its window (what packing carries into it):
restarting the pipeline there gives exactly the next batch, with any worker_count (grain's own
multi-worker state would tie a resume to the same worker count). It names the order's scheme: a run saved
before it continues its old order to the end of that epoch (train/batches.py).

Bad records: those found while building a window (malformed, overlong with on_overlong=skip, nothing to
train on) are known to every process alike, so the stop decisions on them need no collective and come at
their batch. Images that fail to decode are known to the process reading them only: their counts are summed
over the processes every `window` batches (batches k with (k + 1) % window == 0, on every process alike),
not at every step, and the decision on them (on_bad_record=error, max_bad_fraction) comes there: the run
stops up to `window` - 1 batches after such a record, trained without it meanwhile.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from train.batches import Batches, Start
from train.loader_config import LoaderConfig  # noqa: F401  (its home for the loader's users)
from train.data import Batch, Encoder
from train.packed import RecordSource
from train.shuffle import SCHEME

ON_BAD_RECORD = ('error', 'skip')
_END = 2 ** 50  # batch indices run on until the run stops reading


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
    if cfg.samples_per_row < 1 or cfg.batch_size % cfg.samples_per_row:
      raise ValueError(f'batch_size {cfg.batch_size} is not a multiple of samples_per_row '
                       f'{cfg.samples_per_row}')
    if cfg.rows % process_count:
      raise ValueError(f'the {cfg.rows} rows of a batch (batch_size {cfg.batch_size} / samples_per_row '
                       f'{cfg.samples_per_row}) are not divisible by the {process_count} processes')
    if len(source) < cfg.batch_size:
      raise ValueError(f'{source.name} has {len(source)} usable records, fewer than one batch of '
                       f'{cfg.batch_size}')
    if cfg.on_bad_record not in ON_BAD_RECORD:
      raise ValueError(f'on_bad_record must be one of {ON_BAD_RECORD}, got {cfg.on_bad_record!r}')
    self.source, self.encoder, self.cfg = source, encoder, cfg
    rows = slice(process_index * cfg.rows // process_count, (process_index + 1) * cfg.rows // process_count)
    self.make = Batches(source, encoder, cfg, rows)
    self.batches_per_epoch = self.make.batches_per_epoch
    self.records_per_epoch = self.make.records_per_epoch
    self.next_batch = 0
    self.start = self.make.start  # of the window of next_batch, or of one before it (see state)
    self.bad = [0, 0]  # [epoch, bad records in it, all processes' rows]: every process decides alike
    # Sums a count over the processes: a collective, called on every process every `sync_every` batches.
    self.gather: Callable[[int], int] = (lambda n: n) if process_count == 1 else sum_over_processes
    self.sync_every = 1 if process_count == 1 else cfg.window
    self._pending: list = [0, None]  # image failures here since the last sum, and the first of them
    self.skipped_file: str | os.PathLike | None = None  # where skipped records are appended
    self._listed: set[str] = set()  # skipped records a stopped run listed from the resumed batch on
    self.last_truncated = 0  # truncated samples in the batch `__iter__` yielded last (all processes' rows)
    self.last_skipped = 0  # bad records skipped in that batch (all processes' rows, as the metrics count them)

  def state(self) -> dict[str, Any]:
    """JSON: the next batch, the start of its window or of an earlier one (a resume builds the windows
    from there), the order's scheme, the batch before which the order of an older run applies."""
    return {'next_batch': self.next_batch, 'seed': self.cfg.seed, 'records': len(self.source),
            'batch_size': self.cfg.batch_size, 'samples_per_row': self.cfg.samples_per_row,
            'bad': list(self.bad), 'order': SCHEME, 'window': self.start.to_json(),
            'legacy_until': self.make.legacy_until}

  def restore(self, state: Mapping[str, Any]) -> None:
    mine = self.state()
    for key in ('seed', 'records', 'batch_size', 'samples_per_row'):
      if state.get(key, 1 if key == 'samples_per_row' else None) != mine[key]:  # 1: saved before packing
        raise ValueError(f'cannot resume the data order: the checkpoint has {key}={state.get(key)}, '
                         f'this run has {key}={mine[key]}')
    if state.get('order', SCHEME) != SCHEME:
      raise ValueError(f'cannot resume the data order: the checkpoint\'s order is {state["order"]!r}, this '
                       f'version reads {SCHEME!r} and the order before it; resume with the version that '
                       'wrote the checkpoint')
    self.next_batch = k = int(state['next_batch'])
    if 'order' in state:
      start, legacy_until = Start.from_json(state['window']), int(state['legacy_until'])
    else:  # saved before the index shuffle: its old order to the end of this epoch, the new one after
      legacy_until = -(-k // self.batches_per_epoch) * self.batches_per_epoch
      start = Start(legacy_until, legacy_until // self.batches_per_epoch * self.records_per_epoch)
    self.make.begin(start, legacy_until)
    self.start = start
    self.bad = list(state.get('bad', [0, 0]))
    self._listed = self._listed_from(k)

  def _listed_from(self, k: int) -> set[str]:
    """The skipped.jsonl entries of batches k.. : the stopped run read them after its last checkpoint (or
    stopped in batch k), and the resumed run reads them again; they are not listed twice."""
    if not self.skipped_file or not os.path.exists(self.skipped_file):
      return set()
    listed = set()
    with open(self.skipped_file, encoding='utf-8') as f:
      for line in f:
        try:
          entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
          continue
        if isinstance(entry, dict) and isinstance(entry.get('batch'), int) and entry['batch'] >= k:
          listed.add(json.dumps(entry, sort_keys=True))
    return listed

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
    """The batch, or ValueError for its bad records. While iterating (`log`), every process decides alike:
    on the records found bad while building the window at their batch, on image failures where their
    counts are summed (module doc), so that all of them stop together (one stopping alone would leave the
    others waiting in the step's collectives)."""
    meta = json.loads(element['meta'])
    bad, failed, shared = meta['bad'], meta['failed'], meta['shared']
    error = self.cfg.on_bad_record == 'error'
    if not log:  # this process's rows only
      if error and (bad or failed):
        self._stop((bad + failed)[0], 0, '')
      self.last_truncated, self.last_skipped = meta['truncated'], len(bad) + len(failed)
      return element['batch']
    if meta['start'] is not None:
      self.start = Start.from_json(meta['start'])
    if error and shared:
      self._stop(bad[0] if bad else None, shared, f'in batch {self.next_batch} of other processes')
    self._log(bad + failed)
    self._pending = [self._pending[0] + len(failed), self._pending[1] or (failed[0] if failed else None)]
    total = shared
    if (self.next_batch + 1) % self.sync_every == 0:
      n, first = self.gather(self._pending[0]), self._pending[1]
      self._pending = [0, None]
      if error and n:
        self._stop(first, n, f'whose images failed in batches up to {self.next_batch} on other processes')
      total += n
    self._count(meta['epoch'], total, bad + failed)
    self.last_truncated, self.last_skipped = meta['truncated'], total
    return element['batch']

  @staticmethod
  def _stop(first: dict | None, n: int, elsewhere: str) -> None:
    where = f'{first["record"]}: {first["reason"]}' if first else \
        f'{n} bad record(s) {elsewhere} (their logs name them)'
    raise ValueError(f'{where} (on_bad_record=error; on_bad_record=skip leaves such records out, listed '
                     'in skipped.jsonl)')

  def _log(self, bad: list[dict]) -> None:
    new = [b for b in bad if json.dumps(b, sort_keys=True) not in self._listed]
    if new and self.skipped_file:
      with open(self.skipped_file, 'a', encoding='utf-8') as f:
        f.writelines(json.dumps(b) + '\n' for b in new)

  def _count(self, epoch: int, n: int, bad: list[dict]) -> None:
    if self.bad[0] != epoch:
      self.bad = [epoch, 0]
    self.bad[1] += n
    if self.bad[1] > self.cfg.max_bad_fraction * self.records_per_epoch:
      last = f' (last here: {bad[-1]["record"]}: {bad[-1]["reason"]})' if bad else ''
      raise ValueError(f'{self.bad[1]} bad records in epoch {epoch} of {self.source.name}, over '
                       f'max_bad_fraction={self.cfg.max_bad_fraction} of its {self.records_per_epoch} '
                       f'records{last}')


def sum_over_processes(n: int) -> int:
  """n summed over the JAX processes (a collective: every process calls it alike)."""
  from jax.experimental import multihost_utils
  return int(np.asarray(multihost_utils.process_allgather(np.int32(n))).sum())
