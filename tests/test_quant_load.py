"""A quantized base read onto its shardings kernel by kernel (`quant.load`, Q-LoRA's init_from): bit-identical
to quantizing the whole float tree, on one device and split over 2 devices (FSDP and tensor parallelism
split some kernels along their inputs), from the released layout and from a converted checkpoint; and the
host peak is the quantized base plus one float tensor, not the float base.

The mesh tests need two devices: `test_in_a_two_device_process` runs this file again in a process with two
simulated CPU devices, where it is the one test skipped.
"""
import json
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

from processes import FAST_CODEGEN, HWM_PREAMBLE, pytest_on_two_devices, run_measured

from convert.core import hf_to_orbax
from qwenvl_jax import load_pretrained, param_layout, quant, quant_blocks, sharding as sh
from qwenvl_jax.model import QwenVL, param_shapes

ROOT = pathlib.Path(__file__).resolve().parents[1]
TWO = jax.device_count() == 2
needs_two = pytest.mark.skipif(not TWO, reason='runs inside test_in_a_two_device_process')


@pytest.fixture(scope='module')
def sources(golden_dir, tmp_path_factory):
  """The golden checkpoint in the released layout and converted."""
  converted = tmp_path_factory.mktemp('quant_load') / 'converted'
  hf_to_orbax(golden_dir / 'checkpoint', converted, progress=False)
  return {'released': golden_dir / 'checkpoint', 'converted': converted}


def _assert_quantized_whole(got, source, mode, dtype='float32', shardings=None):
  """`got` equals quantizing the whole float tree of `source` bit for bit (and sits on `shardings`);
  returns the quantized leaves split along a dim their scale lacks (an input dim)."""
  model, whole = load_pretrained(source, dtype=dtype)
  want = param_layout.flatten(quant.quantize(whole, model.config, mode))
  got = param_layout.flatten(got)
  placed = param_layout.flatten(shardings) if shardings is not None else {}
  assert got.keys() == want.keys()
  split_inputs = []
  for path, x in got.items():
    assert x.dtype == want[path].dtype and x.shape == want[path].shape, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[path]), err_msg='/'.join(path))
    if path in placed:
      assert x.sharding == placed[path], path
    if path[-1] in quant_blocks.QUANTIZED_NAMES.values():
      names = param_layout.leaf_axes(path, x.shape)
      kept = param_layout.axes_of(path[:-1] + ('scale',))
      block = x.sharding.shard_shape(x.shape)
      if any(b < s and n not in kept for b, s, n in zip(block, x.shape, names)):
        split_inputs.append(path)
  return split_inputs


@pytest.mark.skipif(TWO, reason='the two-device process runs the mesh tests')
@pytest.mark.parametrize('mode,layout,dtype', [('int8', 'released', 'float32'), ('int4', 'released', 'bfloat16'),
                                               ('int4', 'converted', 'float32')])
def test_quantized_load_equals_quantizing_the_float_tree(sources, mode, layout, dtype, monkeypatch):
  """Quantized a few float rows at a time (a small block here), as at the released size."""
  monkeypatch.setattr(quant_blocks, 'BLOCK_BYTES', 4096)
  params, config = quant.load(sources[layout], mode, dtype, split_layers=True)
  assert config.weights == mode
  _assert_quantized_whole(params, sources[layout], mode, dtype)


@pytest.mark.slow
@pytest.mark.skipif(TWO, reason='this is the two-device process')
def test_in_a_two_device_process(tmp_path):
  pytest_on_two_devices(__file__, tmp_path)


@needs_two
@pytest.mark.parametrize('mesh_spec,rules', [('fsdp=2', 'fsdp'), ('tensor=2', 'tp')])
@pytest.mark.parametrize('mode', ['int8', 'int4'])
@pytest.mark.parametrize('layout', ['released', 'converted'])
def test_quantized_load_onto_a_mesh_is_bit_identical(sources, mesh_spec, rules, mode, layout, monkeypatch):
  """Each device's blocks quantized from the float rows of its output channels equal the whole tree
  quantized and then split, also where a kernel is split along its inputs."""
  monkeypatch.setattr(quant_blocks, 'BLOCK_BYTES', 4096)
  model, _ = load_pretrained(sources['released'])
  shapes = param_shapes(QwenVL(quant.quantized_config(model.config, mode)))
  shardings = sh.param_shardings(sh.make_mesh(mesh_spec), shapes, rules)
  params, _ = quant.load(sources[layout], mode, 'float32', shardings=shardings)
  assert _assert_quantized_whole(params, sources[layout], mode, shardings=shardings)


