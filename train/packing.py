"""`qwenvl-data pack`: training records with their image files, or WebDataset tar shards, into a packed
dataset (ArrayRecord shards holding every record with its encoded image bytes, train/packed.py).

Streaming: one record (and its images) is in memory at a time, whatever the size of the source (a .json
list is parsed whole; .jsonl files and tar shards are read record by record). Every record is checked as
training would check it (fields, markup, image paths that fit the image span, images that decode fully);
a bad one stops the pack naming it (on_bad_record='error') or is left out and listed in DST/skipped.jsonl
('skip'). The shards are written into a hidden directory beside DST, renamed to DST when complete: an
interrupted pack leaves nothing that loads as a finished dataset.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tarfile
from typing import Any, Iterator

from qwenvl_jax.images import ImageLoader
from train.data import check_record, chat_values, image_paths, prompt_answer
from train.packed import KIND, MANIFEST, VERSION, encode_images
from train.validate import read_records, tag_problems

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
SKIPPED = 'skipped.jsonl'


class PackError(ValueError):
  """A record that cannot be packed (on_bad_record=error), or a source that cannot be read."""


@dataclasses.dataclass(frozen=True)
class Sample:
  """One source record: where it is (for messages), its record, its images' bytes by the name it uses."""
  where: str
  key: str
  record: Any
  images: dict[str, bytes]
  problem: str = ''  # found while reading (an image file missing)


