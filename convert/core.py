"""Released layout <-> converted Orbax layout, streamed and atomic.

Memory: each tensor is cut into chunk-sized pieces along its source-major axis; a few writer threads
each read a piece's rows (O_DIRECT, convert.source), copy them into the chunk's layout and dtype and write
the chunk file (O_DIRECT, convert.orbax_io). Resident memory is two chunk-sized buffers per writer thread
plus the idle buffer pool (WRITE_BYTES_IN_FLIGHT at most): never a tensor, a shard or the model. Export
reads and writes a chunk at a time the same way.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Iterable, Iterator

import numpy as np
import tqdm

from convert import hf, int4, orbax_io, source
from convert.paths import atomic_directory
from qwenvl_jax.checkpoint import (FORMAT, FORMAT_VERSION, ReleasedCheckpoint, check_leaves, check_released,
                                   read_marker)
from qwenvl_jax.config import QwenVLConfig, as_dtype
from qwenvl_jax.jsonfile import read_object
from qwenvl_jax.layout import EXPORT_MARKER, MARKER, PARAMS_DIR, Kind, describe_directory, wrong_kind
from qwenvl_jax import gptq, orbax_leaves
from qwenvl_jax.params import Rule, rules

DEFAULT_SHARD_SIZE = hf.DEFAULT_SHARD_SIZE
EXPORT_FORMAT = 'qwenvl-jax/released'


def _progress(total: int, desc: str, enabled: bool) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, desc=desc, unit='B', unit_scale=True, unit_divisor=1024,
                   disable=not enabled, dynamic_ncols=True)


def _streamed_leaf(rule: Rule, shape: tuple[int, ...], dtype: np.dtype) -> orbax_io.StreamedLeaf:
  """The leaf of `rule`, chunked along the axis that the torch tensor's outermost axis becomes."""
  return orbax_io.StreamedLeaf(rule.path, shape, dtype, stacked=rule.layer is not None,
                               chunk_axis=rule.perm.index(0) if rule.perm else 0)


def source_dtype(src: ReleasedCheckpoint) -> np.dtype:
  dtypes = src.dtypes()
  if len(dtypes) != 1:
    raise ValueError(f'{src.root} mixes dtypes ({", ".join(sorted(d.name for d in dtypes))}); '
                     'choose one with --dtype')
  return dtypes.pop()


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, dtype=None, overwrite: bool = False,
                progress: bool = True) -> pathlib.Path:
  """Converts a released-layout directory into DST (Orbax params + config); `dtype` default: the source's
  (a GPTQ Int4 source is dequantized, by default to float32: `int4`).

  Every tensor name and shape is checked from the shard headers before any data is read.
  """
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  found = describe_directory(src)
  if found.kind not in (Kind.RELEASED, Kind.EXPORTED):
    raise wrong_kind(found, 'a checkpoint in the released layout')
  if not (src / 'config.json').exists():
    raise FileNotFoundError(f'{src}/config.json not found: the config is needed to map the tensors')
  config = QwenVLConfig.from_json(src)
  quantized = gptq.read_config(src)
  checkpoint = ReleasedCheckpoint(src)
  if quantized is None:
    check_released(checkpoint, config)
    dtype = np.dtype(as_dtype(dtype)) if dtype is not None else source_dtype(checkpoint)
    tensors, total = source.released_rows(checkpoint), checkpoint.nbytes
  else:  # GPTQ Int4: dequantized, by default into the one float dtype that holds it exactly
    tensors, total = int4.dequantized_rows(checkpoint, config, quantized)
    dtype = np.dtype(as_dtype(dtype or int4.DEQUANTIZED_DTYPE))
  table = rules(config)
  leaves = {r.path: _streamed_leaf(r, r.leaf_shape, dtype) for r in table.values()}

  with (atomic_directory(src, dst, overwrite) as tmp,
        _progress(total, 'converting', progress) as bar):
    def pieces() -> Iterator[orbax_io.Piece]:
      for entry, rows in tensors:
        rule = table[entry.name]
        rows = rows.reshape(rule.view or rule.hf_shape)
        yield from orbax_io.leaf_pieces(leaves[rule.path], rule.layer, rows, rule.perm)
        bar.update(entry.nbytes)

    orbax_io.save_streamed(tmp / PARAMS_DIR, leaves.values(), pieces())
    if quantized is None:
      shutil.copyfile(src / 'config.json', tmp / 'config.json')
    else:  # the weights are float now: a quantization_config would make the export back a wrong Int4
      saved = read_object(src / 'config.json')
      del saved['quantization_config']
      (tmp / 'config.json').write_text(json.dumps(saved, indent=2) + '\n')
    hf.copy_aux(src, tmp)
    marker = {'format': FORMAT, 'version': FORMAT_VERSION, 'dtype': dtype.name}
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + '\n')
  return dst