@needs_two
@pytest.mark.parametrize('mode', ['float', 'int8'])
def test_a_replicated_block_is_read_once(sources, monkeypatch, mode):
  """A converted checkpoint onto 2 devices that both hold every leaf: each host reads every stored byte
  once, not once per device."""
  from qwenvl_jax import orbax_leaves
  read = orbax_leaves.LeafReader.read
  counted = {}

  def counting(self, path, index=()):
    out = read(self, path, index)
    counted[path] = counted.get(path, 0) + out.nbytes
    return out
  monkeypatch.setattr(orbax_leaves.LeafReader, 'read', counting)
  replicated = jax.sharding.NamedSharding(sh.make_mesh('fsdp=2'), jax.sharding.PartitionSpec())
  params, _ = quant.load(sources['converted'], mode, 'float32', shardings=replicated)
  assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(params))
  stored = {p: int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
            for p, m in orbax_leaves.LeafReader(sources['converted'] / 'params').metadata.items()}
  assert counted == stored


@needs_two
def test_each_block_is_quantized_on_its_own_device(sources, monkeypatch):
  """The float rows of a block go from the host straight to each device that holds it and are quantized
  there (not on the first device, then back through the host to their own device)."""
  calls = []
  init = quant_blocks.QuantizedKernel.__init__

  def spied(self, *args):
    init(self, *args)
    jitted = self.quantize

    def quantize(w, path):
      q, scale = jitted(w, path)
      calls.append((w, q, scale))
      return q, scale
    self.quantize = quantize
  monkeypatch.setattr(quant_blocks.QuantizedKernel, '__init__', spied)
  model, _ = load_pretrained(sources['released'])
  shapes = param_shapes(QwenVL(quant.quantized_config(model.config, 'int8')))
  shardings = sh.param_shardings(sh.make_mesh('fsdp=2'), shapes, 'fsdp')
  quant.load(sources['converted'], 'int8', 'float32', shardings=shardings)
  devices = set()
  for w, q, scale in calls:
    assert isinstance(w, jax.Array) and len(w.devices()) == 1, type(w)
    assert q.devices() == scale.devices() == w.devices()
    devices |= w.devices()
  assert devices == set(jax.devices())


@needs_two
@pytest.mark.parametrize('mode,layout', [('float', 'released'), ('int8', 'converted'), ('int4', 'packed')])
def test_load_onto_reads_straight_onto_the_mesh(sources, golden_dir, mode, layout):
  """`quant.load_onto` (qwenvl-eval --mesh): every leaf on its logical axes' sharding, the values of a
  one-device load; float weights, quantized ones, and the released Int4 layout kept packed."""
  path = golden_dir / 'int4' / 'checkpoint' if layout == 'packed' else sources[layout]
  mesh = sh.make_mesh('tensor=2')
  params, config = quant.load_onto(path, mode, 'float32', mesh, 'tp')
  want, want_config = quant.load(path, mode, 'float32')
  assert config == want_config
  shardings = param_layout.flatten(sh.param_shardings(mesh, param_shapes(QwenVL(config)), 'tp'))
  want, params = param_layout.flatten(want), param_layout.flatten(params)
  assert params.keys() == want.keys() == shardings.keys()
  split = 0
  for path, x in params.items():
    assert x.sharding == shardings[path] and x.dtype == want[path].dtype, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[path]), err_msg='/'.join(path))
    split += x.sharding.shard_shape(x.shape) != x.shape
  assert split >= 10


