"""Where a conversion may write, and the temporary directory it writes into before the atomic rename.

Nothing the user did not ask for is removed: DST must not be, contain or lie inside SRC (compared after
resolving symlinks, and by inode, so bind mounts and symlinked parents count); `--overwrite` replaces
only an empty directory or one that qwenvl-convert wrote (its marker); the only other directories ever
removed are our own temporary ones for the same DST whose writer is gone.

A temporary directory is DST.tmp-XXXXXXXX with an owner file (pid, host) that its writer holds locked
(flock) until the rename: a lock that can be taken means the writer died, and a later conversion into
DST removes the directory; one still held is a conversion running now, and is never touched.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import secrets
import shutil
import socket
import sys
from typing import Iterator

from qwenvl_jax.layout import (EXPORT_MARKER, MARKER, OWNER_FILE, SAFETENSORS_INDEX, Kind, describe_directory,
                               is_params_dir, leftover_note, read_owner, temporary_dirs)

# What may replace: an empty directory or an output of ours (either direction).
REPLACEABLE = (Kind.EMPTY, Kind.CONVERTED, Kind.EXPORTED)
# Inside a temporary directory that holds a DST being replaced, until the new one is in place.
REPLACED = 'replaced'


class UnsafeDestinationError(ValueError):
  """A destination that would overwrite or mix with something not meant to be replaced."""


def _overlap(src: pathlib.Path, dst: pathlib.Path) -> str | None:
  """How dst overlaps src ('is', 'lies inside', 'contains'), or None."""
  s, d = src.resolve(strict=True), dst.resolve()
  if s == d:
    return 'is'
  if s in d.parents:
    return 'lies inside'
  if d in s.parents:
    return 'contains'
  # The same directory under another path (a bind mount): compare inodes along both paths.
  s_stat = s.stat()
  if any(p.exists() and os.path.samestat(p.stat(), s_stat) for p in (d, *d.parents)):
    return 'lies inside'
  if d.exists():
    d_stat = d.stat()
    if any(os.path.samestat(p.stat(), d_stat) for p in s.parents):
      return 'contains'
  return None


def _writable_parent(dst: pathlib.Path) -> None:
  """Raises unless dst's nearest existing ancestor is a directory we may create entries in."""
  parent = dst.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise NotADirectoryError(f'cannot create {dst}: {parent} is a file, not a directory')
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f'cannot create {dst}: no permission to write in {parent}')


def check_destination(src: pathlib.Path | None, dst: pathlib.Path, overwrite: bool) -> pathlib.Path:
  """dst, absolute with its parents' symlinks resolved, once it is safe to write (replace with
  `overwrite`); otherwise an error saying why, what dst is and what would be safe. `src` None: written
  from memory, no source directory to keep apart."""
  relation = _overlap(src, dst) if src is not None else None
  if relation:
    raise UnsafeDestinationError(
        f'destination {dst} {relation} the source {src}: refusing to write there (it would replace or mix '
        'with the source); choose a destination outside the source')
  if dst.is_symlink():
    raise UnsafeDestinationError(f'destination {dst} is a symbolic link (to {os.readlink(dst)}); name the '
                                 'directory itself')
  dst = dst.resolve()
  if not dst.name:
    raise UnsafeDestinationError(f'destination {dst} is the filesystem root')
  _writable_parent(dst)
  found = describe_directory(dst)
  if found.kind is Kind.MISSING:
    return dst
  if found.kind is Kind.FILE:
    raise FileExistsError(f'destination {dst} is a file; the destination is a directory that '
                          'qwenvl-convert creates')
  if found.kind not in REPLACEABLE:
    raise FileExistsError(
        f'destination {dst} already exists and is {found.what}; --overwrite replaces only an empty '
        f'directory or one written by qwenvl-convert, so choose another destination{leftover_note(dst)}')
  if not overwrite:
    raise FileExistsError(f'destination {dst} already exists ({found.what}); pass --overwrite to replace '
                          f'it{leftover_note(dst)}')
  return dst


