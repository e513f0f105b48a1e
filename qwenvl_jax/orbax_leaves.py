"""Reading the leaves of an Orbax params checkpoint a slice at a time, under both of its users.

The converter's export reads a layer slice or a block of rows at a time (`LeafReader.read`); loading onto
one device reads each leaf block by block into its final host buffer (`read_leaf`), so that loading a
checkpoint never holds more than the parameters plus one block: Orbax's own restore reads every leaf into
a host array and then copies it onto the device, twice the parameter bytes at its peak (1.9x measured
with `python -m bench.released`).
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Any

import jax
import numpy as np

from qwenvl_jax.params import Path

Index = tuple  # an index into a leaf: ints and slices
BLOCK_BYTES = 64 << 20  # host bytes read at a time
# XLA on the CPU adopts a host buffer as a device array without copying it when the buffer is aligned so.
_ALIGN = 64


def orbax_leaf_metadata(params_dir: str | os.PathLike) -> dict[Path, Any]:
  """Flax path -> Orbax ArrayMetadata (name, directory, shape, dtype) of every saved leaf."""
  import orbax.checkpoint as ocp
  tree = ocp.PyTreeCheckpointer().metadata(params_dir).item_metadata.tree
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(str(k.key) for k in keys): m for keys, m in flat}


class LeafReader:
  """Reads parts of leaves (a layer slice, a block of it) from an Orbax params checkpoint of any format."""

  def __init__(self, params_dir: str | os.PathLike):
    import orbax.checkpoint as ocp
    params_dir = pathlib.Path(params_dir)
    self.metadata = orbax_leaf_metadata(params_dir)
    self._dir = params_dir
    self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(params_dir)
    self._zarr3 = ocp.PyTreeCheckpointer().metadata(params_dir).item_metadata.use_zarr3
    self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._ocdbt)
    self._stores: dict[Path, Any] = {}

  def _store(self, path: Path):
    import orbax.checkpoint as ocp
    import tensorstore as ts
    if path not in self._stores:
      info = ocp.type_handlers.ParamInfo(name=self.metadata[path].name, parent_dir=self._dir,
                                         is_ocdbt_checkpoint=self._ocdbt, use_zarr3=self._zarr3,
                                         ts_context=self._context)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
      self._stores[path] = ts.open(ts.Spec(spec), open=True, context=self._context).result()
    return self._stores[path]

  def read(self, path: Path, index: Index = ()) -> np.ndarray:
    store = self._store(path)
    return (store[index] if index else store).read().result()


class LazyLeaf:
  """A leaf (or `leaf[index]`, e.g. one layer) whose `[slices]` reads only that block, as stored: a
  memory-mapped tensor's stand-in for `released_slices.read_onto`."""

  def __init__(self, reader: LeafReader, path: Path, index: Index = ()):
    self.reader, self.path, self.index = reader, path, index
    self.shape = tuple(reader.metadata[path].shape)[len(index):]
    self.ndim = len(self.shape)

  def __getitem__(self, block: Index) -> np.ndarray:
    block = block if isinstance(block, tuple) else (block,)
    return self.reader.read(self.path, (*self.index, *block))


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
  """An uninitialised C-order host array whose data starts on an _ALIGN-byte boundary."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def read_leaf(reader: LeafReader, path: Path, dtype, index: Index = ()) -> np.ndarray:
  """The leaf (or `leaf[index]`, leading integer indices such as a layer) in `dtype`, read and cast block
  by block along its first remaining axis into one aligned buffer: the only full-size allocation is the
  result."""
  shape = tuple(reader.metadata[path].shape)[len(index):]
  out = aligned_empty(shape, dtype)
  if not shape:
    out[...] = reader.read(path, index)
    return out
  row_bytes = max(1, math.prod(shape[1:]) * max(out.itemsize, np.dtype(reader.metadata[path].dtype).itemsize))
  step = max(1, BLOCK_BYTES // row_bytes)
  for start in range(0, shape[0], step):
    block = slice(start, min(start + step, shape[0]))
    out[block] = reader.read(path, (*index, block))
    release_freed_memory()
  return out


def release_freed_memory() -> None:
  """Returns the heap pages TensorStore's reader threads freed to the system: glibc keeps them in each
  thread's arena otherwise, and over a whole checkpoint they add up to ~30% of the parameters."""
  if _libc is not None:
    _libc.malloc_trim(0)


try:
  import ctypes
  _libc = ctypes.CDLL('libc.so.6')
  _libc.malloc_trim  # glibc only
except (OSError, AttributeError):
  _libc = None


def to_device(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """`host` on a single-device `sharding`; on the CPU the device array adopts the buffer (no copy)."""
  return jax.device_put(host, sharding, may_alias=True)
