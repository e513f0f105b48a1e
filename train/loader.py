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
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from qwenvl_jax.preprocess import resize_rgb
from train.data import Batch, Encoder, Example, truncate
from train.packed import RecordSource
from train.rows import first_fit

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
  samples_per_row: int = 1  # sequence packing (train/rows.py): batch_size / samples_per_row rows a batch

  @property
  def rows(self) -> int:
    """Rows of a global batch."""
    return self.batch_size // self.samples_per_row

  @property
  def image_slots(self) -> int:
    """Image slots of a row (its samples' images in order, zeros after them)."""
    return self.max_images * self.samples_per_row


def round_up(n: int, step: int) -> int:
  return max(step, int(math.ceil(n / step)) * step)


Sample = tuple[int, Example | None, str]  # (record index, example, why it is unusable); None: in no row
Row = list[Sample]


class Batches:
  """Global batch k -> (this process's rows, their metadata); picklable, as it runs in grain workers.

  A row holds one sample, or several with sequence packing (cfg.samples_per_row > 1, train/rows.py)."""

  def __init__(self, source: RecordSource, encoder: Encoder, cfg: LoaderConfig, rows: slice):
    self.source, self.encoder, self.cfg, self.rows = source, encoder, cfg, rows
    self.batches_per_epoch = len(source) // cfg.batch_size
    self._window: tuple[tuple[int, int], list[list[Row]]] | None = None

  def __getstate__(self):
    return {**self.__dict__, '_window': None}

  def __call__(self, k: int) -> dict[str, Any]:
    epoch, b = divmod(int(k), self.batches_per_epoch)
    w, j = divmod(b, self.cfg.window)
    return self._collate(k, self._window_batches(epoch, w)[j])

  def _window_batches(self, epoch: int, w: int) -> list[list[Row]]:
    if self._window is not None and self._window[0] == (epoch, w):
      return self._window[1]
    c = self.cfg
    perm = np.random.default_rng([c.seed, epoch]).permutation(len(self.source))
    lo = w * c.window * c.batch_size
    hi = min(lo + c.window * c.batch_size, self.batches_per_epoch * c.batch_size)
    indices = [int(i) for i in perm[lo:hi]]
    examples = [(i, *self._encode(r)) for i, r in zip(indices, self.source.records(indices))]
    rows = self._rows(examples)
    batches = [rows[j:j + c.rows] for j in range(0, len(rows), c.rows)]
    shuffle = np.random.default_rng([c.seed, epoch, w, 1]).permutation(len(batches))
    batches = [batches[i] for i in shuffle]
    self._window = ((epoch, w), batches)
    return batches

  def _rows(self, examples: list[Sample]) -> list[Row]:
    """The window's rows: one sample each in length order, or packed (train/rows.py)."""
    c, lengths = self.cfg, [len(e.ids) for _, e, _ in examples]
    if c.samples_per_row == 1:
      return [[examples[i]] for i in np.argsort(lengths, kind='stable')]
    n_rows = len(examples) // c.samples_per_row
    placed, left = first_fit(lengths, [len(e.images) for _, e, _ in examples], n_rows, c.seq_buckets[-1],
                             c.image_slots)
    rows = [[examples[i] for i in row] for row in placed]
    for j, i in enumerate(left):  # reported by the process owning the row, placed nowhere
      rows[j % n_rows].append((examples[i][0], None, examples[i][2] or (
          f'{lengths[i]} tokens find no room in the {n_rows} rows of {c.seq_buckets[-1]} tokens of their '
          f'window (samples_per_row={c.samples_per_row} is too many for these samples: lower it)')))
    return rows

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

  def _collate(self, k: int, rows: list[Row]) -> dict[str, Any]:
    c = self.cfg
    placed = [[(i, ex, reason) for i, ex, reason in row if ex is not None] for row in rows]
    longest = max(sum(len(ex.ids) for _, ex, _ in row) for row in placed)
    t = next(b for b in c.seq_buckets if b >= longest)
    n = min(t, round_up(max(sum(int(ex.target[1:].sum()) for _, ex, _ in row) for row in placed),
                        c.target_step))
    mine = rows[self.rows]
    batch = {
        'input_ids': np.full((len(mine), t), self.encoder.tok.eod_id, np.int32),
        'attention_mask': np.zeros((len(mine), t), np.int32),  # the sample of each token, from 1; 0: padding
        'targets': np.zeros((len(mine), n), np.int32),
        'target_mask': np.zeros((len(mine), n), np.float32),
        'pixel_values': np.zeros((len(mine), c.image_slots, c.image_size, c.image_size, 3), np.uint8),
    }
    bad = []
    for r, row in enumerate(mine):
      at = slot = targets = 0
      for segment, (i, ex, reason) in enumerate(row, 1):
        if ex is not None and not reason:
          try:
            pixels = [resize_rgb(self.source.image(i, path), c.image_size) for path in ex.images]
          except (ValueError, OSError) as e:
            reason, ex = str(e), self._blank()
          else:
            batch['pixel_values'][r, slot:slot + len(pixels)] = pixels
            slot += len(pixels)
        if reason:
          bad.append({'batch': int(k), 'record': self.source.where(i), 'reason': reason})
        if ex is None:
          continue
        batch['input_ids'][r, at:at + len(ex.ids)] = ex.ids
        batch['attention_mask'][r, at:at + len(ex.ids)] = segment
        positions = at + np.flatnonzero(ex.target[1:])  # predicting token p+1 from position p
        batch['targets'][r, targets:targets + len(positions)] = positions
        batch['target_mask'][r, targets:targets + len(positions)] = 1.0
        at, targets = at + len(ex.ids), targets + len(positions)
    meta = {'truncated': sum(ex.truncated for row in placed for _, ex, _ in row), 'bad': bad}
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
    self.records_per_epoch = self.batches_per_epoch * cfg.batch_size
    self.next_batch = 0
    self.bad = [0, 0]  # [epoch, bad records in it, all processes' rows]: every process decides alike
    # Sums a count over the processes; iterating calls it once per batch on every process.
    self.gather: Callable[[int], int] = (lambda n: n) if process_count == 1 else sum_over_processes
    self.skipped_file: str | os.PathLike | None = None  # where skipped records are appended
    self._listed: set[str] = set()  # skipped records a stopped run listed from the resumed batch on
    self.last_truncated = 0  # truncated samples in the batch `__iter__` yielded last (all processes' rows)
    self.last_skipped = 0  # bad records skipped in that batch (all processes' rows, as the metrics count them)

  def state(self) -> dict[str, Any]:
    return {'next_batch': self.next_batch, 'seed': self.cfg.seed, 'records': len(self.source),
            'batch_size': self.cfg.batch_size, 'samples_per_row': self.cfg.samples_per_row,
            'bad': list(self.bad)}

  def restore(self, state: Mapping[str, Any]) -> None:
    mine = self.state()
    for key in ('seed', 'records', 'batch_size', 'samples_per_row'):
      if state.get(key, 1 if key == 'samples_per_row' else None) != mine[key]:  # 1: saved before packing
        raise ValueError(f'cannot resume the data order: the checkpoint has {key}={state.get(key)}, '
                         f'this run has {key}={mine[key]}')
    self.next_batch = int(state['next_batch'])
    self.bad = list(state.get('bad', [0, 0]))
    self._listed = self._listed_from(self.next_batch)

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
    """The batch, or ValueError for its bad records. While iterating (`log`), the decision rests on the
    count over all processes, so that all of them stop together (one stopping alone would leave the
    others waiting in the step's collectives)."""
    meta = json.loads(element['meta'])
    bad = meta['bad']
    total = self.gather(len(bad)) if log else len(bad)
    if total and self.cfg.on_bad_record == 'error':
      where = (f'{bad[0]["record"]}: {bad[0]["reason"]}' if bad else
               f'{total} bad record(s) in batch {self.next_batch} of other processes (their logs name them)')
      raise ValueError(f'{where} (on_bad_record=error; on_bad_record=skip leaves such records out, listed '
                       'in skipped.jsonl)')
    if log:
      self._count(bad, total)
    self.last_truncated, self.last_skipped = meta['truncated'], total
    return element['batch']

  def _count(self, bad: list[dict], total: int) -> None:
    epoch = self.next_batch // self.batches_per_epoch
    if self.bad[0] != epoch:
      self.bad = [epoch, 0]
    self.bad[1] += total
    new = [b for b in bad if json.dumps(b, sort_keys=True) not in self._listed]
    if new and self.skipped_file:
      with open(self.skipped_file, 'a', encoding='utf-8') as f:
        f.writelines(json.dumps(b) + '\n' for b in new)
    if self.bad[1] > self.cfg.max_bad_fraction * self.records_per_epoch:
      last = f' (last here: {bad[-1]["record"]}: {bad[-1]["reason"]})' if bad else ''
      raise ValueError(f'{self.bad[1]} bad records in epoch {epoch} of {self.source.name}, over '
                       f'max_bad_fraction={self.cfg.max_bad_fraction} of its {self.records_per_epoch} '
                       f'records{last}')


def sum_over_processes(n: int) -> int:
  """n summed over the JAX processes (a collective: every process calls it alike)."""
  from jax.experimental import multihost_utils
  return int(np.asarray(multihost_utils.process_allgather(np.int32(n))).sum())
