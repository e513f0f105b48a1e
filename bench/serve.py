"""Serving throughput: concurrent clients against the continuous-batching server, beside the same requests
served one at a time (the original `openai_api.py`'s design), in the same run.

Two servers on 127.0.0.1 over one set of weights: `--max-batch` rows, and one row (requests queue and
are answered one after another). For each client count, every client sends one streamed greedy request
for `--new` tokens (a different prompt each) at the same moment; reported: output tokens/s over the
whole wave, and time to first token (from sending to the first text) p50/p99. The language model is
bench.generate's (random weights, fp32) with the real vocabulary and tokenizer. Each server compiles its
programs for the prompts' length buckets first (`BatchEngine.warm`), so no compile falls inside a wave.

  python -m bench.serve [--clients 1 4 16 --new 64 --layers 24 --hidden 1024 --vocab-file qwen.tiktoken]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import platform
import threading
import time

import httpx
import jax
import numpy as np

import qwenvl_jax as q
from bench.generate import add_lm_args, lm_config, random_params
from qwenvl_jax.batching import Buckets
from qwenvl_jax.chat_format import DEFAULT_SYSTEM, make_context
from qwenvl_jax.decode import decode_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOPICS = ['the sea', 'a lighthouse', 'bread', 'a red bicycle', 'winter', 'an old map', 'bees', 'a violin',
          'the moon', 'a small robot', 'rain in a city', 'chess', 'a garden', 'trains', 'a kite', 'tea']


def start_server(model, params, tok, max_batch: int, max_len: int, max_queue: int, prompt_tokens: list[int],
                 new: int):
  """A live server on a free port, its programs for prompts of these lengths and `new` tokens compiled:
  (url, stop)."""
  import uvicorn
  from serve.app import Service, create_app
  from serve.batch_engine import BatchEngine
  from serve.limits import Limits
  from serve.prompt import Preparer
  engine = BatchEngine(model, params, max_batch=max_batch, max_queue=max_queue, max_len=max_len)
  for n in prompt_tokens:
    engine.warm(n, new)
  limits = Limits()
  service = Service('bench', tok, q.GenerationConfig(do_sample=False), Preparer(
      model, params, tok, limits, fits=engine.check), engine, limits)
  server = uvicorn.Server(uvicorn.Config(create_app(service), host='127.0.0.1', port=0, log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  port = server.servers[0].sockets[0].getsockname()[1]

  def stop():
    server.should_exit = True
    thread.join(60)
    engine.close()
  return f'http://127.0.0.1:{port}', stop


def ask(url: str, prompt: str, new: int) -> tuple[float, int]:
  """One streamed request: (seconds to its first text, tokens generated)."""
  body = {'model': 'bench', 'messages': [{'role': 'user', 'content': prompt}], 'max_tokens': new,
          'temperature': 0, 'stream': True, 'stream_options': {'include_usage': True}}
  t0 = time.perf_counter()
  first, tokens = None, 0
  with httpx.stream('POST', url + '/v1/chat/completions', json=body, timeout=3600) as r:
    r.raise_for_status()
    for line in r.iter_lines():
      if not line.startswith('data: {'):
        continue
      chunk = json.loads(line[6:])
      if chunk.get('error'):
        raise RuntimeError(chunk['error'])
      if first is None and chunk['choices'] and chunk['choices'][0]['delta'].get('content'):
        first = time.perf_counter() - t0
      if chunk.get('usage'):
        tokens = chunk['usage']['completion_tokens']
  return (time.perf_counter() - t0 if first is None else first), tokens


def prompt(i: int) -> str:
  return f'Client {i}: write a short story about {TOPICS[i % len(TOPICS)]}.'


def wave(url: str, clients: int, new: int) -> dict[str, float]:
  """`clients` requests sent at once; tokens/s over the wave and TTFT percentiles."""
  prompts = [prompt(i) for i in range(clients)]
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(lambda p: ask(url, p, new), prompts))
  wall = time.perf_counter() - t0
  ttft = np.array([r[0] for r in results])
  tokens = sum(r[1] for r in results)
  return dict(tokens=tokens, wall=wall, tok_s=tokens / wall, p50=float(np.percentile(ttft, 50)),
              p99=float(np.percentile(ttft, 99)))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_lm_args(ap)
  ap.add_argument('--vocab-file', default=os.environ.get('QWENVL_VOCAB', ROOT.parent / 'shared' / 'qwen.tiktoken'),
                  help='qwen.tiktoken (default: $QWENVL_VOCAB, else ../shared/qwen.tiktoken)')
  ap.add_argument('--clients', type=int, nargs='+', default=[1, 4, 16])
  ap.add_argument('--new', type=int, default=64, help='tokens each client asks for')
  ap.add_argument('--max-batch', type=int, help='rows of the batching server (default: the most clients)')
  args = ap.parse_args(argv)

  load_before = os.getloadavg()[0]
  cfg = lm_config(args)
  params = decode_params(random_params(cfg), consume=True)
  model = q.QwenVL(cfg)
  tok = q.QwenVLTokenizer(args.vocab_file, image_span_length=cfg.vision.n_queries)
  rows = args.max_batch or max(args.clients)
  max_len = 128 + args.new  # the prompts take 32 or 64 slots
  lengths = {len(make_context(tok, prompt(i), system=DEFAULT_SYSTEM)[1]) for i in range(max(args.clients))}
  warm = sorted({Buckets().length(n): n for n in lengths}.values())  # one length of each bucket
  servers = {'one at a time': start_server(model, params, tok, 1, max_len, max(args.clients), warm, args.new),
             f'batched ({rows} rows)': start_server(model, params, tok, rows, max_len, max(args.clients), warm,
                                                    args.new)}
  results = {}
  try:
    for name, (url, _) in servers.items():
      wave(url, 2, 2)  # the first requests through the server
      for n in args.clients:
        results[name, n] = wave(url, n, args.new)
        print(f'{name}, {n} clients: {results[name, n]}', flush=True)
  finally:
    for _, stop in servers.values():
      stop()

  print(f'\n# serve bench {datetime.date.today()}: {platform.machine()}, {os.cpu_count()} cores, load average '
        f'{load_before:.1f} -> {os.getloadavg()[0]:.1f}; jax {jax.__version__}')
  print(f'LM: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, mlp {args.intermediate // 2}, '
        f'vocab {args.vocab}, fp32, random weights; each client one streamed greedy request for {args.new} '
        'tokens\n')
  one, batched = servers
  print('| clients | tok/s one at a time | tok/s batched | speed-up | TTFT p50 / p99 one at a time (s) | '
        'TTFT p50 / p99 batched (s) |')
  print('| --- | --- | --- | --- | --- | --- |')
  for n in args.clients:
    a, b = results[one, n], results[batched, n]
    print(f'| {n} | {a["tok_s"]:.1f} | {b["tok_s"]:.1f} | {b["tok_s"] / a["tok_s"]:.1f}x | '
          f'{a["p50"]:.2f} / {a["p99"]:.2f} | {b["p50"]:.2f} / {b["p99"]:.2f} |')


if __name__ == '__main__':
  main()
