"""What a directory holds: the file names of each checkpoint layout, and `describe_directory`, the one
diagnosis behind every "wrong kind of directory" message (qwenvl-convert both ways, load_pretrained).

A message says what the directory is and what to do with it; only a directory that qwenvl-convert
itself wrote is ever called deletable.
"""
from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import glob
import json
import os
import pathlib
import re

SAFETENSORS_INDEX = 'model.safetensors.index.json'
BIN_INDEX = 'pytorch_model.bin.index.json'
SINGLE_FILES = ('model.safetensors', 'pytorch_model.bin')
PARAMS_DIR = 'params'
MARKER = 'qwenvl_checkpoint.json'  # written last into a converted directory: "this conversion finished"
EXPORT_MARKER = 'qwenvl_export.json'  # written last by --to-hf: "this released layout is ours to replace"
# Inside a conversion's temporary directory: which process writes it (JSON), locked while it runs.
OWNER_FILE = '.qwenvl-convert-owner.json'
# DST.tmp- plus 8 characters: the temporary directory a conversion into DST writes before its rename.
TMP_NAME = re.compile(r'(?P<dst>.+)\.tmp-[a-z0-9_]{8}')
_ORBAX_FILES = ('_CHECKPOINT_METADATA', '_METADATA', 'manifest.ocdbt')


class Kind(enum.Enum):
  MISSING = 'missing'
  FILE = 'file'
  EMPTY = 'empty'
  RELEASED = 'released'  # config.json + safetensors or .bin weights
  EXPORTED = 'exported'  # the released layout, written by qwenvl-convert --to-hf
  CONVERTED = 'converted'  # an Orbax checkpoint written by qwenvl-convert (our marker)
  WRITING = 'writing'  # the temporary directory of a conversion still running
  INTERRUPTED = 'interrupted'  # a conversion that never finished
  ORBAX = 'orbax'  # Orbax checkpoint(s) without our marker, e.g. a training run's
  OTHER = 'other'


class IncompleteCheckpointError(ValueError):
  """A converted directory whose conversion never finished."""


class NotACheckpointError(ValueError):
  """A directory that is not the kind of checkpoint asked for."""


@dataclasses.dataclass(frozen=True)
class Directory:
  path: pathlib.Path
  kind: Kind
  what: str  # a noun phrase: 'a checkpoint in the released Hugging Face layout (...)'
  ours_to_delete: bool = False  # a temporary directory of qwenvl-convert


def is_params_dir(name: str) -> bool:
  """params/, or the params.orbax-checkpoint-tmp-* that Orbax writes before renaming it to params/."""
  return name == PARAMS_DIR or name.startswith(f'{PARAMS_DIR}.orbax-checkpoint-tmp')


def read_owner(tmp: pathlib.Path) -> dict | None:
  """The owner record of one of our temporary directories ({'pid', 'host', 'dst'}), or None."""
  try:
    owner = json.loads((tmp / OWNER_FILE).read_text())
  except (OSError, ValueError):
    return None
  return owner if isinstance(owner, dict) else None


