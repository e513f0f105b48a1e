"""The released Qwen-VL-Chat size on one host: write, convert, load and chat, with time and peak memory.

  python -m bench.released [--dir DIR] [--keep] [--new-tokens 16]

1. write    a synthetic checkpoint in the released layout at the full Qwen-VL-Chat dims: random bfloat16
            values, the released config.json, 10 shards plus model.safetensors.index.json, the tensor
            names and shapes of ../shared/released_qwen_vl_tensors.json (checked against our own name
            rules first), generation_config.json and the vocabulary qwen.tiktoken;
2. convert  `qwenvl-convert SRC DST` (the CLI's own entry point) into the Orbax layout;
3. load     `load_pretrained(DST, dtype=bfloat16)` with bfloat16 compute;
4. chat     `chat` about one 448px image for exactly `--new-tokens` greedy tokens, with the parameters
            in the generation layout as `qwenvl-jax chat` holds them (`xla_flags.LOW_PRECISION_CPU`).
Each measured phase runs in a process of its own and reports its wall time and its peak resident memory
(VmHWM): convert as a ratio of the largest shard, load and chat of the parameter bytes. The last line is
one JSON object with every figure. Targets: convert <= 1.5x the largest shard, load and chat <= 1.15x
the parameter bytes. Needs about 2.1x the checkpoint (~41 GB) of free disk in DIR.

`--decoder-layers`/`--vision-layers` shrink the model for a quick check of the script itself; the figures
that count are those of the full dims.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator

if __package__ in (None, ''):  # run as a file: its own folder would shadow the `convert` package
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import numpy as np

from qwenvl_jax import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('QWENVL_SHARED_DIR', ROOT.parent / 'shared'))
TENSORS_FILE = SHARED / 'released_qwen_vl_tensors.json'
GB = 10**9
SHARDS = 10
PART_BYTES = 64 << 20  # tensors are generated and written in parts of this size
# generation_config.json of the released Qwen-VL-Chat.
GENERATION_CONFIG = {'chat_format': 'chatml', 'do_sample': True, 'eos_token_id': 151643,
                     'max_new_tokens': 512, 'max_window_size': 6144, 'pad_token_id': 151643,
                     'top_k': 0, 'top_p': 0.3, 'transformers_version': '4.31.0'}


def peak_rss() -> int:
  """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith('VmHWM:'):
      return int(line.split()[1]) * 1024
  raise RuntimeError('no VmHWM in /proc/self/status: this benchmark needs Linux')


def released(decoder_layers: int | None, vision_layers: int | None) -> tuple[dict, dict[str, list[int]]]:
  """The released config.json and tensor shapes, optionally with fewer layers (a smoke test)."""
  if not TENSORS_FILE.exists():
    raise SystemExit(f'{TENSORS_FILE} not found (set QWENVL_SHARED_DIR to the shared/ folder)')
  info = json.loads(TENSORS_FILE.read_text())
  config, shapes = dict(info['config'], torch_dtype='bfloat16'), dict(info['tensors'])
  config['visual'] = dict(config['visual'])
  if decoder_layers is not None:
    config['num_hidden_layers'] = decoder_layers
    shapes = {n: s for n, s in shapes.items()
              if not n.startswith('transformer.h.') or int(n.split('.')[2]) < decoder_layers}
  if vision_layers is not None:
    config['visual']['layers'] = vision_layers
    prefix = 'transformer.visual.transformer.resblocks.'
    shapes = {n: s for n, s in shapes.items()
              if not n.startswith(prefix) or int(n[len(prefix):].split('.')[0]) < vision_layers}
  return config, shapes


