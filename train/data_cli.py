"""`qwenvl-data`: prepare training data. `qwenvl-data pack SRC DST` (train/packing.py)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from train.config import DATA_FORMATS


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='qwenvl-data', description=__doc__.split('\n\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  p = commands.add_parser('pack', help='records and their images into ArrayRecord shards for training',
                          description='JSON/JSONL records with image files, or WebDataset tar shards '
                          '(.jpg/.png + .txt/.json per key), into ArrayRecord shards holding every record '
                          'with its encoded image bytes, and a manifest; train on it with data=DST.')
  p.add_argument('src', help='a .json or .jsonl file of records, a WebDataset .tar, or a directory of .tar')
  p.add_argument('dst', help='the packed dataset directory to create (must not exist)')
  p.add_argument('--format', choices=DATA_FORMATS, default='caption', help='the data_format trained on')
  p.add_argument('--shard-size', type=int, default=10000, help='records per shard (default 10000)')
  p.add_argument('--on-bad-record', choices=('error', 'skip'), default='error',
                 help='a record that cannot be trained on: stop naming it (default), or leave it out and '
                 'list it in DST/skipped.jsonl')
  p.add_argument('--image-root', default=None, help='image paths of a JSON source are relative to it '
                 "(default: the file's folder)")
  p.add_argument('--image-span', type=int, default=256,
                 help="the model's image span (n_queries, 256 for Qwen-VL): image paths must fit in it")
  args = parser.parse_args(argv)
  from train.packing import pack
  try:
    pack(args.src, args.dst, args.format, args.shard_size, args.on_bad_record, args.image_root,
         args.image_span)
  except (ValueError, OSError) as e:
    print(f'qwenvl-data: error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
