"""`qwenvl-train --config stage2 data=train.jsonl init_from=ckpt/ [key=value ...] [--resume]`.

On several hosts every host runs the same command, with `--coordinator HOST:PORT --num-processes N
--process-id I` (or $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID), or
`--auto-distributed` where the cluster tells JAX (Cloud TPU pod slices, SLURM, Open MPI).

Exit status: 0 when the run ends (or, resumed, has nothing left to do), 1 when it cannot start or go on
(`qwenvl-train: error: ...` on stderr, with what to do), 2 for a bad command line or config file.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from qwenvl_jax import distributed, xla_flags
from train.config import TrainConfig
from train.run_dir import TrainError

PROG = 'qwenvl-train'


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog=PROG, description='Train Qwen-VL: one stage of the paper per run.',
      epilog='Overrides are key=value pairs of TrainConfig fields, in any order with the flags (values parse '
             'as JSON when they can), e.g. steps=100 peak_lr=1e-5 seq_buckets=[512,1024] lora=true. '
             'init_from may name a released or converted checkpoint or the out_dir of an earlier run.')
  parser.add_argument('--config', required=True,
                      help='a JSON config file, or a packaged one: stage1, stage2, stage3')
  parser.add_argument('overrides', nargs='*', metavar='key=value')
  parser.add_argument('--resume', action='store_true',
                      help='continue from the latest readable checkpoint in out_dir (params, optimizer, data '
                           'order); exits 0 with a message when steps is already reached')
  parser.add_argument('--stop-after', type=int, default=None, metavar='N',
                      help='stop (with a checkpoint) after N steps in all, keeping the schedule of `steps`')
  parser.add_argument('--mesh', default='',
                      help='device mesh, e.g. "data=-1" or "fsdp=8" or "data=2,fsdp=4,tensor=1" '
                           '(default: one device)')
  parser.add_argument('--rules', default='', help='parameter sharding rules: fsdp, tp, fsdp_tp')
  parser.add_argument('--print-config', action='store_true', help='print the resolved config and exit')
  parser.add_argument('--no-progress', action='store_true', help='no progress bar (metrics file only)')
  distributed.add_arguments(parser)
  # Intermixed: `key=value` may come before, between or after the flags.
  return parser.parse_intermixed_args(argv)


def _error(message: str, status: int) -> int:
  print(f'{PROG}: error: {message}', file=sys.stderr)
  return status


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    cfg = TrainConfig.from_json(args.config, args.overrides)
  except (ValueError, FileNotFoundError) as e:
    return _error(str(e), 2)
  if args.print_config:
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0
  if cfg.dtype != 'float32':  # low-precision compute: no float32 copy of every weight on the CPU
    xla_flags.use_for_low_precision_cpu()  # before JAX starts its backend (qwenvl_jax/xla_flags.py)
  try:
    distributed.initialize_from_args(args)  # before any device is touched
  except ValueError as e:
    return _error(str(e), 2)
  from train.trainer import run
  try:
    _, _, logged = run(cfg, resume=args.resume, mesh=args.mesh, rules=args.rules,
                       progress=not args.no_progress, stop_after=args.stop_after)
  except (TrainError, ValueError, OSError) as e:
    # The user's to fix (data, paths, settings), so a message and not a traceback; JAX's and Orbax's
    # internal errors are RuntimeErrors of other kinds and still show theirs.
    return _error(str(e), 1)
  if logged and distributed.is_main():
    print(f'step {logged[-1]["step"]}: loss {logged[-1]["loss"]:.4f}; metrics in {cfg.out_dir}/metrics.jsonl')
  return 0


if __name__ == '__main__':
  sys.exit(main())
