"""Streaming a params tree into an Orbax checkpoint piece by piece, and reading it back slice by slice.

Orbax saves a pytree in one call and expects every leaf in memory, but a stacked leaf gathers one slice per
layer from many source shards (32 x [4096, 11008] for the 7B's w1). So the tree handed to Orbax holds
`StreamedLeaf` placeholders, and `_StreamingHandler` (an Orbax TypeHandler) serializes them: it creates each
leaf's zarr array with TensorStore from Orbax's own write spec, then fills it chunk file by chunk file from an
iterator of pieces while the source is read. Orbax still writes the tree metadata and commits the
checkpoint, so the result is a plain `np.ndarray` PyTree checkpoint (no OCDBT, uncompressed zarr) that
`StandardCheckpointer.restore` reads onto any sharding.

The chunk files are written here rather than through TensorStore: an uncompressed zarr chunk is the chunk's
bytes in C order, so each piece is copied once (transposed and cast on the way) into an aligned buffer and
written with O_DIRECT. Through the page cache every byte cost a second copy and, on virtual machines, a
fault for every fresh page: up to 1.7 CPU-seconds per GB written on the 2-core test machine, against 0.06
with O_DIRECT.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import os
import pathlib
import signal
import threading
from concurrent import futures
from typing import Callable, Iterable, Iterator

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import future as ocp_future

from convert.direct_io import BufferPool, Rows, write_file
from qwenvl_jax.params import set_path


Path = tuple[str, ...]

CHUNK_BYTES = 16 << 20  # zarr chunk size target: also the unit of conversion and of each write
# Pieces handed to the writer threads and not yet written. A piece holds memory only while a thread reads,
# copies and writes it (two buffers); this bounds how far ahead of the writes the source is walked, and
# the pool's idle buffers.
WRITE_BYTES_IN_FLIGHT = 128 << 20
# Copies and writes release the GIL; a thread more than the cores keeps them busy while one waits on disk.
WRITE_THREADS = min(8, (os.cpu_count() or 1) + 1)
# Transposing copies work in source blocks of at most this size, to stay in cache. numpy's inner loop runs
# along the destination's contiguous axis, the block's source rows: 16 rows of 4096 bfloat16 beat 8 by a
# third and 32 by half.
COPY_BLOCK = 128 << 10


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


def _bits(a: np.ndarray) -> np.ndarray:
  """a as unsigned integers of its width: numpy copies ml_dtypes types (bfloat16) through the type's own
  element copy; as 16-bit integers a transposing copy takes 30% less CPU."""
  return a.view(f'u{a.dtype.itemsize}')


def blocked_copy(dst: np.ndarray, src: np.ndarray) -> None:
  """dst[...] = src (casting), splitting src along its outermost source axis until a block is small.

  A transposing copy that walks the whole array is ~5x slower than one done in cache-sized blocks.
  """
  if dst.dtype == src.dtype:
    dst, src = _bits(dst), _bits(src)
  if src.nbytes <= COPY_BLOCK or src.flags.c_contiguous:
    dst[...] = src
    return
  axis = max(range(src.ndim), key=lambda a: (src.shape[a] > 1, abs(src.strides[a])))
  step = max(1, src.shape[axis] * COPY_BLOCK // src.nbytes)
  for i in range(0, src.shape[axis], step):
    idx = (slice(None),) * axis + (slice(i, i + step),)
    blocked_copy(dst[idx], src[idx])


def contiguous(src: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """src as a C-contiguous array of dtype; no copy when it already is one."""
  if src.flags.c_contiguous and src.dtype == dtype:
    return src
  out = np.empty(src.shape, dtype)
  blocked_copy(out, src)
  return out


@dataclasses.dataclass(frozen=True)
class Piece:
  """Chunk `chunk` (its position in the chunk grid) of the leaf at `path`, filled from the chunk's origin
  with the array that `open(pool)` gives: `shape`, in the leaf's layout, of any dtype and strides (a
  transposed view of the source), valid until the block exits."""
  path: Path
  chunk: tuple[int, ...]
  shape: tuple[int, ...]
  open: Callable[[BufferPool], contextlib.AbstractContextManager[np.ndarray]]


@contextlib.contextmanager
def _transposed(rows: Rows, start: int, stop: int, perm: tuple[int, ...] | None,
                pool: BufferPool) -> Iterator[np.ndarray]:
  with rows.read(start, stop, pool) as block:
    yield np.transpose(block, perm) if perm else block


def leaf_pieces(leaf: StreamedLeaf, layer: int | None, rows: Rows,
                perm: tuple[int, ...] | None) -> Iterator[Piece]:
  """One layer slice (or a whole unstacked leaf) as one piece per chunk, from `rows` in the source layout,
  which `perm` transposes into the leaf's; nothing is read yet."""
  shape = tuple(rows.shape[p] for p in perm) if perm else rows.shape
  axis = perm.index(0) if perm else 0
  if shape != leaf.slice_shape or axis != leaf.chunk_axis:
    raise ValueError(f'{"/".join(leaf.path)}: slice of shape {shape} cut along axis {axis}, expected '
                     f'{leaf.slice_shape} along {leaf.chunk_axis}')
  head = (layer,) if leaf.stacked else ()
  for i, start in enumerate(range(0, rows.shape[0], leaf.chunk_len)):
    stop = min(start + leaf.chunk_len, rows.shape[0])
    yield Piece(leaf.path, head + (0,) * axis + (i,) + (0,) * (len(shape) - axis - 1),
                shape[:axis] + (stop - start,) + shape[axis + 1:],
                functools.partial(_transposed, rows, start, stop, perm))