@needs_two
def test_qlora_init_from_a_float_checkpoint_onto_the_mesh(sources):
  """The trainer's Q-LoRA base from a float init_from on an fsdp=2 mesh: quantized on the way, on the
  quantized base's shardings, equal to the whole float tree quantized."""
  from train.config import stage_config
  from train.state import make_layout, run_optimizer
  from train.trainer import base_model_config, initial_weights, run_model_config
  cfg = stage_config(3, init_from=str(sources['released']), lora=True, lora_rank=4, weights='int8',
                     image_size=112, dtype='float32', batch_size=2, grad_accum=1)
  model = QwenVL(run_model_config(cfg, base_model_config(cfg)))
  optimizer = run_optimizer(cfg, model)
  layout = make_layout(cfg, model, optimizer, 'fsdp=2')
  params = initial_weights(cfg, None, layout.param_shardings())
  assert _assert_quantized_whole(params, sources['released'], 'int8', shardings=layout.param_shardings())


# A quantized load in a fresh process: its VmHWM before and after, and the float base's bytes it read.
QUANTIZED_PEAK = HWM_PREAMBLE + '''
from qwenvl_jax import param_layout, quant
before = hwm()
params, config = quant.load(sys.argv[1], sys.argv[2], 'float32')
jax.block_until_ready(params)
shapes = param_layout.leaf_shapes(config.replace(weights='float'))
print(json.dumps({'before': before, 'after': hwm(), 'params': sum(x.nbytes for x in jax.tree.leaves(params)),
                  'float': sum(4 * int(jax.numpy.prod(jax.numpy.array(s))) for s in shapes.values())}))
'''


@pytest.mark.slow
@pytest.mark.skipif(TWO, reason='the one-device process runs it')
@pytest.mark.skipif(not pathlib.Path('/proc/self/status').exists(), reason='reads VmHWM: Linux only')
def test_quantized_load_peak_is_the_quantized_base_plus_a_tensor(tmp_path):
  """A decoder of 8 layers at width 2048 (1.6 GB in float32), read as int8: the host grows by the
  quantized base plus a fixed overhead (the quantizer's compiled ops, a block of float rows), far below
  the float base the whole-tree path held first."""
  sys.path.insert(0, str(ROOT))
  from bench.convert import synthetic_config
  from convert import hf
  from convert.core import released_order
  from qwenvl_jax.config import QwenVLConfig
  from qwenvl_jax.params import rules
  import ml_dtypes
  config = synthetic_config(8, 1)
  config.update(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, kv_channels=128,
                vocab_size=1024)
  config['visual'].update(output_dim=2048, image_start_id=1024 - 3, width=256, heads=4)
  table = rules(QwenVLConfig.from_dict(config))
  bf16 = np.dtype(ml_dtypes.bfloat16)
  specs = [hf.TensorSpec(n, bf16, table[n].hf_shape) for n in released_order(table)]
  rng = np.random.default_rng(0)
  root = tmp_path / 'hf'
  root.mkdir()
  (root / 'config.json').write_text(json.dumps(config))
  hf.write_released(root, specs, (rng.standard_normal(s.shape, np.float32).astype(bf16) for s in specs), 10**9)
  # XLA's own code generation, as users run it: the quantizer's compiled temporaries follow its fusions,
  # which the suite's fast code generation turns off (each op's result in a buffer of its own)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT),
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '').replace(FAST_CODEGEN, ''))
  [(out, _)] = run_measured([[sys.executable, '-c', QUANTIZED_PEAK, str(root), 'int8']], env, tmp_path)
  m = json.loads(out.strip().splitlines()[-1])
  grown = m['after'] - m['before']
  print(f"float base {m['float'] / 1e9:.2f} GB, quantized {m['params'] / 1e9:.2f} GB, grown {grown / 1e9:.2f} GB")
  # measured: 0.69 GB of a 1.73 GB float base (0.51 GB quantized; 0.80 GB when each block was quantized
  # by jax ops on the first device and brought back); the whole-tree path (float load, then
  # `quant.quantize`) grew by 3.12 GB
  assert grown < 0.6 * m['float'], m
  assert grown < m['params'] + 0.4e9, m  # + the quantizer's compiled ops and a block of float rows