@contextlib.contextmanager
def _owned_directory(dst: pathlib.Path) -> Iterator[pathlib.Path]:
  """A new DST.tmp-XXXXXXXX, created as mkdir does (the umask applies), with our owner file locked
  until the block exits; the directory itself is left to the caller."""
  while True:
    tmp = dst.with_name(f'{dst.name}.tmp-{secrets.token_hex(4)}')
    try:
      tmp.mkdir(0o777)
      break
    except FileExistsError:
      continue
  # Locked before it takes its name: an owner file that can be locked always means a dead writer.
  fd = os.open(tmp / f'{OWNER_FILE}.new', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with contextlib.suppress(OSError):  # a filesystem without locks: the directory then stays unclaimed
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), 'dst': str(dst)}).encode())
    os.rename(tmp / f'{OWNER_FILE}.new', tmp / OWNER_FILE)
    yield tmp
  finally:
    os.close(fd)


def _ours(tmp: pathlib.Path) -> bool:
  """Whether tmp holds nothing but what a conversion or an export writes."""
  names = {OWNER_FILE, MARKER, EXPORT_MARKER, SAFETENSORS_INDEX, REPLACED, 'config.json',
           'generation_config.json', 'qwen.tiktoken', 'quantize_config.json'}
  return all(p.name in names or is_params_dir(p.name)
             or (p.name.startswith('model-') and p.name.endswith('.safetensors')) for p in tmp.iterdir())


def remove_stale(dst: pathlib.Path) -> None:
  """Removes the temporary directories that conversions into dst left when they died; refuses to start
  while another conversion into dst runs. Leftovers that cannot be judged are named, never removed."""
  for d in temporary_dirs(dst):
    if d.kind is Kind.WRITING:
      raise FileExistsError(f'another conversion into {dst} is running: {d.path} is {d.what}; wait for it '
                            'or choose another destination')
    if not _ours(d.path):
      continue
    owner = read_owner(d.path)
    if not owner or owner.get('host') != socket.gethostname():
      # No owner file (an older version), or another host's lock, which a shared filesystem may not show.
      print(f'qwenvl-convert: note: {d.path} is {d.what}; delete it once no conversion into {dst} is '
            'running', file=sys.stderr)
      continue
    try:
      fd = os.open(d.path / OWNER_FILE, os.O_RDONLY)
    except FileNotFoundError:  # its writer finished or another run removed it meanwhile
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while removing: no one else judges it now
    except OSError:
      os.close(fd)
      continue
    try:
      shutil.rmtree(d.path)
      print(f'qwenvl-convert: removed {d.path}, left by a conversion into {dst} that did not finish',
            file=sys.stderr)
    finally:
      os.close(fd)


@contextlib.contextmanager
def atomic_directory(src: pathlib.Path | None, dst: pathlib.Path, overwrite: bool = False
                     ) -> Iterator[pathlib.Path]:
  """Yields an empty DST.tmp-XXXXXXXX next to dst (after check_destination and remove_stale), renamed to
  dst only when the block finishes; a replaced dst is removed only then.

  On any error (Ctrl-C included) the temporary directory is removed; a killed process leaves it, and its
  marker is missing (written last), so it never loads; the next conversion into dst removes it.
  """
  dst = check_destination(src, dst, overwrite)
  remove_stale(dst)
  dst.parent.mkdir(parents=True, exist_ok=True)
  with _owned_directory(dst) as tmp:
    try:
      yield tmp
      (tmp / OWNER_FILE).unlink()  # still locked: a finished output carries no owner file
      if dst.exists():
        check_destination(src, dst, overwrite)  # it may have changed while we wrote
        with _owned_directory(dst) as old:
          os.rename(dst, old / REPLACED)
          try:
            os.rename(tmp, dst)
          except BaseException:
            os.rename(old / REPLACED, dst)
            raise
          shutil.rmtree(old)
      else:
        os.rename(tmp, dst)
      _fsync_dir(dst.parent)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
