"""Direct file I/O shared by the converter's reader (`source`) and writer (`orbax_io`): aligned reusable
buffers, O_DIRECT reads and writes where the filesystem takes them, and the `Rows` interface between them.

Through the page cache every byte lands in a fresh page first, which on virtual machines costs a fault per
page; O_DIRECT reads and writes straight from reused aligned buffers.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import os
import pathlib
import threading
from typing import Protocol

import numpy as np

ALIGN = 4096  # O_DIRECT needs buffers, lengths and offsets aligned to the device's blocks


def aligned(nbytes: int) -> int:
  return -(-nbytes // ALIGN) * ALIGN


class BufferPool:
  """Reusable ALIGN-aligned byte buffers: fresh memory costs a page fault per 4 KiB (dear on virtual
  machines). Lengths come in size classes, 8 to a doubling, so that blocks of rows at different offsets
  share buffers. Keeps at most `cap` bytes of idle buffers; thread-safe."""

  def __init__(self, cap: int):
    self._free: dict[int, list[np.ndarray]] = collections.defaultdict(list)
    self._idle = 0
    self._cap = cap
    self._lock = threading.Lock()

  def get(self, nbytes: int) -> np.ndarray:
    """A uint8 buffer of at least aligned(nbytes) bytes; pages past those that a caller touches stay
    unallocated."""
    step = max(ALIGN, 1 << max(0, nbytes.bit_length() - 4))
    size = -(-nbytes // step) * step
    with self._lock:
      if self._free[size]:
        self._idle -= size
        return self._free[size].pop()
    raw = np.empty(size + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + size]

  def put(self, buf: np.ndarray) -> None:
    with self._lock:
      if self._idle + buf.nbytes <= self._cap:
        self._free[buf.nbytes].append(buf)
        self._idle += buf.nbytes


def open_direct(path: str | os.PathLike, flags: int, mode: int = 0o644) -> tuple[int, bool]:
  """os.open with O_DIRECT where the filesystem takes it (tmpfs and some others refuse it); returns the
  descriptor and whether it is direct."""
  try:
    return os.open(path, flags | getattr(os, 'O_DIRECT', 0), mode), hasattr(os, 'O_DIRECT')
  except OSError as e:
    if e.errno != errno.EINVAL:
      raise
  return os.open(path, flags, mode), False


def write_file(path: str, buf: np.ndarray, nbytes: int) -> None:
  """Writes the first nbytes of buf (from BufferPool) as the file at path; with O_DIRECT, whole aligned
  blocks, then cut to nbytes."""
  fd, direct = open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  try:
    view = memoryview(buf[:aligned(nbytes) if direct else nbytes])
    while view:
      view = view[os.write(fd, view):]
    if direct and aligned(nbytes) != nbytes:
      os.ftruncate(fd, nbytes)
  finally:
    os.close(fd)


def pread(file: pathlib.Path, offset: int, buf: np.ndarray) -> int:
  """Fills buf (ALIGN-aligned in address and length) from file at offset (aligned too), with O_DIRECT where the filesystem
  takes it; returns the bytes read, fewer only at the end of the file (Linux completes reads of regular
  files up to 2 GB)."""
  fd, _ = open_direct(file, os.O_RDONLY)
  try:
    return os.preadv(fd, [buf], offset)
  finally:
    os.close(fd)


class Rows(Protocol):
  """A tensor whose blocks of rows (along axis 0) can be read one at a time."""
  shape: tuple[int, ...]
  dtype: np.dtype

  def reshape(self, shape: tuple[int, ...]) -> Rows:
    """The same data as a C-order array of `shape`."""

  def read(self, start: int, stop: int, pool: BufferPool) -> contextlib.AbstractContextManager[
      np.ndarray]:
    """Rows [start, stop), valid until the block exits (their buffer goes back to pool)."""