def write_checkpoint(root: pathlib.Path, config: dict, shapes: dict[str, list[int]],
                     vocab: pathlib.Path) -> list[pathlib.Path]:
  """The released layout in SHARDS shards of consecutive tensors, random bf16 values of magnitude ~1e-2
  (finite everywhere, so the forward stays finite). One part of one tensor is in memory at a time."""
  import ml_dtypes
  from convert import hf
  from convert.core import released_order
  from qwenvl_jax.config import QwenVLConfig
  from qwenvl_jax.params import rules
  table = rules(QwenVLConfig.from_dict(config))
  ours = {n: list(r.hf_shape) for n, r in table.items()}
  if ours != shapes:
    names = sorted(set(ours) ^ set(shapes)) or sorted(n for n in ours if ours[n] != shapes[n])
    raise SystemExit(f'the released tensors and our name rules disagree on {len(names)}: {names[:5]}')
  bf16 = np.dtype(ml_dtypes.bfloat16)
  specs = [hf.TensorSpec(n, bf16, tuple(shapes[n])) for n in released_order(table)]
  total = sum(s.nbytes for s in specs)
  shard_size = math.ceil(total / SHARDS)
  while len(hf.plan_shards(specs, shard_size)) > SHARDS:  # greedy packing leaves gaps: widen a little
    shard_size = int(shard_size * 1.01)
  rng = np.random.default_rng(0)

  def parts(spec: hf.TensorSpec) -> Iterator[np.ndarray]:
    n = math.prod(spec.shape)
    for start in range(0, n, PART_BYTES // 2):
      bits = rng.integers(0, 1 << 16, min(PART_BYTES // 2, n - start), dtype=np.uint16)
      yield ((bits & 0x807F) | 0x3C00).view(bf16)  # sign and mantissa random, |x| in [2^-7, 2^-6)

  root.mkdir(parents=True)
  (root / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
  (root / 'generation_config.json').write_text(json.dumps(GENERATION_CONFIG, indent=2) + '\n')
  shutil.copyfile(vocab, root / 'qwen.tiktoken')
  index = hf.write_released(root, specs, (parts(s) for s in specs), shard_size)
  return [root / f for f in dict.fromkeys(index['weight_map'].values())]


def phase_convert(src: str, dst: str) -> dict:
  from convert import cli
  start = time.perf_counter()
  status = cli.main([src, dst, '--quiet'])
  if status:
    raise SystemExit(f'qwenvl-convert exited with {status}')
  return {'seconds': time.perf_counter() - start, 'peak_rss': peak_rss()}


def phase_chat(ckpt: str, image: str, new_tokens: int) -> dict:
  import jax
  from qwenvl_jax.chat_session import chat
  from qwenvl_jax.checkpoint import load_pretrained
  from qwenvl_jax.decode import GenerationConfig, decode_params
  from qwenvl_jax.images import ImageLoader
  from qwenvl_jax.tokenizer import QwenVLTokenizer
  start = time.perf_counter()
  model, params = load_pretrained(ckpt, dtype='bfloat16', split_layers=True)  # bfloat16 weights
  model = type(model)(model.config.replace(dtype='bfloat16'))  # and bfloat16 compute
  jax.block_until_ready(params)
  load = {'seconds': time.perf_counter() - start, 'peak_rss': peak_rss(),
          'param_bytes': sum(x.nbytes for x in jax.tree.leaves(params))}
  start = time.perf_counter()
  params = decode_params(params, consume=True)  # as `qwenvl-jax chat` holds them
  tokenizer = QwenVLTokenizer.from_pretrained(ckpt, image_span_length=model.config.vision.n_queries)
  g = GenerationConfig.from_pretrained(ckpt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False)
  query = tokenizer.from_list_format([{'image': image}, {'text': 'What is in the picture?'}])
  loader = ImageLoader(allowed_root=str(pathlib.Path(image).parent))
  response, _ = chat(model, params, tokenizer, query, generation_config=g, image_loader=loader)
  chat_fig = {'seconds': time.perf_counter() - start, 'peak_rss': peak_rss(),
              'response_chars': len(response)}
  return {'load': load, 'chat': chat_fig}


def run_child(*args: str, xla_flags: str = '') -> dict:
  env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {xla_flags}'.strip())
  out = subprocess.run([sys.executable, '-m', 'bench.released', '--child', *args], cwd=ROOT, check=True,
                       stdout=subprocess.PIPE, text=True, env=env).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--dir', default=None, help='working directory (default: a new one under $TMPDIR)')
  p.add_argument('--keep', action='store_true', help='keep the synthetic and converted checkpoints')
  p.add_argument('--new-tokens', type=int, default=16)
  p.add_argument('--decoder-layers', type=int, help='fewer decoder layers (a check of this script)')
  p.add_argument('--vision-layers', type=int, help='fewer ViT layers (a check of this script)')
  p.add_argument('--vocab', help='qwen.tiktoken (default: ../shared/qwen.tiktoken or $QWENVL_VOCAB)')
  p.add_argument('--child', nargs='+', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    phase, *rest = args.child
    result = phase_convert(*rest) if phase == 'convert' else phase_chat(rest[0], rest[1], int(rest[2]))
    print(json.dumps(result))
    return
  from qwenvl_jax.tokenizer import find_vocab
  vocab = pathlib.Path(args.vocab) if args.vocab else (
      SHARED / 'qwen.tiktoken' if (SHARED / 'qwen.tiktoken').exists() else find_vocab())
  config, shapes = released(args.decoder_layers, args.vision_layers)
  work = pathlib.Path(tempfile.mkdtemp(prefix='qwenvl-released-', dir=args.dir))
  report: dict = {'date': time.strftime('%Y-%m-%d'), 'machine': f'{platform.machine()}, {os.cpu_count()} CPUs',
                  'memory_gb': os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GB,
                  'load_avg_at_start': os.getloadavg()[0],
                  'decoder_layers': config['num_hidden_layers'], 'vision_layers': config['visual']['layers']}
  try:
    src, dst = work / 'Qwen-VL-Chat', work / 'qwen-vl-chat-jax'
    start = time.perf_counter()
    files = write_checkpoint(src, config, shapes, vocab)
    sizes = [f.stat().st_size for f in files]
    report.update(write_s=time.perf_counter() - start, shards=len(files), checkpoint_gb=sum(sizes) / GB,
                  largest_shard_gb=max(sizes) / GB)
    from PIL import Image
    image = work / 'image.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (448, 448, 3), np.uint8)).save(image)
    print(f'wrote {len(files)} shards, {sum(sizes) / GB:.2f} GB in {report["write_s"]:.0f} s', flush=True)

    conv = run_child('convert', str(src), str(dst))
    report.update(convert_s=conv['seconds'], convert_peak_gb=conv['peak_rss'] / GB,
                  convert_rss_ratio=conv['peak_rss'] / max(sizes))
    print(f'convert: {conv["seconds"]:.0f} s, peak {conv["peak_rss"] / GB:.2f} GB = '
          f'{report["convert_rss_ratio"]:.2f}x the largest shard (target <= 1.5x)', flush=True)
    shutil.rmtree(src)  # the disk holds one copy at a time

    run = run_child('chat', str(dst), str(image), str(args.new_tokens), xla_flags=' '.join(xla_flags.LOW_PRECISION_CPU))
    load, chat_fig = run['load'], run['chat']
    param_bytes = load['param_bytes']
    report.update(param_gb=param_bytes / GB, load_s=load['seconds'], load_peak_gb=load['peak_rss'] / GB,
                  load_rss_ratio=load['peak_rss'] / param_bytes, chat_s=chat_fig['seconds'],
                  chat_new_tokens=args.new_tokens, chat_peak_gb=chat_fig['peak_rss'] / GB,
                  chat_rss_ratio=chat_fig['peak_rss'] / param_bytes,
                  load_avg_at_end=os.getloadavg()[0])
    print(f'load: {load["seconds"]:.0f} s, peak {load["peak_rss"] / GB:.2f} GB = '
          f'{report["load_rss_ratio"]:.3f}x the parameter bytes (target <= 1.15x)', flush=True)
    print(f'chat ({args.new_tokens} tokens): {chat_fig["seconds"]:.0f} s, peak {chat_fig["peak_rss"] / GB:.2f} GB = '
          f'{report["chat_rss_ratio"]:.3f}x the parameter bytes (target <= 1.15x)', flush=True)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  print(json.dumps(report))


if __name__ == '__main__':
  main()