@dataclasses.dataclass(frozen=True)
class _ChunkFiles:
  """Where and how the chunk files of one leaf's zarr array go."""
  leaf: StreamedLeaf
  directory: str
  separator: str

  @classmethod
  def of(cls, leaf: StreamedLeaf, store: ts.TensorStore) -> _ChunkFiles:
    kvstore, metadata = store.kvstore.spec().to_json(), store.spec().to_json()['metadata']
    if (kvstore['driver'], metadata['compressor'], metadata['filters'], metadata['order']) != (
        'file', None, None, 'C'):
      raise RuntimeError(f'{"/".join(leaf.path)}: expected an uncompressed local zarr array, got '
                         f'{kvstore} {metadata}')
    return cls(leaf, kvstore['path'], metadata['dimension_separator'])

  def write(self, piece: Piece, pool: BufferPool) -> None:
    """Copies the piece into a chunk-sized buffer (zeros past the array's edge, as zarr pads edge chunks)
    and writes it as its chunk file."""
    shape = self.leaf.chunk_shape[self.leaf.stacked:]
    nbytes = math.prod(shape) * self.leaf.dtype.itemsize
    buf = pool.get(nbytes)
    try:
      out = buf[:nbytes].view(self.leaf.dtype).reshape(shape)
      if piece.shape != shape:
        buf[:nbytes].fill(0)
      with piece.open(pool) as value:
        blocked_copy(out[tuple(slice(n) for n in piece.shape)], value)
      key = self.separator.join(map(str, piece.chunk))
      write_file(os.path.join(self.directory, key), buf, nbytes)
    finally:
      pool.put(buf)


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

  def __init__(self, pieces: Iterable[Piece]):
    super().__init__()
    self._pieces = pieces
    self.stop = threading.Event()
    # TensorStore writes only the .zarray files; _write syncs every file once, before Orbax commits.
    self._context = ts.Context({'file_io_sync': False})

  async def serialize(self, values, infos, args=None):
    write = self._write(values, infos)
    return [ocp_future.CommitFutureAwaitingContractedSignals(write, name='qwenvl_stream')]

  async def _write(self, values: list[StreamedLeaf], infos) -> None:
    files = {}
    for leaf, info in zip(values, infos):
      await info.await_path_creation()
      spec = ocp.type_handlers.get_json_tspec_write(
          info, use_ocdbt=False, global_shape=leaf.shape, local_shape=leaf.chunk_shape, dtype=leaf.dtype)
      store = await ts.open(ts.Spec(spec), create=True, open=True, context=self._context)
      files[leaf.path] = _ChunkFiles.of(leaf, store)
    written = _fill(files, self._pieces, self.stop)
    short = [f'{"/".join(p)} ({written[p]} of {math.prod(f.leaf.shape)} values)'
             for p, f in files.items() if written[p] != math.prod(f.leaf.shape)]
    if short:
      raise RuntimeError(f'leaves not fully written: {", ".join(short)}')
    _fsync_tree(pathlib.Path(infos[0].parent_dir))


def _fill(files: dict[Path, _ChunkFiles], pieces: Iterable[Piece], stop: threading.Event) -> dict[Path, int]:
  """Writes every piece on WRITE_THREADS threads, at most WRITE_BYTES_IN_FLIGHT bytes of them queued at a
  time; returns the values written per leaf."""
  pool = BufferPool(WRITE_BYTES_IN_FLIGHT)
  pending: collections.deque[tuple[futures.Future, int]] = collections.deque()
  in_flight = 0
  written = dict.fromkeys(files, 0)

  def finish_oldest() -> None:
    nonlocal in_flight
    future, nbytes = pending.popleft()
    future.result()
    in_flight -= nbytes

  writers = futures.ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix='qwenvl_chunks')
  try:
    for piece in pieces:
      if stop.is_set():
        raise Cancelled('conversion cancelled')
      if piece.path not in files:
        raise RuntimeError(f'piece for {"/".join(piece.path)}, which is not being saved in this call')
      leaf, size = files[piece.path].leaf, math.prod(piece.shape)
      pending.append((writers.submit(files[piece.path].write, piece, pool), size * leaf.dtype.itemsize))
      in_flight += size * leaf.dtype.itemsize
      written[piece.path] += size
      while pending and (in_flight > WRITE_BYTES_IN_FLIGHT or pending[0][0].done()):
        finish_oldest()
    while pending:
      finish_oldest()
  finally:  # never leave a thread writing into a directory that is about to be removed
    writers.shutdown(wait=True, cancel_futures=True)
  return written


def save_streamed(directory: pathlib.Path, leaves: Iterable[StreamedLeaf], pieces: Iterable[Piece]) -> None:
  """Saves an Orbax checkpoint at `directory` whose leaves are filled from `pieces` (one pass)."""
  tree: dict = {}
  for leaf in leaves:
    set_path(tree, leaf.path, leaf)
  streaming = _StreamingHandler(pieces)
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
