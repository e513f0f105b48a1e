"""Writing the released Hugging Face layout: safetensors shards plus `model.safetensors.index.json`.

Headers are planned from names, dtypes and shapes up front, so each shard is written front to back while
its tensors arrive, one at a time or in parts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
from typing import Iterable, Iterator, Sequence

import numpy as np

from qwenvl_jax.checkpoint import SAFETENSORS_INDEX, ST_DTYPES

DTYPE_CODES = {dtype: code for code, dtype in ST_DTYPES.items()}
DEFAULT_SHARD_SIZE = 2 * 10**9
# Files copied next to the weights when the source has them (the tokenizer's vocabulary included).
AUX_FILES = ('generation_config.json', 'qwen.tiktoken')


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


def copy_aux(src: pathlib.Path, dst: pathlib.Path) -> None:
  for name in AUX_FILES:
    if (src / name).exists():
      shutil.copyfile(src / name, dst / name)


def plan_shards(specs: Sequence[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
  """Consecutive groups of at most shard_size bytes; a larger tensor gets a shard of its own."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in specs:
    if shards[-1] and size + spec.nbytes > shard_size:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += spec.nbytes
  return shards


def shard_file_names(n: int) -> list[str]:
  return [f'model-{i:05d}-of-{n:05d}.safetensors' for i in range(1, n + 1)]


def _header(specs: Sequence[TensorSpec]) -> bytes:
  header, offset = {}, 0
  for s in specs:
    header[s.name] = {'dtype': DTYPE_CODES[s.dtype], 'shape': list(s.shape),
                      'data_offsets': [offset, offset + s.nbytes]}
    offset += s.nbytes
  header['__metadata__'] = {'format': 'pt'}  # transformers refuses safetensors files without it
  blob = json.dumps(header, separators=(',', ':')).encode()
  return blob + b' ' * (-len(blob) % 8)  # the format allows space padding; 8-byte alignment of the data


def _parts(item: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
  return [item] if isinstance(item, np.ndarray) else item


def write_shard(file: pathlib.Path, specs: Sequence[TensorSpec],
                tensors: Iterable[np.ndarray | Iterable[np.ndarray]]) -> None:
  """Writes one safetensors file. `tensors` match `specs` in order: each an array, or the parts that
  make up its bytes in order (e.g. blocks of rows), so no tensor needs to be in memory at once."""
  header = _header(specs)
  count = 0
  with open(file, 'wb') as f:
    f.write(len(header).to_bytes(8, 'little'))
    f.write(header)
    for spec, item in zip(specs, tensors):
      written = 0
      for part in _parts(item):
        if part.dtype != spec.dtype:
          raise ValueError(f'{spec.name}: got {part.dtype}, planned {spec.dtype}')
        f.write(memoryview(np.ascontiguousarray(part).reshape(-1).view(np.uint8)))
        written += part.nbytes
      if written != spec.nbytes:
        raise ValueError(f'{spec.name}: got {written} bytes, planned {spec.nbytes} for shape {spec.shape}')
      count += 1
    if count != len(specs):
      raise ValueError(f'{file}: {len(specs) - count} planned tensors never arrived')
    f.flush()
    os.fsync(f.fileno())


def write_released(root: pathlib.Path, specs: Sequence[TensorSpec],
                   tensors: Iterator[np.ndarray | Iterable[np.ndarray]], shard_size: int) -> dict:
  """Shards `tensors` (in `specs` order, as write_shard takes them) into
  root/model-0000k-of-0000n.safetensors plus the index; returns the index."""
  shards = plan_shards(specs, shard_size)
  names = shard_file_names(len(shards))
  weight_map = {}
  for name, shard in zip(names, shards):
    write_shard(root / name, shard, (next(tensors) for _ in shard))
    weight_map.update((s.name, name) for s in shard)
  index = {'metadata': {'total_size': sum(s.nbytes for s in specs)}, 'weight_map': weight_map}
  (root / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + '\n')
  return index
