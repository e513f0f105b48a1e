"""Reading the released Hugging Face layout: `model.safetensors`, or shards listed by
`model.safetensors.index.json`; older mirrors ship `pytorch_model*.bin` (read only with the `torch` extra).

Tensor names, shapes and dtypes come from the shard headers before any data is read, so a mismatched
checkpoint fails before the slow part.
"""
from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import pathlib
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.jsonfile import ConfigFileError, get, read_object
from qwenvl_jax.layout import BIN_INDEX, SAFETENSORS_INDEX
from qwenvl_jax.params import CheckpointMismatchError, check_names

# safetensors dtype codes of the released checkpoints (I32: the packed tensors of the Int4 one).
ST_DTYPES = {'F16': np.dtype(np.float16), 'BF16': np.dtype(ml_dtypes.bfloat16), 'F32': np.dtype(np.float32),
             'I32': np.dtype(np.int32)}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


class CheckpointFormatError(ValueError):
  """A checkpoint file or index that cannot be read as it claims to be."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  """Where one released tensor lives; `start` is the absolute byte offset (safetensors only)."""
  name: str
  file: pathlib.Path
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int | None = None

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def _index_files(root: pathlib.Path, index: pathlib.Path) -> tuple[list[pathlib.Path], dict[str, str]]:
  weight_map = get(read_object(index), 'weight_map', dict, index)
  bad = [f'{name!r}: {shard!r}' for name, shard in weight_map.items()
         if not isinstance(shard, str) or not shard]
  if bad:
    raise ConfigFileError(index, f'expected tensor name -> shard file name, found {", ".join(bad[:5])}',
                          'weight_map')
  files = [root / name for name in dict.fromkeys(weight_map.values())]
  missing = [f.name for f in files if not f.exists()]
  if missing:
    raise FileNotFoundError(f'{root}: shards listed in {index.name} are missing: {", ".join(missing)}')
  return files, weight_map


def released_files(path: str | os.PathLike) -> tuple[str, list[pathlib.Path], dict[str, str] | None]:
  """(kind, shard files, index weight map or None); kind is 'safetensors' or 'bin'."""
  root = pathlib.Path(path)
  for kind, index, single in (('safetensors', SAFETENSORS_INDEX, 'model.safetensors'),
                              ('bin', BIN_INDEX, 'pytorch_model.bin')):
    if (root / index).exists():
      return (kind, *_index_files(root, root / index))
    if (root / single).exists():
      return kind, [root / single], None
  raise FileNotFoundError(
      f'{root}: no released checkpoint found (expected {SAFETENSORS_INDEX}, model.safetensors, '
      f'{BIN_INDEX} or pytorch_model.bin)')


def safetensors_header(file: pathlib.Path) -> list[TensorEntry]:
  """The tensors of one safetensors file, checked against the file's size, in the order of their data."""
  size = file.stat().st_size
  with open(file, 'rb') as f:
    head = f.read(8)
    n = int.from_bytes(head, 'little') if len(head) == 8 else -1
    if n < 0 or n > min(size - 8, _MAX_HEADER):
      raise CheckpointFormatError(f'{file}: not a safetensors file (bad header length; truncated?)')
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise CheckpointFormatError(f'{file}: corrupt safetensors header ({e})') from e
  if not isinstance(header, dict):
    raise CheckpointFormatError(f'{file}: corrupt safetensors header (not a JSON object)')
  header.pop('__metadata__', None)
  entries, unsupported, truncated, inconsistent = [], [], [], []
  for name, info in header.items():
    try:
      code, shape, (begin, end) = info['dtype'], tuple(info['shape']), info['data_offsets']
      if not all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)):
        raise TypeError('sizes and offsets must be non-negative integers')
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointFormatError(f'{file}: corrupt header entry for {name}: {info!r} ({e})') from e
    if not isinstance(code, str) or code not in ST_DTYPES:
      unsupported.append(f'{name} ({code})')
      continue
    entry = TensorEntry(name, file, ST_DTYPES[code], shape, 8 + n + begin)
    if end - begin != entry.nbytes:
      inconsistent.append(name)
    elif 8 + n + end > size:
      truncated.append(name)
    entries.append(entry)
  if unsupported:
    raise CheckpointFormatError(f'{file}: unsupported dtypes (expected F16, BF16, F32 or I32): '
                                f'{", ".join(unsupported)}')
  if inconsistent:
    raise CheckpointFormatError(f'{file}: corrupt header, data sizes do not match shapes: '
                                f'{", ".join(inconsistent)}')
  if truncated:
    raise CheckpointFormatError(f'{file}: truncated ({size} bytes); tensors cut off: {", ".join(truncated)}')
  return sorted(entries, key=lambda e: e.start)


def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError('reading pytorch_model*.bin needs PyTorch: pip install "qwenvl-jax[torch]" '
                      '(or convert the checkpoint to safetensors)') from e
  return torch


def _torch_load(file: pathlib.Path) -> dict:
  torch = _import_torch()
  try:
    return torch.load(file, map_location='cpu', weights_only=True, mmap=True)
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, ... for unreadable files
    raise CheckpointFormatError(f'{file}: not a readable PyTorch checkpoint ({e})') from e


def _torch_dtype(t, name: str, file: pathlib.Path) -> np.dtype:
  torch = _import_torch()
  dtypes = {torch.float16: np.dtype(np.float16), torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
            torch.float32: np.dtype(np.float32)}
  if t.dtype not in dtypes:
    raise CheckpointFormatError(f'{file}: unsupported dtype {t.dtype} for {name} '
                                '(expected float16, bfloat16 or float32)')
  return dtypes[t.dtype]