def owner_running(tmp: pathlib.Path) -> bool | None:
  """Whether the process that made temporary directory `tmp` still holds its lock; None: cannot tell
  (no owner file, or a filesystem without locks)."""
  try:
    fd = os.open(tmp / OWNER_FILE, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return False
  except OSError as e:
    return True if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
  finally:
    os.close(fd)  # releases our shared lock


def _released_what(names: set[str]) -> str | None:
  """'config.json, 3 weight files' for a released layout, else None."""
  shards = sorted(n for n in names if n.endswith('.safetensors') or re.fullmatch(r'pytorch_model.*\.bin', n))
  if not ({SAFETENSORS_INDEX, BIN_INDEX} & names or set(SINGLE_FILES) & names):
    return None
  config = 'config.json' if 'config.json' in names else 'no config.json'
  return f'{config}, {len(shards)} weight file{"s" * (len(shards) != 1)}'


def _has_orbax(root: pathlib.Path, depth: int = 2) -> bool:
  """Orbax metadata here or up to `depth` levels down (a CheckpointManager directory holds a directory
  per step, and those one per item); at most 100 entries a level are looked at."""
  if any((root / f).exists() for f in _ORBAX_FILES):
    return True
  try:
    children = sorted(root.iterdir())[:100] if depth > 0 else []
  except OSError:  # unreadable: not ours to judge
    return False
  return any(_has_orbax(c, depth - 1) for c in children if c.is_dir())


def describe_directory(path: str | os.PathLike) -> Directory:
  """What `path` is, from the names of its files (nothing large is read)."""
  root = pathlib.Path(path)
  if not root.exists():
    return Directory(root, Kind.MISSING, 'not found (no such file or directory)')
  if not root.is_dir():
    return Directory(root, Kind.FILE, 'a file, not a directory')
  names = {p.name for p in root.iterdir()}
  tmp = TMP_NAME.fullmatch(root.name)
  if not names:
    return Directory(root, Kind.EMPTY, 'an empty directory')
  params = any(is_params_dir(n) for n in names)
  if tmp and (OWNER_FILE in names or params):
    owner = read_owner(root) or {}
    by = f'process {owner.get("pid")} on {owner.get("host")}' if owner else 'an unknown process'
    into = root.parent / tmp['dst']
    if owner_running(root):
      return Directory(root, Kind.WRITING, f'the temporary directory of a conversion into {into} that is '
                       f'still running ({by})')
    return Directory(root, Kind.INTERRUPTED,
                     f'the temporary directory of an interrupted conversion into {into} ({by}; '
                     'qwenvl-convert renames it to its destination only once complete)', ours_to_delete=True)
  if MARKER in names:
    return Directory(root, Kind.CONVERTED, f'a converted Orbax checkpoint ({PARAMS_DIR}/, {MARKER})')
  released = _released_what(names)
  if released and EXPORT_MARKER in names:
    return Directory(root, Kind.EXPORTED, f'a checkpoint in the released Hugging Face layout ({released}), '
                     'exported by qwenvl-convert --to-hf')
  if released:
    return Directory(root, Kind.RELEASED, f'a checkpoint in the released Hugging Face layout ({released})')
  if params:
    return Directory(root, Kind.INTERRUPTED, f'an unfinished conversion ({PARAMS_DIR}/ but {MARKER} missing: '
                     'the conversion, or a copy of it, was interrupted)')
  if _has_orbax(root):
    return Directory(root, Kind.ORBAX, f'an Orbax checkpoint not written by qwenvl-convert (no {MARKER})')
  shown = sorted(names)[:5]
  more = f', ... ({len(names)} entries)' if len(names) > len(shown) else ''
  return Directory(root, Kind.OTHER, f'a directory with no checkpoint files in it ({", ".join(shown)}{more})')


_RELEASED = ('it is already in the released layout: load_pretrained loads it as it is, and '
             'qwenvl-convert {path} DST (without --to-hf) converts it to Orbax')
_LAYOUTS = (f'a checkpoint is config.json plus model.safetensors (or shards and {SAFETENSORS_INDEX}), or a '
            'directory written by qwenvl-convert')
_ADVICE = {
    Kind.RELEASED: _RELEASED,
    Kind.EXPORTED: _RELEASED,
    Kind.CONVERTED: 'it is already converted: load_pretrained loads it, and '
                    'qwenvl-convert --to-hf {path} DST exports it to the released layout',
    Kind.INTERRUPTED: 'run qwenvl-convert again',
    Kind.WRITING: 'wait for that conversion to finish, then use its destination',
    Kind.ORBAX: f'qwenvl_jax reads Orbax params from a directory that qwenvl-convert wrote ({PARAMS_DIR}/, '
                f'config.json, {MARKER})',
    Kind.OTHER: _LAYOUTS,
    Kind.EMPTY: _LAYOUTS,
}


def wrong_kind(d: Directory, expected: str) -> Exception:
  """The error for `d` where `expected` (a noun phrase) was needed: what it is and what to do with it."""
  if d.kind is Kind.MISSING:
    return FileNotFoundError(f'{d.path} not found (expected {expected}){leftover_note(d.path)}')
  if d.kind is Kind.FILE:
    return NotADirectoryError(f'{d.path} is a file, not {expected}')
  message = f'{d.path} is {d.what}, not {expected}'
  if d.kind in _ADVICE:
    message += '; ' + _ADVICE[d.kind].format(path=d.path)
  if d.ours_to_delete:
    message += ('. This directory is qwenvl-convert\'s own temporary output: the next conversion into '
                'the same destination removes it, or delete it once no conversion is writing it')
  incomplete = d.kind in (Kind.INTERRUPTED, Kind.WRITING)
  return (IncompleteCheckpointError if incomplete else NotACheckpointError)(message)


def temporary_dirs(dst: pathlib.Path) -> list[Directory]:
  """Our temporary directories for `dst` lying next to it: conversions into dst running or interrupted."""
  if not dst.parent.is_dir():
    return []
  found = [describe_directory(p) for p in sorted(dst.parent.glob(f'{glob.escape(dst.name)}.tmp-*'))
           if p.is_dir() and not p.is_symlink() and TMP_NAME.fullmatch(p.name)]
  return [d for d in found if d.kind in (Kind.INTERRUPTED, Kind.WRITING)]


def leftover_note(dst: pathlib.Path) -> str:
  """' (...)' naming the temporary directories of conversions into dst, running or interrupted; or ''."""
  left = temporary_dirs(dst)
  notes = [f'{d.path} is {d.what}' for d in left]
  if any(d.ours_to_delete for d in left):
    notes.append('running the conversion again removes what an interrupted one left')
  return f' ({"; ".join(notes)})' if notes else ''
