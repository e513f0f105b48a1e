"""A run's training data from its config: a packed directory, a JSON/JSONL file, or records given in Python."""
from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

from qwenvl_jax.tokenizer import QwenVLTokenizer
from train.config import TrainConfig
from train.data import Encoder
from train.loader import Loader, LoaderConfig
from train.packed import PackedSource, is_packed, packed_format
from train.run_dir import TrainError
from train.validate import make_loader, read_records


def loader_config(cfg: TrainConfig) -> LoaderConfig:
  return LoaderConfig(cfg.batch_size, cfg.seq_buckets, cfg.target_step, cfg.max_images, cfg.image_size,
                      cfg.seed, cfg.bucket_window, cfg.worker_count, cfg.on_bad_record, cfg.max_bad_fraction,
                      cfg.on_overlong, cfg.samples_per_row)


class PackedReport:
  """What a run says of a packed dataset: its records were checked when packed (`qwenvl-data pack`); the
  ones that fail at training time are handled by on_bad_record."""
  skipped = ()

  def __init__(self, source: PackedSource):
    self.source = source

  def summary(self, max_len: int, skipped_file: str | os.PathLike | None = None) -> str:
    m = self.source.manifest
    return (f'data: {len(self.source)} packed records in {len(m["shards"])} shard(s) of {self.source.name} '
            f'(checked when packed; {m.get("skipped", 0)} left out then); samples over {max_len} tokens: '
            'on_overlong, records that fail to load: on_bad_record')

  def write_skipped(self, path: str | os.PathLike) -> None:
    pass


def open_data(cfg: TrainConfig, tokenizer: QwenVLTokenizer, records: Sequence[Any] | None,
              process_index: int, process_count: int) -> tuple[Loader, Any]:
  """(loader, report): `records` if given, else cfg.data, a packed directory or a .json/.jsonl file (every
  record checked first, train/validate.py)."""
  lc = loader_config(cfg)
  if records is None and cfg.data and is_packed(cfg.data):
    source = PackedSource(cfg.data)
    packed_format(source.manifest, cfg.data_format, cfg.data)
    encoder = Encoder(tokenizer, cfg.data_format, cfg.chat_labels, cfg.max_images)
    return Loader(source, encoder, lc, process_index, process_count), PackedReport(source)
  lines = None
  if records is None:
    if not cfg.data:
      raise TrainError('no training data: set data=<.json or .jsonl file, or a directory packed by '
                       'qwenvl-data pack>')
    if pathlib.Path(cfg.data).is_dir():
      raise TrainError(f'data={cfg.data} is a directory without a finished pack (no manifest.json): '
                       'pack it with qwenvl-data pack (an interrupted pack leaves no manifest)')
    records, lines = read_records(cfg.data)
  root = cfg.data_root or (str(pathlib.Path(cfg.data).resolve().parent) if cfg.data else os.getcwd())
  return make_loader(records, tokenizer, cfg.data_format, cfg.chat_labels, lc, root, process_index,
                     process_count, source=cfg.data or 'records', lines=lines, on_overlong=cfg.on_overlong)
