"""Packed datasets: records with their encoded image bytes in ArrayRecord shards, and the record sources the
loader reads (a packed directory, or the records of a JSON/JSONL file with loose image files).

A packed directory (written by `qwenvl-data pack`, train/packing.py):
  manifest.json   {"kind": "qwenvl-packed", "version": 1, "data_format", "source", "records",
                   "shards": [{"texts", "images", "records"}], "skipped"}; written last
  texts-NNNNN.array_record    one JSON object a record: {"key": ..., "record": {...}}
  images-NNNNN.array_record   the same records' images: a 4-byte little-endian header length, a JSON header
                              [[name, nbytes], ...] and the bytes of each image as stored in the source
Texts and images are apart so that every process can read the texts of a whole window of batches (to sort
them by length, train/loader.py) while it reads the image bytes of its own rows only.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from qwenvl_jax import jsonfile
from qwenvl_jax.images import ImageLoader

MANIFEST = 'manifest.json'
KIND = 'qwenvl-packed'
VERSION = 1


def encode_images(images: Sequence[tuple[str, bytes]]) -> bytes:
  header = json.dumps([[name, len(data)] for name, data in images]).encode('utf-8')
  return struct.pack('<I', len(header)) + header + b''.join(data for _, data in images)


def decode_images(blob: bytes) -> dict[str, bytes]:
  (n,) = struct.unpack_from('<I', blob)
  out, offset = {}, 4 + n
  for name, size in json.loads(blob[4:4 + n]):
    out[name] = blob[offset:offset + size]
    offset += size
  return out


def is_packed(path: str | os.PathLike) -> bool:
  """A finished packed dataset (its manifest is written last: an interrupted pack has none)."""
  return (pathlib.Path(path) / MANIFEST).is_file()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
  file = pathlib.Path(directory) / MANIFEST
  m = jsonfile.read_object(file)
  if jsonfile.get(m, 'kind', str, file) != KIND or jsonfile.get(m, 'version', int, file) != VERSION:
    raise jsonfile.ConfigFileError(str(file), f'not a packed dataset of kind {KIND!r} version {VERSION}')
  jsonfile.get(m, 'data_format', str, file)
  for i, shard in enumerate(jsonfile.get(m, 'shards', list, file)):
    for key, kind in (('texts', str), ('images', str), ('records', int)):
      jsonfile.get(shard, key, kind, file, prefix=f'shards[{i}].')
  return m


class RecordSource:
  """Random access to training records: the record, its images, and where it is (for messages)."""
  name: str

  def __len__(self) -> int:
    raise NotImplementedError

  def records(self, indices: Sequence[int]) -> list[Any]:
    raise NotImplementedError

  def image(self, i: int, path: str) -> Image.Image:
    """The decoded RGB image `path` of record i; ValueError or OSError naming it when it cannot be read."""
    raise NotImplementedError

  def where(self, i: int) -> str:
    raise NotImplementedError


class ListSource(RecordSource):
  """Checked records of a JSON/JSONL file (train/validate.py), images as files under `root`."""

  def __init__(self, records: Sequence[Any], root: str | os.PathLike, name: str = 'data',
               record_ids: Sequence[int] | None = None, lines: Sequence[int] | None = None):
    self.items, self.name = list(records), name
    self.ids = list(record_ids) if record_ids is not None else list(range(len(self.items)))
    self.lines = lines
    self.loader = ImageLoader(allowed_root=root)

  def __len__(self) -> int:
    return len(self.items)

  def records(self, indices: Sequence[int]) -> list[Any]:
    return [self.items[i] for i in indices]

  def image(self, i: int, path: str) -> Image.Image:
    return self.loader.load(path)

  def where(self, i: int) -> str:
    n = self.ids[i]
    line = f' (line {self.lines[n]})' if self.lines is not None else ''
    return f'{self.name} record {n}{line}'


class PackedSource(RecordSource):
  """The records of a packed directory, shard after shard, read through grain's ArrayRecordDataSource."""

  def __init__(self, directory: str | os.PathLike):
    import grain
    self.directory = pathlib.Path(directory)
    self.name = str(directory)
    self.manifest = read_manifest(directory)
    shards = self.manifest['shards']
    missing = [s[k] for s in shards for k in ('texts', 'images') if not (self.directory / s[k]).is_file()]
    if missing:
      raise FileNotFoundError(f'{directory}: shard file(s) named in {MANIFEST} are missing: {missing[:5]}')
    self.texts = grain.sources.ArrayRecordDataSource([str(self.directory / s['texts']) for s in shards])
    self.blobs = grain.sources.ArrayRecordDataSource([str(self.directory / s['images']) for s in shards])
    self.starts = np.cumsum([0] + [s['records'] for s in shards])
    if self.starts[-1] != len(self.texts) or len(self.texts) != len(self.blobs):
      raise ValueError(f'{directory}: the shards hold {len(self.texts)} records and {len(self.blobs)} image '
                       f'entries, the manifest says {int(self.starts[-1])}: the dataset is damaged, pack it '
                       'again')
    self.loader = ImageLoader()

  def __len__(self) -> int:
    return int(self.starts[-1])

  def records(self, indices: Sequence[int]) -> list[Any]:
    return [json.loads(t)['record'] for t in self.texts.__getitems__(list(indices))]

  def image(self, i: int, path: str) -> Image.Image:
    images = decode_images(self.blobs[i])
    if path not in images:
      raise ValueError(f'image {path!r} is not packed with the record (it holds {sorted(images)})')
    return self.loader.load(images[path])

  def where(self, i: int) -> str:
    s = int(np.searchsorted(self.starts, i, side='right')) - 1
    key = json.loads(self.texts[i]).get('key')
    return f'{self.directory / self.manifest["shards"][s]["texts"]} record {i - self.starts[s]} (key {key})'


def packed_format(manifest: Mapping[str, Any], data_format: str, directory: str) -> None:
  """Refuses a run whose data_format differs from the one the records were packed (and checked) as."""
  if manifest['data_format'] != data_format:
    raise ValueError(f'{directory} is packed as data_format={manifest["data_format"]!r}, this run reads '
                     f'data_format={data_format!r}: set data_format={manifest["data_format"]}')
