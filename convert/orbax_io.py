"""Streaming a params tree into an Orbax checkpoint piece by piece, and reading it back slice by slice.

Orbax saves a pytree in one call and expects every leaf in memory, but a stacked leaf gathers one slice per
layer from many source shards (32 x [4096, 11008] for the 7B's w1). So the tree handed to Orbax holds
`StreamedLeaf` placeholders, and `_StreamingHandler` (an Orbax TypeHandler) serializes them: it creates each
leaf's TensorStore array from Orbax's own write spec, chunked so that every piece written is whole chunks,
then fills the arrays from an iterator of pieces while the source is read. Orbax still writes the tree
metadata and commits the checkpoint, so the result is a plain `np.ndarray` PyTree checkpoint (no OCDBT,
uncompressed zarr) that `StandardCheckpointer.restore` reads onto any sharding.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import pathlib
import signal
import threading
from typing import Callable, Iterable, Iterator

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import future as ocp_future

from qwenvl_jax.checkpoint import orbax_leaf_metadata
from qwenvl_jax.params import set_path

Path = tuple[str, ...]
Index = tuple  # an index into a leaf: ints and slices
Piece = tuple[Path, Index, np.ndarray]

CHUNK_BYTES = 16 << 20  # zarr chunk size target: also the unit of conversion and of each write
WRITE_BYTES_IN_FLIGHT = 128 << 20  # pieces handed to TensorStore and not yet written (bounds memory)
COPY_BLOCK = 64 << 10  # transposing copies work in source blocks this size, to stay in cache


@dataclasses.dataclass(frozen=True)
class StreamedLeaf:
  """A leaf whose data arrives later as pieces.

  stacked: axis 0 is the layer axis and each piece lies in one layer.
  chunk_axis: the axis of a layer slice along which it is cut into chunks; the one that the source's
    outermost axis became, so that a piece is a contiguous run of the source (sequential reads, and
    transposes in cache-sized blocks; cutting across it made lm_head's transpose 2x slower).
  """
  path: Path
  shape: tuple[int, ...]
  dtype: np.dtype
  stacked: bool
  chunk_axis: int = 0

  @property
  def slice_shape(self) -> tuple[int, ...]:
    return self.shape[1:] if self.stacked else self.shape

  @property
  def chunk_len(self) -> int:
    """Chunk length along chunk_axis: chunks of at most CHUNK_BYTES, evened out because zarr stores the
    last chunk at full size."""
    if not self.slice_shape:
      return 1
    n = self.slice_shape[self.chunk_axis]
    step_bytes = math.prod(self.slice_shape) // max(n, 1) * self.dtype.itemsize
    chunks = math.ceil(n / max(1, CHUNK_BYTES // max(step_bytes, 1)))
    return math.ceil(n / chunks)

  @property
  def chunk_shape(self) -> tuple[int, ...]:
    shape = list(self.slice_shape)
    if shape:
      shape[self.chunk_axis] = self.chunk_len
    return (1,) * self.stacked + tuple(shape)


def blocked_copy(dst: np.ndarray, src: np.ndarray) -> None:
  """dst[...] = src (casting), splitting src along its outermost source axis until a block is small.

  A transposing copy that walks the whole array is ~5x slower than one done in cache-sized blocks.
  """
  if src.nbytes <= COPY_BLOCK or src.flags.c_contiguous:
    dst[...] = src
    return
  axis = max(range(src.ndim), key=lambda a: (src.shape[a] > 1, abs(src.strides[a])))
  step = max(1, src.shape[axis] * COPY_BLOCK // src.nbytes)
  for i in range(0, src.shape[axis], step):
    idx = (slice(None),) * axis + (slice(i, i + step),)
    blocked_copy(dst[idx], src[idx])


def contiguous(src: np.ndarray, dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
  """src as a C-contiguous array of dtype (in `out` when given); no copy when it already is one."""
  if out is None and src.flags.c_contiguous and src.dtype == dtype:
    return src
  if out is None:
    out = np.empty(src.shape, dtype)
  blocked_copy(out, src)
  return out


class BufferPool:
  """Reusable piece buffers, by size: fresh memory costs a page fault per 4 KiB (dear on virtual
  machines). Keeps at most `cap` bytes of idle buffers."""

  def __init__(self, cap: int):
    self._free: dict[int, list[np.ndarray]] = collections.defaultdict(list)
    self._idle = 0
    self._cap = cap

  def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    nbytes = math.prod(shape) * dtype.itemsize
    if self._free[nbytes]:
      self._idle -= nbytes
      return self._free[nbytes].pop().view(dtype).reshape(shape)
    return np.empty(shape, dtype)

  def put(self, array: np.ndarray) -> None:
    buf = array.reshape(-1).view(np.uint8)
    if self._idle + buf.nbytes <= self._cap:
      self._free[buf.nbytes].append(buf)
      self._idle += buf.nbytes


def leaf_pieces(leaf: StreamedLeaf, layer: int | None, value: np.ndarray, pool: BufferPool,
                copied: Callable[[np.ndarray], None] = lambda part: None) -> Iterator[Piece]:
  """One layer slice (or a whole unstacked leaf) as chunk-aligned pieces in the leaf's dtype, copied
  into pool buffers; `copied(part)` is called with each part of `value` once it has been copied."""
  if value.shape != leaf.slice_shape:
    raise ValueError(f'{"/".join(leaf.path)}: piece of shape {value.shape}, expected {leaf.slice_shape}')
  head = (layer,) if leaf.stacked else ()
  if not value.shape:
    yield leaf.path, head, contiguous(value, leaf.dtype, pool.get((), leaf.dtype))
    return
  axis, step, n = leaf.chunk_axis, leaf.chunk_len, value.shape[leaf.chunk_axis]
  for r in range(0, n, step):
    index = (slice(None),) * axis + (slice(r, min(r + step, n)),)  # TensorStore does not clip slices
    part = value[index]
    piece = contiguous(part, leaf.dtype, pool.get(part.shape, leaf.dtype))
    copied(part)
    yield leaf.path, head + index, piece


def _fsync_tree(root: pathlib.Path) -> None:
  for dirpath, _, files in os.walk(root):
    for name in files:
      fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)


class Cancelled(Exception):
  """The save was abandoned (Ctrl-C, an error in the caller) while pieces were being written."""


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
  """Serializes every StreamedLeaf of a save in one pass over `pieces`; restores as np.ndarray."""

  def __init__(self, pieces: Iterable[Piece], pool: BufferPool):
    super().__init__()
    self._pieces = pieces
    self._pool = pool
    self.stop = threading.Event()
    # TensorStore's per-chunk fsync cut write throughput 3x here; _write syncs every file once instead,
    # before Orbax commits.
    self._context = ts.Context({'file_io_sync': False})

  async def serialize(self, values, infos, args=None):
    write = self._write(values, infos)
    return [ocp_future.CommitFutureAwaitingContractedSignals(write, name='qwenvl_stream')]

  async def _write(self, values: list[StreamedLeaf], infos) -> None:
    stores = {}
    for leaf, info in zip(values, infos):
      await info.await_path_creation()
      spec = ocp.type_handlers.get_json_tspec_write(
          info, use_ocdbt=False, global_shape=leaf.shape, local_shape=leaf.chunk_shape, dtype=leaf.dtype)
      stores[leaf.path] = await ts.open(ts.Spec(spec), create=True, open=True, context=self._context)
    written = _fill(stores, self._pieces, self._pool, self.stop)
    short = [f'{"/".join(p)} ({written[p]} of {math.prod(t.shape)} values)'
             for p, t in stores.items() if written[p] != math.prod(t.shape)]
    if short:
      raise RuntimeError(f'leaves not fully written: {", ".join(short)}')
    _fsync_tree(pathlib.Path(infos[0].parent_dir))


def _fill(stores: dict[Path, ts.TensorStore], pieces: Iterable[Piece], pool: BufferPool,
          stop: threading.Event) -> dict[Path, int]:
  """Writes every piece, keeping at most WRITE_BYTES_IN_FLIGHT bytes queued; returns values written per leaf.

  Each piece's buffer goes back to `pool` once written: TensorStore reads it until then.
  """
  pending: collections.deque = collections.deque()
  in_flight = 0
  written = dict.fromkeys(stores, 0)
  for path, index, data in pieces:
    if stop.is_set():
      for future, _ in pending:  # let TensorStore finish with the buffers before giving up
        future.result()
      raise Cancelled('conversion cancelled')
    if path not in stores:
      raise RuntimeError(f'piece for {"/".join(path)}, which is not being saved in this call')
    pending.append((stores[path][index].write(data, can_reference_source_data_indefinitely=True), data))
    in_flight += data.nbytes
    written[path] += data.size
    while in_flight > WRITE_BYTES_IN_FLIGHT:
      future, done = pending.popleft()
      future.result()
      in_flight -= done.nbytes
      pool.put(done)
  for future, _ in pending:
    future.result()
  return written


def save_streamed(directory: pathlib.Path, leaves: Iterable[StreamedLeaf], pieces: Iterable[Piece],
                  pool: BufferPool) -> None:
  """Saves an Orbax checkpoint at `directory` whose leaves are filled from `pieces` (one pass); piece
  buffers are returned to `pool` once written."""
  tree: dict = {}
  for leaf in leaves:
    set_path(tree, leaf.path, leaf)
  streaming = _StreamingHandler(pieces, pool)
  registry = ocp.type_handlers.create_type_handler_registry((StreamedLeaf, streaming))
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False,
                                        type_handler_registry=registry)
  checkpointer = ocp.Checkpointer(handler)
  try:
    with _interrupt_stops(streaming.stop):
      checkpointer.save(directory, args=ocp.args.PyTreeSave(tree))
  except Cancelled:
    raise KeyboardInterrupt from None
  finally:
    checkpointer.close()
  if streaming.stop.is_set():  # Ctrl-C came after the last piece: still honour it
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupt_stops(stop: threading.Event) -> Iterator[None]:
  """Ctrl-C sets `stop` rather than raising in the main thread in the middle of Orbax's save, whose
  threads would carry on writing into a directory being removed; the writer stops at its next piece and
  the save unwinds through Orbax's own error path."""
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return
  signal.signal(signal.SIGINT, lambda *_: stop.set())
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)


class LeafReader:
  """Reads parts of leaves (a layer slice, a block of it) from an Orbax params checkpoint of any format."""

  def __init__(self, params_dir: pathlib.Path):
    self.metadata = orbax_leaf_metadata(params_dir)
    self._dir = params_dir
    self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(params_dir)
    self._zarr3 = ocp.PyTreeCheckpointer().metadata(params_dir).item_metadata.use_zarr3
    self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._ocdbt)
    self._stores: dict[Path, ts.TensorStore] = {}

  def _store(self, path: Path) -> ts.TensorStore:
    if path not in self._stores:
      info = ocp.type_handlers.ParamInfo(name=self.metadata[path].name, parent_dir=self._dir,
                                         is_ocdbt_checkpoint=self._ocdbt, use_zarr3=self._zarr3)
      spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
      self._stores[path] = ts.open(ts.Spec(spec), open=True, context=self._context).result()
    return self._stores[path]

  def read(self, path: Path, index: Index = ()) -> np.ndarray:
    store = self._store(path)
    return (store[index] if index else store).read().result()
