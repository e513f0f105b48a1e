"""`qwenvl-convert SRC DST`: released Hugging Face checkpoint -> Orbax; `--to-hf` for the way back.

A GPTQ Int4 source (Qwen-VL-Chat-Int4: `quantization_config` in config.json) is dequantized, to float32
unless --dtype says otherwise; `--to-int4` rewrites it in the Int4 layout through the packed form.

Exit status: 0 done, 1 the checkpoint or a path is wrong (the message names what), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import re
import sys

from convert.core import DEFAULT_SHARD_SIZE

_UNITS = {'': 1, 'B': 1, 'K': 10**3, 'KB': 10**3, 'M': 10**6, 'MB': 10**6, 'G': 10**9, 'GB': 10**9,
          'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30}


def parse_size(text: str) -> int:
  """'2GB' (10^9), '500MiB' (2^20), '1e9' or '123' bytes."""
  m = re.fullmatch(r'\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*', text)
  if not m or m.group(2).upper() not in _UNITS:
    raise argparse.ArgumentTypeError(f'not a size: {text!r} (e.g. 2GB, 500MiB, 1e9)')
  size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
  if size <= 0:
    raise argparse.ArgumentTypeError(f'size must be positive: {text!r}')
  return size


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='qwenvl-convert',
      description='Convert a released Qwen-VL checkpoint (safetensors, or pytorch_model*.bin with the torch '
                  'extra) into an Orbax checkpoint for qwenvl_jax, or back with --to-hf.')
  p.add_argument('src', help='released-layout directory (or, with --to-hf, a converted directory)')
  p.add_argument('dst', help='output directory, outside src; must not exist unless --overwrite')
  direction = p.add_mutually_exclusive_group()
  direction.add_argument('--to-hf', action='store_true',
                         help='export a converted directory to the released layout (sharded safetensors '
                              '+ index)')
  direction.add_argument('--to-int4', action='store_true',
                         help='rewrite a GPTQ Int4 checkpoint in its layout through the packed form (every '
                              'tensor checked; sharded by --shard-size)')
  p.add_argument('--dtype', choices=('bfloat16', 'float16', 'float32'),
                 help='stored dtype (default: the source\'s, which keeps the conversion bit-exact; a GPTQ '
                      'Int4 source is dequantized to float32; with --to-int4 the float tensors\', float16)')
  p.add_argument('--shard-size', type=parse_size, default=DEFAULT_SHARD_SIZE,
                 help='with --to-hf or --to-int4: bytes per safetensors shard (default 2GB)')
  p.add_argument('--overwrite', action='store_true',
                 help='replace dst if it exists and is an empty directory or one qwenvl-convert wrote')
  p.add_argument('--quiet', action='store_true', help='no progress bar')
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from absl import logging as absl_logging  # Orbax logs through absl
  from convert.core import hf_to_orbax, orbax_to_hf  # after parsing: --help stays fast
  from convert.int4 import rewrite_int4
  absl_logging.set_verbosity(absl_logging.FATAL)  # our errors say it better; Ctrl-C logs a traceback
  try:
    if args.to_int4:
      out = rewrite_int4(args.src, args.dst, dtype=args.dtype, shard_size=args.shard_size,
                         overwrite=args.overwrite)
    elif args.to_hf:
      out = orbax_to_hf(args.src, args.dst, dtype=args.dtype, shard_size=args.shard_size,
                        overwrite=args.overwrite, progress=not args.quiet)
    else:
      out = hf_to_orbax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                        progress=not args.quiet)
  except (ValueError, OSError, ImportError) as e:  # bad checkpoints and paths; anything else is a bug
    print(f'qwenvl-convert: error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f'qwenvl-convert: interrupted; {args.dst} was not written', file=sys.stderr)
    return 130
  if not args.quiet:
    print(f'wrote {out}', file=sys.stderr)
  return 0
