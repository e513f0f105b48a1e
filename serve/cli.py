"""`qwenvl-jax serve`: an OpenAI-compatible HTTP server for a Qwen-VL-Chat checkpoint.

Binds 127.0.0.1 unless --host says otherwise. SIGTERM (or Ctrl-C) stops accepting connections, lets the
requests in flight finish, then exits.
"""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from typing import Sequence

from qwenvl_jax import runtime_options
from serve.limits import Limits

API_KEY_ENV = 'QWENVL_JAX_API_KEY'
WARM_DEFAULT = (64, 128, 512)  # prompt buckets of text chats and of chats with one image (256 + tokens)


def add_arguments(p: argparse.ArgumentParser) -> None:
  d = Limits()
  p.add_argument('--ckpt', required=True, help='checkpoint directory (released layout or converted)')
  p.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this machine only)')
  p.add_argument('--port', type=int, default=8000)
  p.add_argument('--model-name', help='the model id clients send (default: the --ckpt directory name)')
  p.add_argument('--max-batch', type=int, default=8, help='requests decoded at once (rows of the KV cache)')
  p.add_argument('--max-len', type=int, default=2048, help='key slots per row: a prompt (padded to its '
                 'length bucket) plus max_tokens must fit; the cache holds max-batch x max-len tokens')
  p.add_argument('--max-prefill-tokens', type=int, default=8192, help='prompt tokens prefilled in one '
                 'program: waiting prompts of one length are prefilled together up to this many')
  p.add_argument('--max-queue', type=int, default=16, help='requests waiting; more get 429 with Retry-After')
  p.add_argument('--warm', type=int, nargs='*', metavar='TOKENS', help='compile at start the programs that '
                 'prompts of these many tokens run (--warm alone: %s, text and one-image chats); '
                 '/health answers 503 and requests get 503 until done' % ' '.join(map(str, WARM_DEFAULT)))
  p.add_argument('--image-root', metavar='DIR', help='image paths in requests must lie under DIR '
                 '(default: local paths are refused; send images as data URLs)')
  p.add_argument('--allow-urls', action='store_true', help='fetch http(s) image URLs (only for trusted '
                 'clients: the server reaches whatever it can reach)')
  p.add_argument('--api-key', help=f'require "Authorization: Bearer KEY" on /v1 (default: ${API_KEY_ENV})')
  p.add_argument('--max-request-bytes', type=int, default=d.max_request_bytes)
  p.add_argument('--max-image-bytes', type=int, default=d.max_image_bytes)
  p.add_argument('--max-image-pixels', type=int, default=d.max_image_pixels)
  p.add_argument('--max-images', type=int, default=d.max_images, help='images per request')
  p.add_argument('--url-timeout', type=float, default=d.url_timeout, help='seconds per image download')
  p.add_argument('--vocab', help='qwen.tiktoken (default: the one in --ckpt)')
  p.add_argument('--mesh', help='shard the parameters over this process\'s devices, e.g. "tensor=4" or '
                 '"data=2" (the KV cache is split by rows over data/fsdp where they divide --max-batch)')
  p.add_argument('--rules', help='parameter sharding rules with --mesh (default: by mesh)')
  runtime_options.add_arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='qwenvl-jax serve', description=__doc__.split('\n')[0])
  add_arguments(p)
  args = p.parse_args(argv)
  try:
    limits = Limits(args.max_request_bytes, args.max_image_bytes, args.max_image_pixels, args.max_images,
                    args.url_timeout)
    for flag, value, least in (('--max-batch', args.max_batch, 1), ('--max-queue', args.max_queue, 1),
                               ('--max-len', args.max_len, 64), ('--max-prefill-tokens', args.max_prefill_tokens, 1)):
      if value < least:
        raise ValueError(f'{flag} must be >= {least}, got {value}')
    if args.warm is not None:
      from qwenvl_jax.batching import Buckets  # (the engine checks that each fits a row)
      args.warm = tuple(args.warm) or tuple(n for n in WARM_DEFAULT if Buckets().length(n) < args.max_len)
      if any(n < 1 for n in args.warm):
        raise ValueError(f'--warm prompt lengths must be >= 1, got {args.warm}')
    if args.image_root is not None and not pathlib.Path(args.image_root).is_dir():
      raise ValueError(f'--image-root {args.image_root}: not a directory')
    if args.mesh:
      from qwenvl_jax.sharding import parse_mesh
      parse_mesh(args.mesh)
    if runtime_options.check(args):
      raise ValueError(runtime_options.check(args))
  except ValueError as e:
    p.error(str(e))
  try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn
  except ImportError as e:
    print(f"qwenvl-jax serve: error: {e}; install the serve extra: pip install 'qwenvl-jax[serve]'",
          file=sys.stderr)
    return 1
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  try:
    app = build(args, limits)
  except (OSError, ValueError) as e:
    print(f'qwenvl-jax serve: error: {e}', file=sys.stderr)
    return 1
  uvicorn.run(app, host=args.host, port=args.port, log_level='info')
  return 0


def build(args: argparse.Namespace, limits: Limits):
  """Loads the checkpoint and makes the app (the weights in the decode layout, one copy)."""
  ckpt = pathlib.Path(args.ckpt)
  if not ckpt.is_dir():
    raise FileNotFoundError(f'checkpoint directory not found: {ckpt}')
  runtime_options.apply(args)
  from qwenvl_jax import GenerationConfig, QwenVL, QwenVLTokenizer
  from qwenvl_jax.decode import decode_params
  from qwenvl_jax.tokenizer import check_tokenizer
  from serve.app import Service, create_app
  from serve.batch_engine import BatchEngine
  from serve.prompt import Preparer
  generation_config = GenerationConfig.from_pretrained(ckpt)
  from qwenvl_jax.quant import load, load_onto
  mesh = rules = None
  if args.mesh:
    import jax
    from qwenvl_jax import sharding
    mesh = sharding.make_mesh(args.mesh, devices=jax.local_devices())
    rules = args.rules or sharding.default_rules(dict(mesh.shape))
    # read straight onto the mesh (no device holds the whole model), then into the decode layout there
    params, config = load_onto(ckpt, args.weights, args.dtype, mesh, rules)
    params = sharding.shard_params(mesh, decode_params(params, consume=True), rules)
  else:
    params, config = load(ckpt, args.weights, args.dtype, split_layers=True)
    params = decode_params(params, consume=True)
  model = QwenVL(config)
  tokenizer = QwenVLTokenizer.from_pretrained(ckpt if args.vocab is None else args.vocab,
                                              image_span_length=model.config.vision.n_queries)
  check_tokenizer(tokenizer, model.config)
  engine = BatchEngine(model, params, max_batch=args.max_batch, max_queue=args.max_queue, max_len=args.max_len,
                       max_prefill_tokens=args.max_prefill_tokens, mesh=mesh, rules=rules)
  if args.warm:
    engine.start_warming(args.warm)
  preparer = Preparer(model, params, tokenizer, limits, args.image_root, args.allow_urls, fits=engine.check)
  service = Service(args.model_name or ckpt.resolve().name, tokenizer, generation_config, preparer, engine, limits,
                    args.api_key or os.environ.get(API_KEY_ENV) or None)
  return create_app(service)