def json_samples(src: pathlib.Path, data_format: str, root: pathlib.Path) -> Iterator[Sample]:
  """Records of a .json list or a .jsonl file (one line at a time), images read from files under root."""
  files = ImageLoader(allowed_root=root)
  if src.suffix == '.jsonl':
    def records():
      with open(src, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
          if line.strip():
            try:
              yield f'{src} line {n}', json.loads(line)
            except json.JSONDecodeError as e:
              yield f'{src} line {n}', PackError(f'not valid JSON: {e.msg} at column {e.colno}')
  else:
    def records():
      for i, r in enumerate(read_records(src)[0]):
        yield f'{src} record {i}', r
  for i, (where, record) in enumerate(records()):
    if isinstance(record, PackError):
      yield Sample(where, str(i), None, {}, str(record))
      continue
    images, problem = {}, ''
    try:
      for path in image_paths(record, data_format) if isinstance(record, dict) else ():
        images[path] = files.resolve(path).read_bytes()
    except (ValueError, TypeError, KeyError):
      pass  # the record's own problem, reported by the check
    except OSError as e:
      problem = f'image {e.filename or ""}: {e.strerror or e}' if isinstance(e, FileNotFoundError) else str(e)
    key = str(record.get('id', i)) if isinstance(record, dict) else str(i)
    yield Sample(where, key, record, images, problem)


def tar_samples(src: pathlib.Path, data_format: str) -> Iterator[Sample]:
  """WebDataset shards (a .tar file or a directory of them): the members of a key (path up to the first dot
  of the file name) make one sample: an image (.jpg/.png/...), a caption (.txt) and/or a record (.json)."""
  tars = sorted(src.glob('*.tar')) if src.is_dir() else [src]
  if not tars:
    raise PackError(f'{src}: no .tar files')
  for tar in tars:
    group: dict[str, bytes] = {}
    key = None
    with tarfile.open(tar, mode='r|*') as stream:  # sequential: members are never all in memory
      for member in stream:
        if not member.isfile():
          continue
        directory, _, name = member.name.rpartition('/')
        stem, _, ext = name.partition('.')
        k = f'{directory}/{stem}' if directory else stem
        if k != key and key is not None:
          yield _webdataset_sample(tar, key, group, data_format)
          group = {}
        key = k
        group[ext.lower()] = stream.extractfile(member).read()
    if key is not None:
      yield _webdataset_sample(tar, key, group, data_format)


def _webdataset_sample(tar: pathlib.Path, key: str, members: dict[str, bytes], data_format: str) -> Sample:
  where = f'{tar} key {key}'
  stem = key.rpartition('/')[2]
  image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
  images = {f'{stem}.{image_ext}': members[image_ext]} if image_ext else {}
  try:
    record = json.loads(members['json']) if 'json' in members else {}
  except json.JSONDecodeError as e:
    return Sample(where, key, None, images, f'{stem}.json is not valid JSON: {e.msg}')
  if not isinstance(record, dict):
    return Sample(where, key, None, images, f'{stem}.json is not a JSON object')
  if data_format == 'caption':  # img2dataset's .json holds url, status, sizes ...: keep what is trained on
    caption = members['txt'].decode('utf-8', 'replace') if 'txt' in members else record.get('caption')
    record = {'image': next(iter(images), None), 'caption': caption}
    record = {k: v for k, v in record.items() if v is not None}
  elif data_format == 'multitask' and images and 'image' not in record:
    record['image'] = next(iter(images))
  return Sample(where, key, record, images)


def problem(sample: Sample, data_format: str, span: int, decoder: ImageLoader) -> str:
  """Why the sample cannot be trained on, or ''."""
  if sample.problem:
    return sample.problem
  try:
    check_record(sample.record, data_format, span)
    texts = chat_values(sample.record) if data_format == 'chat' else prompt_answer(sample.record, data_format)
  except ValueError as e:
    return str(e)
  for text in texts:
    if reasons := tag_problems(text):
      return reasons[0]
  for path in image_paths(sample.record, data_format):
    if path not in sample.images:
      return f'image {path!r} is not in the sample'
    try:
      decoder.load(sample.images[path])  # a full decode: a truncated file fails here, not in training
    except ValueError as e:
      return str(e).replace(f'<{len(sample.images[path])} bytes>', repr(path))
  return ''


class _ShardWriter:
  def __init__(self, directory: pathlib.Path, shard_size: int):
    self.directory, self.shard_size = directory, shard_size
    self.shards: list[dict] = []
    self.writers = None

  def add(self, key: str, record: Any, images: dict[str, bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter
    if self.writers is None:
      n = len(self.shards)
      shard = {'texts': f'texts-{n:05d}.array_record', 'images': f'images-{n:05d}.array_record', 'records': 0}
      self.shards.append(shard)
      # group_size:1 gives random access to single records (grain reads them in shuffled order)
      self.writers = [ArrayRecordWriter(str(self.directory / shard[k]), 'group_size:1')
                      for k in ('texts', 'images')]
    self.writers[0].write(json.dumps({'key': key, 'record': record}).encode('utf-8'))
    self.writers[1].write(encode_images(list(images.items())))
    self.shards[-1]['records'] += 1
    if self.shards[-1]['records'] == self.shard_size:
      self.close()

  def close(self) -> None:
    for w in self.writers or ():
      w.close()
    self.writers = None


def pack(src: str | os.PathLike, dst: str | os.PathLike, data_format: str, shard_size: int = 10000,
         on_bad_record: str = 'error', image_root: str | os.PathLike | None = None, span: int = 256,
         say=print) -> dict:
  """Packs SRC into DST (which must not exist); returns the manifest."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if on_bad_record not in ('error', 'skip'):
    raise ValueError(f'on_bad_record must be error or skip, got {on_bad_record!r}')
  if shard_size < 1:
    raise ValueError(f'shard_size must be positive, got {shard_size}')
  if not src.exists():
    raise FileNotFoundError(f'{src}: no such file or directory')
  if dst.exists():
    raise FileExistsError(f'{dst} exists: remove it or choose another destination')
  if src.suffix in ('.json', '.jsonl'):
    samples = json_samples(src, data_format, pathlib.Path(image_root or src.resolve().parent).resolve())
  else:
    samples = tar_samples(src, data_format)
  tmp = dst.parent / f'.{dst.name}.partial-{os.getpid()}'
  tmp.mkdir(parents=True)
  writer, decoder, skipped, total = _ShardWriter(tmp, shard_size), ImageLoader(), 0, 0
  try:
    with open(tmp / SKIPPED, 'w', encoding='utf-8') as log:
      for sample in samples:
        total += 1
        if reason := problem(sample, data_format, span, decoder):
          if on_bad_record == 'error':
            raise PackError(f'{sample.where}: {reason} (--on-bad-record skip leaves such records out, '
                            f'listed in {dst / SKIPPED}); nothing was written to {dst}')
          skipped += 1
          log.write(json.dumps({'record': sample.where, 'key': sample.key, 'reason': reason}) + '\n')
          continue
        writer.add(sample.key, sample.record, sample.images)
    writer.close()
    if not skipped:
      (tmp / SKIPPED).unlink()
    packed = sum(s['records'] for s in writer.shards)
    if not packed:
      raise PackError(f'{src}: none of its {total} records can be packed; nothing was written')
    manifest = {'kind': KIND, 'version': VERSION, 'data_format': data_format, 'source': str(src),
                'records': packed, 'skipped': skipped, 'shards': writer.shards}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + '\n')  # last: marks the pack complete
    os.rename(tmp, dst)
  except BaseException:
    writer.close()
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  say(f'packed {packed} of {total} records of {src} into {len(writer.shards)} shard(s) in {dst}'
      + (f'; {skipped} skipped, listed in {dst / SKIPPED}' if skipped else ''))
  return manifest