def _torch_to_numpy(t) -> np.ndarray:
  torch = _import_torch()
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _bin_header(file: pathlib.Path) -> list[TensorEntry]:
  state = _torch_load(file)  # memory-mapped: only the pickle is read
  return [TensorEntry(name, file, _torch_dtype(t, name, file), tuple(t.shape)) for name, t in state.items()]


class ReleasedCheckpoint:
  """The tensors of a released-layout directory, known from shard headers before any data is read."""

  def __init__(self, path: str | os.PathLike):
    self.root = pathlib.Path(path)
    self.kind, self.files, weight_map = released_files(self.root)
    scan = safetensors_header if self.kind == 'safetensors' else _bin_header
    self.shards: dict[pathlib.Path, list[TensorEntry]] = {f: scan(f) for f in self.files}
    self.entries: dict[str, TensorEntry] = {}
    duplicated = []
    for entry in (e for entries in self.shards.values() for e in entries):
      if entry.name in self.entries:
        duplicated.append(f'{entry.name} ({self.entries[entry.name].file.name}, {entry.file.name})')
      self.entries[entry.name] = entry
    if duplicated:
      raise CheckpointFormatError(
          f'{self.root}: tensors stored in more than one shard: {", ".join(duplicated)}')
    if weight_map is not None:
      self._check_index(weight_map)

  def _check_index(self, weight_map: Mapping[str, str]) -> None:
    found = {name: e.file.name for name, e in self.entries.items()}
    wrong = [f'{name} (index: {shard}, found in: {found.get(name, "none")})'
             for name, shard in weight_map.items() if found.get(name) != shard]
    unlisted = [f'{name} (in {e.file.name})' for name, e in self.entries.items() if name not in weight_map]
    if wrong or unlisted:
      parts = ([f'index entries that do not match the shards: {", ".join(wrong)}'] if wrong else []) + (
          [f'tensors missing from the index: {", ".join(unlisted)}'] if unlisted else [])
      raise CheckpointFormatError(f'{self.root}: index and shards disagree; ' + '; '.join(parts))

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: e.shape for name, e in self.entries.items()}

  @property
  def nbytes(self) -> int:
    return sum(e.nbytes for e in self.entries.values())

  def dtypes(self) -> set[np.dtype]:
    return {e.dtype for e in self.entries.values()}

  def tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[TensorEntry, np.ndarray]]:
    """Every tensor as a read-only memory-mapped array, shard by shard in the order of its data, or those
    of `names` in that order (the shards read at random: a safetensors shard stores its tensors by dtype
    and name, not as a model uses them).

    The kernel reads the next tensor ahead; once the caller asks for the next one, the previous one's
    pages leave this process's memory (the array stays valid: touching it again re-reads the file), so
    about one tensor is resident whatever the shard size (for callers that use each array before asking
    for the next).
    """
    order = ([e for entries in self.shards.values() for e in entries] if names is None else
             [self.entries[n] for n in names])
    if self.kind == 'bin':
      states = {f: _torch_load(f) for f in dict.fromkeys(e.file for e in order)}  # memory-mapped
      for e in order:
        yield e, _torch_to_numpy(states[e.file].pop(e.name))
      return
    maps = {}
    for f in dict.fromkeys(e.file for e in order):
      with open(f, 'rb') as file:
        maps[f] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
      maps[f].madvise(mmap.MADV_SEQUENTIAL if names is None else mmap.MADV_NORMAL)
    for i, e in enumerate(order):
      if i + 1 < len(order):
        _advise(maps[order[i + 1].file], mmap.MADV_WILLNEED, order[i + 1].start, order[i + 1].nbytes)
      yield e, np.frombuffer(maps[e.file], e.dtype, math.prod(e.shape), e.start).reshape(e.shape)
      _advise(maps[e.file], mmap.MADV_DONTNEED, e.start, e.nbytes)


def _advise(mapped: mmap.mmap, advice: int, offset: int, nbytes: int) -> None:
  start = offset // mmap.PAGESIZE * mmap.PAGESIZE
  if nbytes:
    mapped.madvise(advice, start, offset + nbytes - start)


def check_released(checkpoint: ReleasedCheckpoint, config: QwenVLConfig) -> None:
  """Raises CheckpointMismatchError naming the directory and every tensor that config.json does not
  describe, from the shard headers alone; CheckpointFormatError for integer tensors (a float checkpoint's
  are all float; the Int4 one's config.json has a quantization_config, read by `gptq_checkpoint`)."""
  try:
    check_names(checkpoint.shapes(), config)
  except CheckpointMismatchError as e:
    gptq = any(n.endswith('.qweight') for n in e.unexpected)
    why = ('packed GPTQ tensors, but config.json has no quantization_config' if gptq else
           'config.json and the weights do not belong together')
    e.args = (f'{checkpoint.root}: {e} ({why})',)
    raise
  check_float(checkpoint, checkpoint.entries, 'config.json has no quantization_config')


def check_float(checkpoint: ReleasedCheckpoint, names: Iterable[str], why: str) -> None:
  """Raises CheckpointFormatError naming every one of `names` stored as integers (`why`: what says they
  are float)."""
  wrong = [f'{n} ({checkpoint.entries[n].dtype})' for n in names if checkpoint.entries[n].dtype == np.int32]
  if wrong:
    raise CheckpointFormatError(f'{checkpoint.root}: integer tensors where float weights belong ({why}): '
                                f'{", ".join(wrong)}')


def read_released(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a released-layout directory (safetensors or .bin), by name, in memory."""
  return {e.name: np.array(a) for e, a in ReleasedCheckpoint(path).tensors()}
