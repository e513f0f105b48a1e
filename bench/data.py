"""Is training input-bound? Samples/s of the loader beside the demo's train step, at two image sizes.

On the demo's world (train/configs/demo.json: 224 px scenes, stage 2's multitask records), at image_size
224 and 448:
  serial float32 (before grain): each batch made in the training process, then float32 pixels on the host
  grain, JSON + files, 0 workers: a background thread (the default)
  grain, packed, 0/1/2 workers: the same batches from `qwenvl-data pack` shards, decoded in worker processes
  train step: the demo's stage-2 model and batch at that image size, through train.trainer.run
    (step_time_s of the second logging interval: compiled, steady)
Loader rates exclude the start (worker processes import JAX: seconds), reported apart, and each worker's
first batches.

  python -m bench.data [--images 512] [--batches 24] [--sizes 224 448] [--workers 0 1 2] [--no-step]

--packing instead measures sequence packing (samples_per_row, train/rows.py): mean real tokens per row and
the fraction of padding, without and with packing, on the demo world's stage-1 captions and stage-2
multitask records (the demo's model, buckets and batches; packed rows have room for `--per-row` samples of
the mean length and 10%), with the demo train step's samples/s both ways; then the loader alone at stage
1's real shape (256 image tokens; buckets 256/512 unpacked, 7 samples to rows of 2048 packed), the loader
at stage 1's caption lengths (~300 tokens a sample: a few percent find no room in their window's rows and
wait for the next one), and the packer's time on one window of stage 1 (245,760 samples).

  python -m bench.data --packing [--per-row 4] [--images 512] [--batches 24] [--no-step]

--order instead measures the data order at scale: seconds and peak traced memory (tracemalloc: numpy's
arrays included) to build one new window (2 batches of 8 caption records made on demand) of a source of N
records, at each N; a permutation of the dataset per window grows with N, the index shuffle does not. It
uses only the loader's public API, so the same file measures an older checkout (run it as a script with
that checkout on PYTHONPATH).

  python -m bench.data --order [--records 1e6 1e8 1.4e9]
"""
from __future__ import annotations

import argparse
import math
import pathlib
import random
import tempfile
import time

from qwenvl_jax.preprocess import normalize


def _rate(loader, batches: int) -> tuple[float, float]:
  """(seconds to the first batch, samples/s over the next `batches` once every worker has delivered)."""
  start = time.perf_counter()
  it = iter(loader)
  next(it)
  first = time.perf_counter() - start
  for _ in range(2 * loader.cfg.worker_count):  # each worker's start (importing JAX) is behind the first's
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * loader.cfg.batch_size / (time.perf_counter() - start)
  it.close()
  return first, rate


def _serial_rate(loader, batches: int) -> float:
  start = time.perf_counter()
  for k in range(batches):
    normalize(loader.batch(k)['pixel_values'])
  return batches * loader.cfg.batch_size / (time.perf_counter() - start)


def _fill(loader, batches: int) -> tuple[float, str]:
  """(mean real tokens per row, the fraction of the batches' token slots that are padding, the samples a
  batch holds and the bad records: packed samples without room were bad records before they were carried
  to the next window)."""
  real = slots = rows = bad = samples = 0
  for _, batch in zip(range(batches), loader):
    mask = batch['attention_mask']
    real, slots, rows = real + int((mask != 0).sum()), slots + mask.size, rows + mask.shape[0]
    samples += int(mask.max(1).sum())
    bad += loader.last_skipped
  return real / rows, (f'padding {1 - real / slots:.1%}, {samples / batches:.1f} samples a batch, {bad} bad '
                       'record(s)')


class _Records:
  """N caption records made on demand (a RecordSource without the import: any checkout's loader takes it)."""

  def __init__(self, n: int):
    self.n, self.name = n, f'{n} fake records'

  def __len__(self):
    return self.n

  def records(self, indices):
    return [{'image': f'{i}.png', 'caption': f'record {i}: a red circle left of {i % 7} blue squares'
             + ' and more' * (i * 2654435761 % 2 ** 32 % 28)} for i in indices]  # 14..70 caption tokens

  def image(self, i, path):
    from PIL import Image
    return Image.new('RGB', (28, 28))

  def where(self, i):
    return f'record {i}'


