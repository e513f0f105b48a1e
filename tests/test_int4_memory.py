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
from test_load_memory import LOAD_PEAK

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_synthetic_int4(root, layers: int, vocab: int) -> int:
  """An Int4 checkpoint of the released widths (4096 hidden, 11008 mlp, 1 ViT layer) with random values,
  written one tensor at a time; returns its bytes."""
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
