"""Time and host peak of a quantized load (`quant.load`, int8 by default) of a synthetic float checkpoint.

  python -m bench.quant_load [--layers 8] [--mode int8] [--dir DIR]

Writes a bfloat16 released-layout checkpoint of `--layers` decoder layers at width 2048 (MLP 11008, a
1024-token vocabulary, one small ViT layer), then loads it quantized in a child process on the CPU: wall
time and VmHWM growth over the child's JAX start (`tests/processes.HWM_PREAMBLE`'s measure). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ''):
  sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = '''
import json, pathlib, sys, time
import jax
def hwm():
  return next(int(l.split()[1]) * 1024 for l in pathlib.Path('/proc/self/status').read_text().splitlines()
              if l.startswith('VmHWM:'))
jax.numpy.zeros(1).block_until_ready()
from qwenvl_jax import quant
before, start = hwm(), time.perf_counter()
params, config = quant.load(sys.argv[1], sys.argv[2], 'float32')
jax.block_until_ready(params)
print(json.dumps({'seconds': time.perf_counter() - start, 'grown': hwm() - before,
                  'params': sum(x.nbytes for x in jax.tree.leaves(params))}))
'''


def width_2048_config(layers: int) -> dict:
  """A released config.json of `layers` decoder layers at width 2048 (the quantized-load tests' shape)."""
  from bench.convert import synthetic_config
  config = synthetic_config(layers, 1)
  config.update(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, kv_channels=128,
                vocab_size=1024)
  config['visual'].update(output_dim=2048, image_start_id=1024 - 3, width=256, heads=4)
  return config


def write_float_checkpoint(root: pathlib.Path, config: dict, shard_size: int = 10**9) -> int:
  """Random bfloat16 tensors of `config` in the released layout, one tensor held at a time; its bytes."""
  import ml_dtypes
  from convert import hf
  from convert.core import released_order
  from qwenvl_jax.config import QwenVLConfig
  from qwenvl_jax.params import rules
  table = rules(QwenVLConfig.from_dict(config))
  bf16 = np.dtype(ml_dtypes.bfloat16)
  specs = [hf.TensorSpec(n, bf16, table[n].hf_shape) for n in released_order(table)]
  rng = np.random.default_rng(0)
  root.mkdir(parents=True)
  (root / 'config.json').write_text(json.dumps(config))
  hf.write_released(root, specs, (rng.standard_normal(s.shape, np.float32).astype(bf16) for s in specs),
                    shard_size)
  return sum(s.nbytes for s in specs)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--layers', type=int, default=8)
  p.add_argument('--mode', default='int8', choices=('int8', 'int4'))
  p.add_argument('--dir', default=None, help='working directory (default: a new one under $TMPDIR)')
  args = p.parse_args(argv)
  work = pathlib.Path(tempfile.mkdtemp(prefix='qwenvl-qload-', dir=args.dir))
  try:
    stored = write_float_checkpoint(work / 'hf', width_2048_config(args.layers))
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    out = subprocess.run([sys.executable, '-c', CHILD, str(work / 'hf'), args.mode], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    run = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'layers': args.layers,
                      'mode': args.mode, 'stored_gb': stored / 1e9, 'load_s': round(run['seconds'], 2),
                      'host_grown_gb': round(run['grown'] / 1e9, 3),
                      'params_gb': round(run['params'] / 1e9, 3),
                      'load_avg': os.getloadavg()[0]}, indent=2))
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
