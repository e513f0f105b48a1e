"""Command-line options that set up JAX before it starts: the weights' dtype (with the low-precision CPU
options it needs), their quantization at load (`quant.load`) and the persistent compilation cache. Shared by `qwenvl-jax chat` and `qwenvl-jax serve`.
"""
from __future__ import annotations

import argparse
import pathlib

DEFAULT_COMPILE_CACHE = pathlib.Path('~/.cache/qwenvl_jax/jax')


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help='parameter and compute dtype')
  add_weights_argument(parser)
  parser.add_argument('--compile-cache', default=str(DEFAULT_COMPILE_CACHE),
                      help='JAX persistent compilation cache directory (restarts skip compiling)')
  parser.add_argument('--no-compile-cache', action='store_true', help='do not use the compilation cache')


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--weights', default='float', choices=['float', 'int8', 'int4'],
                      help='weight-only quantization of the decoder and lm_head at load: int8 per output '
                           'channel, int4 in groups of 128 inputs (default: float, as --dtype)')


def check(args: argparse.Namespace) -> str | None:
  """A usage problem of these options, or None."""
  if not args.compile_cache and not args.no_compile_cache:
    return '--compile-cache is empty; pass a directory or --no-compile-cache'
  return None


def apply(args: argparse.Namespace) -> None:
  """Before JAX's first computation: the low-precision CPU options for bfloat16 weights
  (qwenvl_jax/xla_flags.py) and the compilation cache."""
  if args.dtype != 'float32':
    from qwenvl_jax import xla_flags
    xla_flags.use_for_low_precision_cpu()  # before jax starts its backend
  import jax
  if not args.no_compile_cache:
    jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(args.compile_cache).expanduser()))