def released_order(table: dict[str, Rule]) -> list[str]:
  """Tensor names about as the release orders them: embeddings, decoder layers, ln_f, the visual tower's
  layers then its other tensors, lm_head; a shard then holds consecutive layers."""
  def key(name: str) -> tuple:
    rule = table[name]
    tower = (0 if name == 'transformer.wte.weight' else 3 if name == 'lm_head.weight'
             else 1 if rule.path[0] == 'decoder' else 2)
    return tower, rule.layer is None, rule.layer or 0
  return sorted(table, key=key)  # stable: rules() order within a layer


def _hf_parts(reader: orbax_leaves.LeafReader, rule: Rule, dtype: np.dtype) -> Iterator[np.ndarray]:
  """One released tensor as contiguous blocks of its rows, read from the leaf a chunk at a time: the
  inverse of hf_to_orbax's pieces (Rule.to_hf on each block)."""
  meta = reader.metadata[rule.path]
  leaf = _streamed_leaf(rule, tuple(meta.shape), np.dtype(meta.dtype))
  axis, step = leaf.chunk_axis, leaf.chunk_len
  n = leaf.slice_shape[axis] if leaf.slice_shape else 1
  head = () if rule.layer is None else (rule.layer,)
  for r in range(0, n, step):
    index = head + ((slice(None),) * axis + (slice(r, min(r + step, n)),) if leaf.slice_shape else ())
    block = reader.read(rule.path, index)
    if rule.perm:
      block = np.transpose(block, np.argsort(rule.perm))
    yield orbax_io.contiguous(block, dtype)


def _export_config(src: pathlib.Path, config: QwenVLConfig, dtype: np.dtype) -> dict:
  saved = read_object(src / 'config.json')
  merged = {**saved, **config.to_dict(), 'torch_dtype': dtype.name}
  merged.update(bf16=dtype.name == 'bfloat16', fp16=dtype.name == 'float16', fp32=dtype.name == 'float32')
  return merged


def orbax_to_hf(src: str | os.PathLike, dst: str | os.PathLike, dtype=None,
                shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                progress: bool = True) -> pathlib.Path:
  """Exports a converted directory to the released layout; `dtype` default: as stored (bit-exact)."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if shard_size <= 0:
    raise ValueError(f'shard size must be positive, got {shard_size}')
  info = read_marker(src)
  config = QwenVLConfig.from_json(src)
  reader = orbax_leaves.LeafReader(src / PARAMS_DIR)
  check_leaves({p: m.shape for p, m in reader.metadata.items()}, config, str(src / PARAMS_DIR))
  dtype = np.dtype(as_dtype(dtype or info['dtype']))
  table = rules(config)
  specs = [hf.TensorSpec(name, dtype, table[name].hf_shape) for name in released_order(table)]

  with (atomic_directory(src, dst, overwrite) as tmp,
        _progress(sum(s.nbytes for s in specs), 'exporting', progress) as bar):
    def counted(parts: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
      for part in parts:
        yield part
        bar.update(part.nbytes)  # once written: the writer asks for the next part only then

    parts = (counted(_hf_parts(reader, table[spec.name], dtype)) for spec in specs)
    hf.write_released(tmp, specs, parts, shard_size)
    (tmp / 'config.json').write_text(json.dumps(_export_config(src, config, dtype), indent=2) + '\n')
    hf.copy_aux(src, tmp)
    marker = {'format': EXPORT_FORMAT, 'version': FORMAT_VERSION, 'dtype': dtype.name}
    (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + '\n')  # last: the export finished
  return dst
