"""Reading the Int4 layout at the released widths: the host peak of a load is the parameters plus about a
layer, dequantized or packed (a synthetic checkpoint of random values; slow)."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from qwenvl_jax.gptq import GptqConfig
from qwenvl_jax.gptq_checkpoint import quantized_rules
from processes import HWM_PREAMBLE
from test_load_memory import LOAD_PEAK

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_synthetic_int4(root, layers: int, vocab: int, as_safetensors_orders: bool = False) -> int:
  """An Int4 checkpoint of the released widths (4096 hidden, 11008 mlp, 1 ViT layer) with random values,
  written one tensor at a time, in one shard; returns its bytes. `as_safetensors_orders`: the tensors in
  the order the safetensors library stores them (by dtype, then name: the int32 parts of every layer
  first), else a layer's parts together."""
  sys.path.insert(0, str(ROOT))
  from bench.convert import synthetic_config
  from convert import hf
  from qwenvl_jax.config import QwenVLConfig
  from qwenvl_jax.gptq_checkpoint import int4_specs
  config = synthetic_config(layers, 1)
  config['vocab_size'] = vocab
  config['visual']['image_start_id'] = vocab - 3
  config['quantization_config'] = GptqConfig().to_dict()
  cfg = QwenVLConfig.from_dict(config)
  layers_ = quantized_rules(cfg)
  rng = np.random.default_rng(0)

  def array(name, dtype, shape):
    layer, _, part = name.rpartition('.')
    if layer not in layers_ or part in ('scales', 'bias') and not layer.endswith('c_attn'):
      scale = 0.01 if part == 'scales' else 0 if part == 'bias' else 1
      return (rng.standard_normal(shape, np.float32) * scale).astype(dtype)
    if part == 'qweight':
      return rng.integers(-2**31, 2**31, shape, np.int64).astype(np.int32)
    if part == 'qzeros':
      return np.full(shape, 0x77777777, np.int32)
    if part == 'g_idx':
      return (np.arange(shape[0]) // 128).astype(np.int32)
    return rng.standard_normal(shape, np.float32).astype(dtype)  # c_attn's bias

  specs = [hf.TensorSpec(*s) for s in int4_specs(cfg, GptqConfig())]
  if as_safetensors_orders:
    specs.sort(key=lambda s: (-s.dtype.itemsize, s.dtype.name, s.name))
  root.mkdir(parents=True)
  (root / 'config.json').write_text(json.dumps(config))
  hf.write_released(root, specs, (array(s.name, s.dtype, s.shape) for s in specs), 10**9)
  return sum(s.nbytes for s in specs)


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path('/proc/self/status').exists(), reason='reads VmHWM: Linux only')
@pytest.mark.parametrize('form', ['dequantized', 'packed'])
def test_released_widths_load_layer_by_layer(tmp_path, form):
  """At the released widths the host peak of a load is the parameters plus about a layer, dequantized
  (bfloat16) or packed."""
  stored = write_synthetic_int4(tmp_path / 'int4', layers=6, vocab=16384)
  out = subprocess.run([sys.executable, '-c', LOAD_PEAK, str(tmp_path / 'int4'), form], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  m = json.loads(out.strip().splitlines()[-1])
  grown = m['after'] - m['before']
  print(f'{form}: stored {stored / 1e9:.2f} GB, params {m["params"] / 1e9:.2f} GB, peak growth '
        f'{grown / 1e9:.2f} GB ({grown / m["params"]:.2f}x the params)')
  assert grown < 1.2 * m['params'], (grown / m['params'], m)


# The Int4 reader alone (no params kept): VmHWM growth while every packed layer is read and dropped.
READ_PEAK = HWM_PREAMBLE + '''
from qwenvl_jax import gptq, gptq_checkpoint
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.released_layout import ReleasedCheckpoint
root = sys.argv[1]
quantized = gptq.read_config(root)
config = gptq_checkpoint.packed_config(QwenVLConfig.from_json(root), quantized)
before = hwm()
for _, array in gptq_checkpoint.packed_tensors(ReleasedCheckpoint(root), config, quantized):
  del array
print(json.dumps({'grown': hwm() - before}))
'''


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path('/proc/self/status').exists(), reason='reads VmHWM: Linux only')
def test_a_shard_stored_by_dtype_is_read_a_layer_at_a_time(tmp_path):
  """A shard as the safetensors library stores it (every int32 part of its layers before the first float16
  scale) is read layer by layer: the reader holds about one layer (its parts, then its unpacked values),
  not the shard's int32 parts until their scales come."""
  root = tmp_path / 'int4'
  write_synthetic_int4(root, layers=8, vocab=1024, as_safetensors_orders=True)
  from qwenvl_jax.released_layout import ReleasedCheckpoint
  entries = ReleasedCheckpoint(root).entries.values()
  ints = sum(e.nbytes for e in entries if e.dtype == np.int32)
  layer = sum(e.nbytes for e in entries if e.name.startswith('transformer.h.0.'))
  out = subprocess.run([sys.executable, '-c', READ_PEAK, str(root)], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  grown = json.loads(out.strip().splitlines()[-1])['grown']
  print(f'int32 parts {ints / 1e9:.2f} GB, a layer {layer / 1e9:.2f} GB, '
        f'reader peak growth {grown / 1e9:.2f} GB')
  # measured: 0.18 GB of a 0.82 GB shard of int32 parts (reading in file order held them all: 0.94 GB)
  assert grown < 4 * layer and grown < ints / 2, (grown, layer, ints)
