"""`qwenvl-eval`: `run` a benchmark with a checkpoint (sharded over processes, resumable) and `score` a
merged predictions file without the model. `tasks` lists the benchmarks."""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
from typing import Sequence, TextIO

from qwenvl_eval.tasks import TASKS


def _parser() -> argparse.ArgumentParser:
  from qwenvl_jax import distributed, runtime_options
  parser = argparse.ArgumentParser(prog='qwenvl-eval', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  run = sub.add_parser('run', help='predict and score a benchmark with a checkpoint')
  run.add_argument('task', choices=list(TASKS), metavar='TASK', help='one of: ' + ', '.join(TASKS))
  run.add_argument('--ckpt', required=True, help='checkpoint directory (released layout or converted)')
  run.add_argument('--vocab', help='qwen.tiktoken (default: the one in --ckpt, else $QWENVL_VOCAB)')
  run.add_argument('--data', required=True, help="the task's data file (layouts: qwenvl_eval.tasks)")
  run.add_argument('--image-root', required=True, help='image paths of the data file are relative to it')
  run.add_argument('--out', required=True, help='output directory; a rerun into it continues')
  run.add_argument('--annotations', help='VQA score: the official annotation JSON; ANLS: the gt JSON '
                   '(default: the data file\'s answers); captions: COCO JSON (default: --data)')
  run.add_argument('--questions', help='VQA score: the official question JSON')
  run.add_argument('--batch', type=int, default=1, help='records per generate call (answers do not '
                   'depend on it)')
  run.add_argument('--limit', type=int, help='only the first N records of the data file')
  run.add_argument('--mesh', help='shard the parameters over this process\'s devices, e.g. "tensor=4" or '
                   '"fsdp=8" (default: one device, the parameters whole)')
  run.add_argument('--rules', default=None, help='parameter sharding rules with --mesh (default: by mesh)')
  run.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  runtime_options.add_weights_argument(run)
  run.add_argument('--no-progress', action='store_true', help='no progress bar')
  distributed.add_arguments(run)
  score = sub.add_parser('score', help='score a predictions file (the original\'s merged layout)')
  score.add_argument('task', choices=list(TASKS), metavar='TASK', help='one of: ' + ', '.join(TASKS))
  score.add_argument('--predictions', required=True, help='a JSON list or JSON lines of predictions')
  score.add_argument('--annotations', help='VQA score: official annotations; ANLS: gt JSON; captions: COCO JSON')
  score.add_argument('--questions', help='VQA score: the official question JSON')
  score.add_argument('--subset', action='store_true', help='score only the answered questions of the '
                     'annotation file (the original refuses predictions that do not cover it)')
  sub.add_parser('tasks', help='list the tasks: prompt, metric, token budget')
  return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
  out = out or sys.stdout
  args = _parser().parse_args(argv)
  try:
    if args.command == 'score':
      return _score(args, out)
    if args.command == 'tasks':
      return _tasks(out)
    return _run(args, out)
  except (OSError, ValueError, KeyError, RuntimeError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130


def _score(args: argparse.Namespace, out: TextIO) -> int:
  from qwenvl_eval import scoring
  rows = scoring.read_predictions(args.predictions)
  result = scoring.score(args.task, rows, scoring.read_reference(args.annotations),
                         scoring.read_reference(args.questions), subset=args.subset)
  print(json.dumps({k: result[k] for k in ('task', 'metric', 'score')}), file=out)
  return 0


def _tasks(out: TextIO) -> int:
  for t in TASKS.values():
    print(f'{t.name:24} {t.metric:17} max_new_tokens={t.max_new_tokens:<4} {t.prompt!r}', file=out)
  return 0


def _run(args: argparse.Namespace, out: TextIO) -> int:
  if args.dtype != 'float32':
    from qwenvl_jax import xla_flags
    xla_flags.use_for_low_precision_cpu()  # before jax starts its backend (see qwenvl_jax/xla_flags.py)
  from qwenvl_jax import distributed
  distributed.initialize_from_args(args)
  from qwenvl_jax.model import QwenVL
  from qwenvl_jax.tokenizer import QwenVLTokenizer

  from qwenvl_eval import harness, scoring
  if args.limit is not None and args.limit < 1:
    raise ValueError(f'--limit must be at least 1, got {args.limit}')
  annotations = scoring.read_reference(args.annotations)
  questions = scoring.read_reference(args.questions)
  # Each process predicts its own records on its own first device (load_pretrained's default), or with
  # --mesh on its own devices, the params read straight onto them.
  import jax
  from qwenvl_jax import quant, sharding
  placement = contextlib.nullcontext()
  if args.mesh:
    mesh = sharding.make_mesh(args.mesh, devices=jax.local_devices())
    rules = args.rules or sharding.default_rules(dict(mesh.shape))
    params, config = quant.load_onto(args.ckpt, args.weights, args.dtype, mesh, rules)
    placement = sharding.use_rules(mesh, rules)
  else:
    params, config = quant.load(args.ckpt, args.weights, args.dtype)
  model = QwenVL(config)
  tokenizer = QwenVLTokenizer.from_pretrained(args.vocab or args.ckpt,
                                              image_span_length=model.config.vision.n_queries)
  kw = dict(image_root=args.image_root, out_dir=args.out, batch_size=args.batch, limit=args.limit,
            annotations=annotations, questions=questions, checkpoint=str(pathlib.Path(args.ckpt).resolve()),
            progress=not args.no_progress)
  with placement:  # with --mesh each process still takes its own records
    metrics = harness.run(args.task, model, params, tokenizer, args.data, **kw)
  if metrics is not None:
    print(json.dumps({k: metrics[k] for k in ('task', 'metric', 'score', 'count')}), file=out)
  return 0
