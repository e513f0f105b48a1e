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
"""
from __future__ import annotations

import argparse
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


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--images', type=int, default=512)
  ap.add_argument('--batches', type=int, default=24)
  ap.add_argument('--sizes', type=int, nargs='+', default=[224, 448])
  ap.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
  ap.add_argument('--no-step', action='store_true', help='skip the train step')
  args = ap.parse_args(argv)

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