def order(sizes) -> None:
  """Seconds and peak traced memory to build a new window (see the module doc) at each source size."""
  import tracemalloc
  from qwenvl_jax.tokenizer import QwenVLTokenizer
  from train.data import Encoder
  from train.demo import demo_vocab
  from train.loader import Loader, LoaderConfig
  tok = QwenVLTokenizer(demo_vocab(), image_span_length=16)
  cfg = LoaderConfig(batch_size=8, seq_buckets=(64,), target_step=8, max_images=1, image_size=28, seed=0,
                     window=2)
  for n in sizes:
    loader = Loader(_Records(int(n)), Encoder(tok, 'caption'), cfg)
    loader.batch(0)
    for k in (2, 4):  # two new windows of epoch 0
      tracemalloc.start()
      start = time.perf_counter()
      loader.batch(k)
      seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
      tracemalloc.stop()
    print(f'{int(n):>13,} records: a new window in {seconds:.3f} s, peak traced memory {peak / 2 ** 20:.1f} MiB',
          flush=True)
  try:
    from train.shuffle import index_shuffle
  except ImportError:  # an older checkout
    return
  import numpy as np
  start = time.perf_counter()
  index_shuffle(10 ** 9 + np.arange(8 * 30720), 1_400_000_000, (0, 0))
  print(f'the order of one stage-1 window (245,760 positions of 1.4e9 records): {time.perf_counter() - start:.3f} s',
        flush=True)


def packing(args, demo, model_config, tok, root, world) -> None:
  import random
  from qwenvl_jax.tokenizer import QwenVLTokenizer
  from train.config import stage_config
  from train.demo import demo_vocab
  from train.inputs import open_data
  from train.trainer import run
  scenes, _ = world.make_world(root / 'w', args.images, 0, demo['seed'],
                               world.WorldConfig(**demo['world']['scene']))
  data = {1: world.write_json(world.caption_records(scenes), root / 'w' / 'stage1.json'),
          2: world.write_json(world.multitask_records(scenes, random.Random(0),
                                                      demo['world']['stage2_other_tasks']),
                              root / 'w' / 'stage2.json')}
  for stage in (1, 2):
    d = demo['stages'][str(stage)]
    base = stage_config(stage, **d, data=str(data[stage]), seed=demo['seed'])
    mean = None
    for per_row in (1, args.per_row):
      # Packed rows: room for per_row samples of the mean length unpacked, and 10% (the first-fit's slack).
      buckets = base.seq_buckets if per_row == 1 else (8 * math.ceil(1.1 * per_row * mean / 8),)
      cfg = base.replace(samples_per_row=per_row, seq_buckets=buckets, on_bad_record='skip',
                         max_bad_fraction=0.5, out_dir=str(root / f'run{stage}-{per_row}'))
      loader, _ = open_data(cfg, tok, None, 0, 1)
      tokens, padding = _fill(loader, min(args.batches, loader.batches_per_epoch))
      mean = mean or tokens
      row = (f'demo stage {stage}, samples_per_row {per_row}: {cfg.batch_size // per_row} rows of '
             f'{cfg.seq_buckets}, real tokens per row {tokens:.1f}, {padding}')
      if not args.no_step:
        steps = 2 * cfg.log_every
        _, _, logged = run(cfg.replace(steps=steps, warmup_steps=1, peak_tflops=1.0),
                           model_config=model_config, tokenizer=tok, progress=False)
        row += f', train step {cfg.batch_size / logged[-1]["step_time_s"]:.3g} samples/s'
      print(row, flush=True)
  real = QwenVLTokenizer(demo_vocab(), image_span_length=256)  # stage 1's shape: 256 image tokens, 224 px
  base = stage_config(1, data=str(data[1]), batch_size=56, grad_accum=1, image_size=28, seed=demo['seed'])
  for per_row, buckets in ((1, base.seq_buckets), (7, (2048,))):
    cfg = base.replace(samples_per_row=per_row, seq_buckets=buckets, on_bad_record='skip',
                       max_bad_fraction=0.5)
    loader, _ = open_data(cfg, real, None, 0, 1)
    tokens, padding = _fill(loader, min(args.batches, loader.batches_per_epoch))
    print(f'stage-1 shape, samples_per_row {per_row}: {cfg.batch_size // per_row} rows of {cfg.seq_buckets}, '
          f'real tokens per row {tokens:.1f}, {padding}', flush=True)
  _stage1_lengths(real)
  _packer_time()


def _stage1_lengths(tok) -> None:
  """The loader at stage 1's lengths (256 image tokens and 14..70 caption tokens: ~300 a sample, as the
  real captions), 7 samples to a row of 2048, batch 56, bucket_window 8: the samples a batch holds and the
  bad records over 3 windows (the samples without room were bad records before they were carried)."""
  from train.data import Encoder
  from train.loader import Loader, LoaderConfig
  cfg = LoaderConfig(batch_size=56, seq_buckets=(2048,), target_step=256, max_images=1, image_size=28,
                     seed=0, window=8, on_bad_record='skip', max_bad_fraction=0.5, samples_per_row=7)
  loader = Loader(_Records(56 * 8 * 20), Encoder(tok, 'caption'), cfg)
  tokens, padding = _fill(loader, 24)
  window = getattr(loader.make, '_window', None) or ()
  carried = f', {len(window[2].carry)} carried into the next window' if len(window) == 3 else ''
  print(f'stage-1 lengths, samples_per_row 7: 8 rows of (2048,), real tokens per row {tokens:.1f}, '
        f'{padding}{carried}', flush=True)


