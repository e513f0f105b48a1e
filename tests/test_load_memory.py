"""Loading for generation: per-layer reads equal the stacked tree, and a converted checkpoint loads onto
one device with a host peak of the parameters plus little (Orbax's own restore took twice the parameters)."""
import json
import pathlib
import subprocess
import sys

import chex
import jax
import pytest

from convert.core import hf_to_orbax
from processes import HWM_PREAMBLE
from qwenvl_jax import load_pretrained
from qwenvl_jax.decode import decode_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_split_layers_equal_the_stacked_tree(golden_dir, tmp_path):
  hf_to_orbax(golden_dir / 'checkpoint', tmp_path / 'c', progress=False)
  _, stacked = load_pretrained(tmp_path / 'c')
  _, split = load_pretrained(tmp_path / 'c', split_layers=True)
  assert sorted(split['decoder']) == ['layers_0', 'layers_1', 'ln_f']
  chex.assert_trees_all_equal(decode_params(stacked), decode_params(split, consume=True))
  assert not jax.tree.leaves(split)  # consumed


def test_head_over_vocabulary_chunks_equals_one_product():
  from qwenvl_jax.layers import Einsum
  kernel = jax.random.normal(jax.random.key(0), (1024, 64)).astype(jax.numpy.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 1, 64))
  head = Einsum((64, 1024), dtype=jax.numpy.float32, param_dtype=jax.numpy.bfloat16, weight_major=True,
                out_chunks=8)
  chunked = jax.jit(lambda k, x: head.apply({'params': {'kernel_t': k}}, 'btd,dv->btv', x))(kernel, x)
  whole = jax.numpy.einsum('btd,vd->btv', x, kernel.astype(jax.numpy.float32))
  chex.assert_trees_all_close(chunked, whole, rtol=1e-5, atol=1e-5)


# A load in a fresh process; its VmHWM before and after (argv: checkpoint dir, then 'packed' to keep an
# Int4 checkpoint packed).
LOAD_PEAK = HWM_PREAMBLE + '''
from qwenvl_jax import load_pretrained
before = hwm()
_, params = load_pretrained(sys.argv[1], dtype='bfloat16', keep_packed=sys.argv[2:] == ['packed'])
jax.block_until_ready(params)
print(json.dumps({'before': before, 'after': hwm(), 'params': sum(x.nbytes for x in jax.tree.leaves(params))}))
'''


@pytest.mark.skipif(not pathlib.Path('/proc/self/status').exists(), reason='reads VmHWM: Linux only')
def test_host_peak_of_a_load_is_the_parameters_plus_little(tmp_path):
  sys.path.insert(0, str(ROOT))
  from bench.convert import write_checkpoint
  write_checkpoint(tmp_path / 'hf', layers=2, vit_layers=1, shard_size=2 * 10**9)  # ~2.7 GB of bf16
  hf_to_orbax(tmp_path / 'hf', tmp_path / 'c', progress=False)
  out = subprocess.run([sys.executable, '-c', LOAD_PEAK, str(tmp_path / 'c')], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  m = json.loads(out.strip().splitlines()[-1])
  grown = m['after'] - m['before']
  assert grown < 1.25 * m['params'], (grown / m['params'], m)  # Orbax's restore: ~1.9x
