"""The loader's settings: its own module, read by the loader and by the windows it builds (train/batches.py)."""
from __future__ import annotations

import dataclasses


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
