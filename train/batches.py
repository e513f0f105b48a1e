"""Global batch k -> this process's rows: the loader's windows (train/loader.py runs them in grain).

The records flow in one stream: position p is record `index_shuffle(p % R, n, (seed, p // R))` of epoch
p // R (train/shuffle.py; n records, R = the epoch's records, whole batches of them). A window's samples are
sorted by length (one a row) or packed (samples_per_row > 1, train/rows.py), cut into batches, and the
batches of the window shuffled. Every process builds the same window (it reads all its texts) but reads and
decodes the images of its own rows only.

One sample a row: window w of epoch e holds its `window` batches' records (the epoch's last window fewer),
from a position computed from (e, w); each epoch's batches hold its records once. Packed: a window always
holds `window` batches of fixed rows, filled with the records carried into it (those without room in the
window before), then the stream's next window x batch_size - carried records (running on into the next
epoch). Each window's start (`Start`: its first batch, stream position and carried records) follows from
the one before, so windows are built in order from a known start: the loader state holds the current one.

Runs saved before this order (the loader state has no 'order') continue the order they began with to the
end of their epoch, `_legacy_window`: a full permutation per epoch (computed once per epoch here) and packed
samples without room reported as bad records. From the next epoch on they take this order.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from qwenvl_jax.preprocess import resize_rgb
from train.data import Encoder, Example, truncate
from train.loader_config import LoaderConfig
from train.packed import RecordSource
from train.rows import first_fit
from train.shuffle import index_shuffle


Sample = tuple[int, Example | None, str]  # (record index, example, why it is unusable); None: in no row
Row = list[Sample]


@dataclasses.dataclass(frozen=True)
class Start:
  """Where a window starts: its first batch, the stream position of its first new record, and the records
  carried into it from the window before."""
  batch: int
  position: int
  carry: tuple[int, ...] = ()

  def to_json(self) -> dict[str, Any]:
    return {'batch': self.batch, 'position': self.position, 'carry': list(self.carry)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'Start':
    return cls(int(d['batch']), int(d['position']), tuple(int(i) for i in d['carry']))


def round_up(n: int, step: int) -> int:
  return max(step, int(-(-n // step)) * step)


class Batches:
  """Global batch k -> {'batch': this process's rows, 'meta': JSON}; picklable, as it runs in grain workers.

  A row holds one sample, or several with sequence packing (cfg.samples_per_row > 1, train/rows.py)."""

  def __init__(self, source: RecordSource, encoder: Encoder, cfg: LoaderConfig, rows: slice):
    self.source, self.encoder, self.cfg, self.rows = source, encoder, cfg, rows
    self.batches_per_epoch = len(source) // cfg.batch_size
    self.records_per_epoch = self.batches_per_epoch * cfg.batch_size
    self.begin(Start(0, 0), 0)

  def begin(self, start: Start, legacy_until: int) -> None:
    """Batches from start.batch on follow `start`; those before `legacy_until`, the order of old runs."""
    self.start, self.legacy_until = start, legacy_until
    self._window: tuple[Start, list[list[Row]], Start] | None = None  # the last built: start, batches, next
    self._legacy: tuple[Any, Any] | None = None  # (epoch, its permutation), (window key, batches)

  def __getstate__(self):
    return {**self.__dict__, '_window': None, '_legacy': None}

  def __call__(self, k: int) -> dict[str, Any]:
    k, c = int(k), self.cfg
    if k < self.legacy_until:
      epoch, b = divmod(k, self.batches_per_epoch)
      w, j = divmod(b, c.window)
      return self._collate(k, self._legacy_window(epoch, w)[j], epoch, None)
    if c.samples_per_row == 1:  # nothing is carried: windows within each epoch, as many records as rows
      epoch, b = divmod(k, self.batches_per_epoch)
      j = b % c.window
      start = Start(k - j, epoch * self.records_per_epoch + (b - j) * c.batch_size)
    else:
      start = self._start_of(k)
      j = k - start.batch
    return self._collate(k, self._built(start)[0][j], start.position // self.records_per_epoch,
                         start if j == 0 else None)

  def _start_of(self, k: int) -> Start:
    """The start of batch k's window (packed rows): windows follow one another from a known start."""
    c = self.cfg
    at = self.start
    if k < at.batch:  # before the resumed window: from the order's first window, where nothing is carried
      epoch = self.legacy_until // self.batches_per_epoch
      at = Start(self.legacy_until, epoch * self.records_per_epoch)
    batch = at.batch + (k - at.batch) // c.window * c.window
    if self._window is not None and at.batch <= self._window[0].batch <= batch:
      at = self._window[0]
    while at.batch < batch:  # the windows in between, built in order for what they carry
      at = self._built(at)[1]
    return at

  def _built(self, start: Start) -> tuple[list[list[Row]], Start]:
    if self._window is None or self._window[0] != start:
      self._window = (start, *self._build(start))
    return self._window[1], self._window[2]

  def _build(self, start: Start) -> tuple[list[list[Row]], Start]:
    """The window's batches and the start of the next window. One sample a row: the window's records, up
    to the epoch's end; packed: the carried records, then new ones up to the window's nominal count (the
    stream runs on into the next epoch)."""
    c = self.cfg
    fresh = c.window * c.batch_size - len(start.carry)
    if c.samples_per_row == 1:
      fresh = min(fresh, self.records_per_epoch - start.position % self.records_per_epoch)
    positions = start.position + np.arange(fresh, dtype=np.int64)
    indices = list(start.carry) + self._records(positions).tolist()
    examples = [(i, *self._encode(r)) for i, r in zip(indices, self.source.records(indices))]
    rows, left = self._rows(examples, len(start.carry))
    batches = [rows[j:j + c.rows] for j in range(0, len(rows), c.rows)]
    shuffle = np.random.default_rng([c.seed, start.batch, 1]).permutation(len(batches))
    nxt = Start(start.batch + c.window, start.position + fresh, tuple(indices[i] for i in sorted(left)))
    return [batches[i] for i in shuffle], nxt

  def _records(self, positions: np.ndarray) -> np.ndarray:
    """The records at stream positions: each epoch's order is an index shuffle of all records."""
    epochs, within = np.divmod(positions, self.records_per_epoch)
    out = np.empty_like(positions)
    for e in np.unique(epochs).tolist():  # a window spans at most two epochs (or a few, on tiny data)
      at = epochs == e
      out[at] = index_shuffle(within[at], len(self.source), (self.cfg.seed, e))
    return out

  def _rows(self, examples: list[Sample], carried: int) -> tuple[list[Row], list[int]]:
    """The window's rows (one sample each in length order, or packed: train/rows.py) and the indices of
    the examples left without room."""
    c, lengths = self.cfg, [len(e.ids) for _, e, _ in examples]
    if c.samples_per_row == 1:
      return [[examples[i]] for i in np.argsort(lengths, kind='stable')], []
    placed, left = first_fit(lengths, [len(e.images) for _, e, _ in examples], c.window * c.rows,
                             c.seq_buckets[-1], c.image_slots, first=carried)
    return [[examples[i] for i in row] for row in placed], left

  def _legacy_window(self, epoch: int, w: int) -> list[list[Row]]:
    """A window of a run begun before the index shuffle, as it made them (see the module doc)."""
    if self._legacy is not None and self._legacy[1][0] == (epoch, w):
      return self._legacy[1][1]
    c = self.cfg
    if self._legacy is None or self._legacy[0][0] != epoch:
      self._legacy = ((epoch, np.random.default_rng([c.seed, epoch]).permutation(len(self.source))), (None, None))
    perm = self._legacy[0][1]
    lo = w * c.window * c.batch_size
    indices = [int(i) for i in perm[lo:min(lo + c.window * c.batch_size, self.records_per_epoch)]]
    examples = [(i, *self._encode(r)) for i, r in zip(indices, self.source.records(indices))]
    n_rows = len(examples) // c.samples_per_row
    rows, left = self._rows(examples, 0) if c.samples_per_row == 1 else self._legacy_rows(examples, n_rows)
    batches = [rows[j:j + c.rows] for j in range(0, len(rows), c.rows)]
    shuffle = np.random.default_rng([c.seed, epoch, w, 1]).permutation(len(batches))
    batches = [batches[i] for i in shuffle]
    self._legacy = (self._legacy[0], ((epoch, w), batches))
    return batches

  def _legacy_rows(self, examples: list[Sample], n_rows: int) -> tuple[list[Row], list[int]]:
    c, lengths = self.cfg, [len(e.ids) for _, e, _ in examples]
    placed, left = first_fit(lengths, [len(e.images) for _, e, _ in examples], n_rows, c.seq_buckets[-1],
                             c.image_slots)
    rows = [[examples[i] for i in row] for row in placed]
    for j, i in enumerate(left):  # the old order reported these as bad records, placed nowhere
      rows[j % n_rows].append((examples[i][0], None, examples[i][2] or (
          f'{lengths[i]} tokens find no room in the {n_rows} rows of {c.seq_buckets[-1]} tokens of their '
          f'window (samples_per_row={c.samples_per_row} is too many for these samples: lower it)')))
    return rows, []

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

  def _collate(self, k: int, rows: list[Row], epoch: int, start: Start | None) -> dict[str, Any]:
    """This process's rows of batch k. Its meta: `bad`, these rows' records found bad while building the
    window, and `shared`, how many such records the whole batch holds (every process counts them alike,
    without a collective); `failed`, these rows' records whose images fail (known to this process only);
    `start`, the window's start, on its first batch."""
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
    bad, failed = [], []
    for r, row in enumerate(mine):
      at = slot = targets = 0
      for segment, (i, ex, reason) in enumerate(row, 1):
        if ex is not None and not reason:
          try:
            pixels = [resize_rgb(self.source.image(i, path), c.image_size) for path in ex.images]
          except (ValueError, OSError) as e:
            ex = self._blank()
            failed.append({'batch': k, 'record': self.source.where(i), 'reason': str(e)})
          else:
            batch['pixel_values'][r, slot:slot + len(pixels)] = pixels
            slot += len(pixels)
        if reason:
          bad.append({'batch': k, 'record': self.source.where(i), 'reason': reason})
        if ex is None:
          continue
        batch['input_ids'][r, at:at + len(ex.ids)] = ex.ids
        batch['attention_mask'][r, at:at + len(ex.ids)] = segment
        positions = at + np.flatnonzero(ex.target[1:])  # predicting token p+1 from position p
        batch['targets'][r, targets:targets + len(positions)] = positions
        batch['target_mask'][r, targets:targets + len(positions)] = 1.0
        at, targets = at + len(ex.ids), targets + len(positions)
    meta = {'truncated': sum(ex.truncated for row in placed for _, ex, _ in row), 'bad': bad,
            'shared': sum(bool(reason) for row in rows for _, _, reason in row), 'failed': failed,
            'epoch': epoch, 'start': start.to_json() if start else None}
    return {'batch': batch, 'meta': json.dumps(meta)}
