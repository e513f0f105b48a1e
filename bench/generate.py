"""Generation speed of qwenvl_jax against transformers' Qwen2 on the same language-model dims (fp32, CPU).

Prefill and decode tokens/s at each batch size, for both, plus the memory-bandwidth roofline measured in
the same run: a batch-1 decode step must read every weight once (the embedding table only one row), so
roofline tok/s = bandwidth / bytes of weights. Random weights; nothing is downloaded.

  python -m bench.generate [--layers 24 --hidden 1024 --batches 1 8 --new 64 --repeats 5] [--weights int8]

--weights int8|int4 adds the same model weight-only quantized (`qwenvl_jax.quant`), timed alternately with
the float32 one, and the bytes each reads per decode step.

Needs the `bench` extra (transformers, torch) for the comparison; --no-hf runs qwenvl_jax alone.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import platform
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import qwenvl_jax as q
from qwenvl_jax.decode import decode_params, generate
from qwenvl_jax.param_layout import leaf_shapes
from qwenvl_jax.params import set_path
from qwenvl_jax.quant import quantize, quantized_config


def best_of(fn: Callable[[], object], repeats: int) -> float:
  """Fastest wall time of `repeats` calls, after one warm-up call (compilation, caches)."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def bandwidth(gib: float, repeats: int, torch=None) -> dict[str, float]:
  """Bytes/s of reading (sum) and copying a buffer far larger than the caches, best of `repeats`.

  The roofline uses the fastest: the strictest bound a decode step can be held to.
  """
  a = np.ones(int(gib * 2**30) // 4, np.float32)
  b = np.empty_like(a)
  x = jnp.asarray(a)
  jsum = jax.jit(jnp.sum)
  halves = np.array_split(a, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(len(halves)) as pool:  # numpy drops the GIL while summing
    parallel = a.nbytes / best_of(lambda: list(pool.map(np.sum, halves)), repeats)
  out = {
      'numpy sum (1 thread)': a.nbytes / best_of(lambda: a.sum(), repeats),
      f'numpy sum ({len(halves)} threads)': parallel,
      'numpy copy (read+write)': 2 * a.nbytes / best_of(lambda: np.copyto(b, a), repeats),
      'jax sum': a.nbytes / best_of(lambda: jsum(x).block_until_ready(), repeats),
  }
  if torch is not None:
    t = torch.from_numpy(a)
    out[f'torch sum ({torch.get_num_threads()} threads)'] = a.nbytes / best_of(lambda: t.sum(), repeats)
  return out


def add_lm_args(ap: argparse.ArgumentParser) -> None:
  """The language model's dims (`lm_config`); the defaults are the bench dims."""
  ap.add_argument('--hidden', type=int, default=1024)
  ap.add_argument('--layers', type=int, default=24)
  ap.add_argument('--heads', type=int, default=16)
  ap.add_argument('--intermediate', type=int, default=2 * 2816, help="Qwen-VL's (w1 + w2 widths)")
  ap.add_argument('--vocab', type=int, default=151936)


def lm_config(args) -> q.QwenVLConfig:
  """The language model under test; the vision tower is tiny since text-only decoding never runs it."""
  return q.QwenVLConfig(
      text=q.TextConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                        num_heads=args.heads, kv_channels=args.hidden // args.heads,
                        intermediate_size=args.intermediate, seq_length=2048),
      vision=q.VisionConfig(image_size=28, width=32, layers=1, heads=2, output_dim=args.hidden, n_queries=16))


def random_params(cfg: q.QwenVLConfig, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  params: dict = {}
  for path, shape in leaf_shapes(cfg).items():
    set_path(params, path, jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02))
  return params


def weight_bytes(params: dict) -> int:
  """Bytes a batch-1 decode step reads: every weight but the vision tower and the embedding table."""
  text = {k: v for k, v in params.items() if k not in ('visual', 'wte')}
  return sum(x.nbytes for x in jax.tree.leaves(text))


def prefill_and_decode(run: Callable[[int], Callable[[], object]], new: int,
                       repeats: int) -> tuple[float, float]:
  """(prefill s, decode s for `new` tokens) from generating 1 and new + 1 tokens back to back.

  Medians over `repeats` pairs: on a shared machine a minimum of each could pair a slow short run with a
  fast long one and report an impossible decode speed.
  """
  return alternating([run], new, repeats)[0]


def alternating(runs: list[Callable[[int], Callable[[], object]]], new: int,
                repeats: int) -> list[tuple[float, float]]:
  """`prefill_and_decode` of several runs, their pairs taken in turn, so that a change in the machine's
  load during the measurement falls on each alike."""
  pairs = [(run(1), run(new + 1)) for run in runs]
  for short, long in pairs:  # compile
    short(), long()
  prefill, decode = [[] for _ in runs], [[] for _ in runs]
  for _ in range(repeats):
    for i, (short, long) in enumerate(pairs):
      t0 = time.perf_counter()
      short()
      t1 = time.perf_counter()
      long()
      t2 = time.perf_counter()
      prefill[i].append(t1 - t0)
      decode[i].append((t2 - t1) - (t1 - t0))
  return [(float(np.median(p)), float(np.median(d))) for p, d in zip(prefill, decode)]


def jax_run(cfg, params, prompts: np.ndarray) -> Callable[[int], Callable[[], object]]:
  """qwenvl_jax.generate of n tokens, greedy, no early stop."""
  model = q.QwenVL(cfg)
  return lambda n: lambda: generate(
      model, params, prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, stop_ids=())


def time_jax(cfg, params, prompts: np.ndarray, new: int, repeats: int) -> tuple[float, float]:
  return prefill_and_decode(jax_run(cfg, params, prompts), new, repeats)


def hf_model(cfg: q.QwenVLConfig):
  """transformers' Qwen2 with the same dims: Qwen2's intermediate_size is Qwen-VL's halved."""
  import torch
  os.environ.setdefault('HF_HUB_OFFLINE', '1')  # random weights: nothing to fetch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  t = cfg.text
  hf_cfg = Qwen2Config(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.mlp_width,
      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
      max_position_embeddings=8192, rms_norm_eps=t.layer_norm_eps, tie_word_embeddings=False,
      use_sliding_window=False)
  torch.manual_seed(0)
  return Qwen2ForCausalLM(hf_cfg).to(torch.float32).eval()


def time_hf(model, prompts: np.ndarray, new: int, repeats: int) -> tuple[float, float]:
  """transformers' generate, greedy, no early stop."""
  import torch
  ids = torch.from_numpy(prompts.astype(np.int64))
  mask = torch.ones_like(ids)

  def run(n):
    def go():
      with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    return go
  return prefill_and_decode(run, new, repeats)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_lm_args(ap)
  ap.add_argument('--prompt', type=int, default=128, help='prompt tokens per row')
  ap.add_argument('--new', type=int, default=64, help='decode steps timed')
  ap.add_argument('--batches', type=int, nargs='+', default=[1, 8])
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--bandwidth-gib', type=float, default=1.0)
  ap.add_argument('--threads', type=int, default=os.cpu_count(),
                  help="torch's threads; XLA's CPU client uses every core, so keep it at the core count")
  ap.add_argument('--no-hf', action='store_true', help='skip the transformers comparison')
  ap.add_argument('--weights', choices=['int8', 'int4'],
                  help='also time the model weight-only quantized so, alternately with float32')
  args = ap.parse_args(argv)

  torch = None
  if not args.no_hf:
    import torch
    torch.set_num_threads(args.threads)
  load_before = os.getloadavg()[0]
  cfg = lm_config(args)
  params = random_params(cfg)
  n_bytes = weight_bytes(params)
  q_cfg = q_params = None
  if args.weights:
    q_cfg, q_params = quantized_config(cfg, args.weights), quantize(params, cfg, args.weights)
    q_bytes = weight_bytes(q_params)
    q_params = decode_params(q_params, consume=True)
  params = decode_params(params, consume=True)  # the layout generation reads fastest
  hf = None if args.no_hf else hf_model(cfg)
  bw = bandwidth(args.bandwidth_gib, args.repeats, torch)

  rows, rng = [], np.random.default_rng(1)
  for b in args.batches:
    prompts = rng.integers(0, min(args.vocab, 150000), (b, args.prompt))
    runs = [jax_run(cfg, params, prompts)] + ([jax_run(q_cfg, q_params, prompts)] if q_cfg else [])
    (jp, jd), *quantized = alternating(runs, args.new, args.repeats)
    qd = quantized[0][1] if quantized else float('nan')
    hp, hd = (float('nan'),) * 2 if hf is None else time_hf(hf, prompts, args.new, args.repeats)
    rows.append((b, b * args.prompt / jp, b * args.prompt / hp, b * args.new / jd, b * args.new / hd,
                 b * args.new / qd))
  for name, value in bandwidth(args.bandwidth_gib, args.repeats, torch).items():  # the load may have changed
    bw[name] = max(bw[name], value)
  peak = max(bw.values())
  roofline = peak / n_bytes

  versions = f'jax {jax.__version__}' + ('' if hf is None else (
      f'; torch {torch.__version__} ({torch.get_num_threads()} threads), transformers '
      f'{__import__("transformers").__version__}'))
  print(f'# generate bench {datetime.date.today()}: {platform.machine()}, {os.cpu_count()} cores, '
        f'load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; {versions}')
  print(f'LM: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, mlp {args.intermediate // 2}, '
        f'vocab {args.vocab}, fp32; prompt {args.prompt} tokens, {args.new} decode steps timed; '
        f'{n_bytes / 1e9:.2f} GB of weights read per decode step')
  for name, value in bw.items():
    print(f'bandwidth {name:28s} {value / 1e9:6.1f} GB/s')
  print(f'roofline batch-1 decode: {peak / 1e9:.1f} GB/s / {n_bytes / 1e9:.2f} GB = {roofline:.1f} tok/s\n')
  if q_cfg is not None:
    print(f'{args.weights}: {q_bytes / 1e9:.2f} GB of weights read per decode step '
          f'({n_bytes / q_bytes:.2f}x fewer); roofline {peak / q_bytes:.1f} tok/s')
  w = f' | decode tok/s jax {args.weights} | {args.weights}/fp32 | {args.weights} steps/s / its roofline' \
      if q_cfg else ''
  print('| batch | prefill tok/s jax | prefill tok/s HF | decode tok/s jax | decode tok/s HF | '
        f'decode jax/HF | decode steps/s jax / roofline{w} |')
  print('| --- ' * (7 + 3 * bool(q_cfg)) + '|')
  for b, jp, hp, jd, hd, qd in rows:
    extra = f' | {qd:.1f} | {qd / jd:.2f}x | {qd / b / (peak / q_bytes):.0%}' if q_cfg else ''
    print(f'| {b} | {jp:.0f} | {hp:.0f} | {jd:.1f} | {hd:.1f} | {jd / hd:.2f}x | {jd / b / roofline:.0%}{extra} |')


if __name__ == '__main__':
  main()
