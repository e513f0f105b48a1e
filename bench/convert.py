"""Conversion throughput and peak memory of `qwenvl-convert` on a synthetic 7B-shaped checkpoint.

  python -m bench.convert [--layers 4 | --gb 4] [--shard-gb 2] [--dir DIR]

Builds a bfloat16 released-layout checkpoint in DIR: the 7B's full embeddings and lm_head (151936 x 4096),
`--layers` decoder layers of 7B shape and a ViT of the released width with `--vit-layers` blocks, in
2 GB shards with an index, like the release. Then, on the same disk and in the same run:
  read speed    every shard read once, cold (dropped from the page cache first), twice: with 64 MiB
                reads through the page cache (the kernel reads ahead), and with O_DIRECT by
                READ_THREADS threads (as the converter reads); the faster is the disk's read speed;
  write speed   a file as large as the largest shard written and fsynced;
  copy speed    the shards copied with O_DIRECT reads and writes by READ_THREADS threads: about the
                most a conversion, which reads and writes every byte once, can reach on this disk;
  conversion    `hf_to_orbax` in a child process on the cold shards: wall time (fsync included), CPU
                time of all its threads and peak resident memory (VmHWM).
Prints throughput / read speed and peak RSS / largest shard, as JSON with the figures behind them.
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
import threading
import time
from concurrent import futures
from typing import Callable

if __package__ in (None, ''):  # run as a file: its own folder would shadow the `convert` package
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import ml_dtypes
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
GB = 10**9
READ_BLOCK = 64 << 20
READ_THREADS = 4  # O_DIRECT reads in flight: one at a time leaves the disk idle between requests


def synthetic_config(layers: int, vit_layers: int) -> dict:
  from qwenvl_jax.config import qwen_vl_7b
  config = qwen_vl_7b().to_dict()
  config['num_hidden_layers'] = layers
  config['visual']['layers'] = vit_layers
  return config


def layers_for(gb: float, vit_layers: int) -> int:
  """Decoder layers that bring the checkpoint to about `gb` GB."""
  from qwenvl_jax.config import QwenVLConfig
  from qwenvl_jax.params import rules
  table = rules(QwenVLConfig.from_dict(synthetic_config(1, vit_layers)))
  sizes = {n: math.prod(r.hf_shape) * 2 for n, r in table.items()}
  per_layer = sum(s for n, s in sizes.items() if n.startswith('transformer.h.0.'))
  rest = sum(sizes.values()) - per_layer
  return max(1, round((gb * GB - rest) / per_layer))


def write_checkpoint(root: pathlib.Path, layers: int, vit_layers: int, shard_size: int) -> list[pathlib.Path]:
  from convert import hf
  from convert.core import released_order
  from qwenvl_jax.config import QwenVLConfig
  from qwenvl_jax.params import rules
  config = synthetic_config(layers, vit_layers)
  table = rules(QwenVLConfig.from_dict(config))
  bf16 = np.dtype(ml_dtypes.bfloat16)
  specs = [hf.TensorSpec(n, bf16, table[n].hf_shape) for n in released_order(table)]
  rng = np.random.default_rng(0)
  # Random finite bf16 values; one tensor is held at a time.
  arrays = (rng.standard_normal(s.shape, np.float32).astype(bf16) for s in specs)
  root.mkdir(parents=True)
  (root / 'config.json').write_text(json.dumps(config, indent=2))
  index = hf.write_released(root, specs, arrays, shard_size)
  return [root / f for f in dict.fromkeys(index['weight_map'].values())]


def drop_cache(files: list[pathlib.Path]) -> None:
  """Evicts the files from the page cache (their pages are clean: the writer fsynced them)."""
  for file in files:
    fd = os.open(file, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def read_speed(files: list[pathlib.Path]) -> float:
  """Cold reads through the page cache."""
  drop_cache(files)
  buf = memoryview(bytearray(READ_BLOCK))
  total = 0
  start = time.perf_counter()
  for file in files:
    with open(file, 'rb', buffering=0) as f:
      while n := f.readinto(buf):
        total += n
  seconds = time.perf_counter() - start
  drop_cache(files)
  return total / seconds


def _each_block(files: list[pathlib.Path], job: Callable[[pathlib.Path, int, np.ndarray], int]) -> int:
  """Runs job(file, offset, buffer) on every READ_BLOCK of the files, READ_THREADS at a time, each thread
  with its own aligned buffer; returns the sum of what the jobs return."""
  from convert import direct_io
  local = threading.local()

  def run(task: tuple[pathlib.Path, int]) -> int:
    if not hasattr(local, 'buf'):
      local.buf = direct_io.BufferPool(0).get(READ_BLOCK)
    return job(*task, local.buf)

  tasks = [(f, offset) for f in files for offset in range(0, f.stat().st_size, READ_BLOCK)]
  with futures.ThreadPoolExecutor(READ_THREADS) as pool:
    return sum(pool.map(run, tasks))


def direct_read_speed(files: list[pathlib.Path]) -> float:
  """Cold reads with O_DIRECT, READ_THREADS at a time."""
  from convert import direct_io
  drop_cache(files)
  start = time.perf_counter()
  total = _each_block(files, direct_io.pread)
  return total / (time.perf_counter() - start)


def copy_speed(files: list[pathlib.Path], work: pathlib.Path) -> float:
  """Cold shards copied into work/ with O_DIRECT both ways and synced: the most that a conversion, which
  reads and writes every byte once, can reach on this disk."""
  from convert import direct_io
  drop_cache(files)
  fds = {f: direct_io.open_direct(work / f.name, os.O_WRONLY | os.O_CREAT)[0] for f in files}

  def copy(file: pathlib.Path, offset: int, buf: np.ndarray) -> int:
    n = direct_io.pread(file, offset, buf)
    os.pwrite(fds[file], buf[:direct_io.aligned(n)], offset)  # whole blocks; the copies are not kept
    return n

  try:
    start = time.perf_counter()
    total = _each_block(files, copy)
    for fd in fds.values():
      os.fsync(fd)
    return total / (time.perf_counter() - start)
  finally:
    for f, fd in fds.items():
      os.close(fd)
      (work / f.name).unlink()


def write_speed(path: pathlib.Path, nbytes: int) -> float:
  block = np.random.default_rng(1).bytes(READ_BLOCK)
  start = time.perf_counter()
  with open(path, 'wb') as f:
    for _ in range(max(1, nbytes // READ_BLOCK)):
      f.write(block)
    f.flush()
    os.fsync(f.fileno())
  seconds = time.perf_counter() - start
  written = path.stat().st_size
  path.unlink()
  return written / seconds


def peak_rss() -> int:
  """This process's peak resident memory in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
  from the parent across fork and exec, and the parent held the synthetic tensors."""
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith('VmHWM:'):
      return int(line.split()[1]) * 1024
  raise RuntimeError('no VmHWM in /proc/self/status: this benchmark needs Linux')


def child(src: str, dst: str) -> None:
  """The measured conversion, alone in its process."""
  from convert.core import hf_to_orbax
  baseline = peak_rss()
  start, cpu = time.perf_counter(), time.process_time()
  hf_to_orbax(src, dst, progress=False)
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  peak = peak_rss()
  print(json.dumps({'seconds': seconds, 'cpu_seconds': cpu, 'peak_rss': peak, 'baseline_rss': baseline}))


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--layers', type=int, default=4, help='7B-shaped decoder layers (default 4)')
  p.add_argument('--gb', type=float, help='instead of --layers: about this many GB in all')
  p.add_argument('--vit-layers', type=int, default=2)
  p.add_argument('--shard-gb', type=float, default=2.0)
  p.add_argument('--dir', default=None, help='working directory (default: a new one under $TMPDIR)')
  p.add_argument('--keep', action='store_true', help='keep the synthetic checkpoint and the output')
  p.add_argument('--child', nargs=2, metavar=('SRC', 'DST'), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    child(*args.child)
    return
  layers = layers_for(args.gb, args.vit_layers) if args.gb else args.layers
  load_at_start = os.getloadavg()[0]  # other processes on the machine compete for CPU and disk
  work = pathlib.Path(tempfile.mkdtemp(prefix='qwenvl-bench-', dir=args.dir))
  try:
    src, dst = work / 'released', work / 'orbax'
    files = write_checkpoint(src, layers, args.vit_layers, int(args.shard_gb * GB))
    sizes = [f.stat().st_size for f in files]
    buffered, direct = read_speed(files), direct_read_speed(files)
    read = max(buffered, direct)
    write = write_speed(work / 'write-test', max(sizes))
    copy = copy_speed(files, work)
    out = subprocess.run([sys.executable, '-m', 'bench.convert', '--child', str(src), str(dst)],
                         cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    run = json.loads(out.strip().splitlines()[-1])
    total = sum(sizes)
    report = {
        'date': time.strftime('%Y-%m-%d'), 'machine': f'{platform.machine()}, {os.cpu_count()} CPUs',
        'load_avg_at_start': load_at_start, 'load_avg_at_end': os.getloadavg()[0],
        'decoder_layers': layers, 'vit_layers': args.vit_layers, 'shards': len(files),
        'checkpoint_gb': total / GB, 'largest_shard_gb': max(sizes) / GB,
        'read_gb_s': read / GB, 'read_buffered_gb_s': buffered / GB, 'read_direct_gb_s': direct / GB,
        'write_gb_s': write / GB, 'copy_gb_s': copy / GB,
        'convert_s': run['seconds'], 'convert_gb_s': total / run['seconds'] / GB,
        'convert_cpu_s': run['cpu_seconds'],  # all threads, user + system
        'throughput_vs_read': total / run['seconds'] / read,
        'throughput_vs_buffered_read': total / run['seconds'] / buffered,
        'throughput_vs_write': total / run['seconds'] / write,
        'throughput_vs_copy': total / run['seconds'] / copy,
        'peak_rss_gb': run['peak_rss'] / GB, 'baseline_rss_gb': run['baseline_rss'] / GB,
        'peak_rss_vs_largest_shard': run['peak_rss'] / max(sizes),
    }
    print(json.dumps(report, indent=2))
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