def _packer_time() -> None:
  """Seconds to pack one window of stage 1 (bucket_window 8 x batch 30720 samples of 258 image-span and
  5..60 text tokens, 7 to a row of 2048), and of samples of lengths spread over 1..2047 with 0..7 images."""
  import numpy as np
  from train.rows import first_fit
  rng = np.random.default_rng(0)
  n = 8 * 30720
  for what, lengths, images in (('stage 1 window', 258 + rng.integers(5, 61, n), np.ones(n, np.int64)),
                                ('spread lengths and images', rng.integers(1, 2048, n), rng.integers(0, 8, n))):
    start = time.perf_counter()
    _, left = first_fit(lengths, images, n // 7, 2048, 7)
    print(f'packing {n} samples ({what}) into {n // 7} rows of 2048: {time.perf_counter() - start:.2f} s, '
          f'{len(left)} found no room', flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--images', type=int, default=512)
  ap.add_argument('--batches', type=int, default=24)
  ap.add_argument('--sizes', type=int, nargs='+', default=[224, 448])
  ap.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  ap.add_argument('--no-step', action='store_true', help='skip the train step')
  ap.add_argument('--packing', action='store_true', help='measure sequence packing instead (see above)')
  ap.add_argument('--per-row', type=int, default=4, help='samples_per_row of the demo stages with --packing')
  ap.add_argument('--order', action='store_true', help='measure the data order at scale instead (see above)')
  ap.add_argument('--records', type=float, nargs='+', default=[1e6, 1e8, 1.4e9],
                  help='source sizes for --order')
  args = ap.parse_args(argv)
  if args.order:
    return order(args.records)

  from qwenvl_jax.config import QwenVLConfig
  from qwenvl_jax.tokenizer import QwenVLTokenizer
  from train import world
  from train.config import stage_config
  from train.demo import demo_vocab, read_demo_config
  from train.inputs import open_data
  from train.packing import pack
  from train.trainer import run

  demo = read_demo_config('demo')
  model_config = QwenVLConfig.from_dict(demo['model'])
  tok = QwenVLTokenizer(demo_vocab(), image_span_length=model_config.vision.n_queries)
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    if args.packing:
      return packing(args, demo, model_config, tok, root, world)
    scenes, _ = world.make_world(root / 'w', args.images, 0, demo['seed'],
                                 world.WorldConfig(**demo['world']['scene']))
    records = world.multitask_records(scenes, random.Random(0), demo['world']['stage2_other_tasks'])
    data = world.write_json(records, root / 'w' / 'stage2.json')
    pack(data, root / 'packed', 'multitask', span=model_config.vision.n_queries, say=lambda _: None)
    print(f'{len(records)} records of {args.images} images ({demo["world"]["scene"]["size"]} px); batch '
          f'{demo["stages"]["2"]["batch_size"]}; samples/s (seconds to the first batch)', flush=True)
    for size in args.sizes:
      cfg = stage_config(2, **{**demo['stages']['2'], 'image_size': size}, data=str(data), seed=demo['seed'],
                         out_dir=str(root / f'run{size}'))
      row = [f'{size} px:']
      loader, _ = open_data(cfg, tok, None, 0, 1)
      row.append(f'serial float32 {_serial_rate(loader, args.batches):.0f}')
      first, rate = _rate(loader, args.batches)
      row.append(f'json/0 {rate:.0f} ({first:.1f} s)')
      for workers in args.workers:
        loader, _ = open_data(cfg.replace(data=str(root / 'packed'), worker_count=workers), tok, None, 0, 1)
        first, rate = _rate(loader, args.batches)
        row.append(f'packed/{workers} {rate:.0f} ({first:.1f} s)')
      if not args.no_step:
        steps = 2 * cfg.log_every
        _, _, logged = run(cfg.replace(steps=steps, warmup_steps=1, peak_tflops=1.0), model_config=model_config,
                           tokenizer=tok, progress=False)
        row.append(f'train step {cfg.batch_size / logged[-1]["step_time_s"]:.3g}')
      print('  '.join(row), flush=True)


if __name__ == '__main__':
  main()
