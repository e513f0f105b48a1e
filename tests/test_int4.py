"""The released GPTQ Int4 layout: read (dequantized or packed), converted, exported back byte for byte, and
everything it cannot hold exactly refused by name (golden data: ../shared/golden/int4)."""
import json
import shutil

import chex
import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from convert import cli
from convert.int4 import export_int4, rewrite_int4
from qwenvl_jax import load_pretrained, param_layout
from qwenvl_jax.checkpoint import CheckpointFormatError
from qwenvl_jax.config import qwen_vl_7b
from qwenvl_jax.gptq import GptqConfig, UnsupportedQuantizationError, pack, read_config, unpack
from qwenvl_jax.kernel_math import dequantize
from qwenvl_jax.model import param_shapes
from qwenvl_jax.quant import dequantize_kernel, kernel_shape
from qwenvl_jax.gptq_checkpoint import expected_shapes, out_shape, quantized_rules
from qwenvl_jax.jsonfile import ConfigFileError
from qwenvl_jax.params import CheckpointMismatchError, get_path

# Reached (fp32): max abs error 4e-6 (batch) and 6e-6 (long) on logits of magnitude ~4.6.
TOL = dict(rtol=1e-4, atol=1e-5)
LAYER = 'transformer.h.0.mlp.w1'


@pytest.fixture(scope='module')
def int4_dir(golden_dir):
  return golden_dir / 'int4' / 'checkpoint'


@pytest.fixture(scope='module')
def golden_int4(golden_dir):
  return load_file(str(golden_dir / 'int4' / 'golden_int4.safetensors'))


def read_int4(root):
  """Every stored tensor by name, and each shard's safetensors metadata."""
  tensors, metadata = {}, {}
  for file in sorted(root.glob('*.safetensors')):
    tensors.update(load_file(str(file)))
    with safe_open(str(file), 'np') as f:
      metadata[file.name] = f.metadata()
  return tensors, metadata


@pytest.fixture(scope='module')
def stored(int4_dir):
  return read_int4(int4_dir)


@pytest.fixture(scope='module')
def dequantized(int4_dir):
  return load_pretrained(int4_dir)


@pytest.fixture(scope='module')
def packed(int4_dir):
  return load_pretrained(int4_dir, keep_packed=True)


def parts(tensors, layer=LAYER):
  return {p: tensors[f'{layer}.{p}'] for p in ('qweight', 'qzeros', 'scales', 'g_idx', 'bias')}


def test_layout_read_from_the_golden_files(stored):
  """The packing the README states, checked value by value with plain bit arithmetic on one layer: eight
  nibbles per int32 along the input dim, lowest first; zeros packed along the output dim, stored minus 1."""
  tensors, _ = stored
  p = parts(tensors)
  out = unpack(LAYER, p, GptqConfig())
  qweight, qzeros = p['qweight'].view(np.uint32), p['qzeros'].view(np.uint32)
  rng = np.random.default_rng(0)
  for i, o in zip(rng.integers(0, p['g_idx'].shape[0], 64), rng.integers(0, p['scales'].shape[1], 64)):
    g = p['g_idx'][i]
    nibble = int(qweight[i // 8, o]) >> (4 * (i % 8)) & 15
    zero = (int(qzeros[g, o // 8]) >> (4 * (o % 8)) & 15) + 1
    assert zero == 8 and out['q'][i, o] == nibble - zero
    w = dequantize(out['q'], out['scale'], 'io', 'o', np.float32)
    assert w[i, o] == np.float32(p['scales'][g, o]) * (nibble - zero)
  assert out['q'].dtype == np.int8 and out['scale'].dtype == np.float16
  assert -8 <= out['q'].min() and out['q'].max() <= 7 and len(np.unique(out['q'])) == 16
  repacked = pack(out['q'], out['scale'], p['bias'])
  for name, a in p.items():
    assert repacked[name].dtype == a.dtype and repacked[name].tobytes() == a.tobytes(), name


def test_dequantized_load_reproduces_golden_logits(dequantized, golden, golden_int4):
  model, params = dequantized
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params)) and model.config.weights == 'float'
  batch, long = _golden_logits(model, params, golden, golden_int4)
  chex.assert_trees_all_close(batch, golden_int4['batch.logits'], **TOL)
  chex.assert_trees_all_close(long, golden_int4['long.logits'], **TOL)


def _shapes(tree):
  return {p: (tuple(x.shape), np.dtype(x.dtype) if x.dtype in (np.int8, np.uint8) else None)
          for p, x in param_layout.flatten(tree).items()}


def _golden_logits(model, params, golden, golden_int4):
  pixels = golden['pixel_values'][:2].transpose(0, 2, 3, 1)
  batch = jax.jit(lambda p, ids, px: model.apply({'params': p}, ids, px))(
      params, golden_int4['batch.input_ids'], pixels)
  long = jax.jit(lambda p, ids: model.apply({'params': p}, ids))(params, golden_int4['long.input_ids'])
  return batch, long


def test_packed_form_dequantizes_to_the_same_params(packed, dequantized):
  """Kept packed: `q` (uint8, two values per byte along the float kernel's last input dim) and `scale`
  (float16 [layers, groups, *out dims]) in place of each quantized `kernel`; with `dequantize` exactly the
  dequantized load (so its logits)."""
  model, params = packed
  _, reference = dequantized
  quantized = set()
  for rule in quantized_rules(model.config).values():
    quantized.add(rule.path)
    module = get_path(params, rule.path[:-1])
    assert 'kernel' not in module and module['q'].dtype == np.uint8
    float_kernel = get_path(reference, rule.path)
    groups = rule.hf_shape[1] // 128
    assert kernel_shape(module['q'], rule.path[:-1] + ('q',)) == float_kernel.shape
    assert module['q'].size * 2 == float_kernel.size and module['scale'].dtype == np.float16
    assert module['scale'].shape == (rule.num_layers, groups) + out_shape(rule)
    q_path = rule.path[:-1] + ('q',)
    chex.assert_trees_all_equal(dequantize_kernel(module['q'], module['scale'], q_path), float_kernel)
  assert len(quantized) == 5
  for path, leaf in jax.tree_util.tree_flatten_with_path(reference)[0]:  # the float leaves alike
    path = tuple(k.key for k in path)
    if path not in quantized:
      chex.assert_trees_all_equal(get_path(params, path), leaf)
  assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(reference)) + len(quantized)


def assert_same_int4(out, int4_dir, stored):
  """Every tensor of `out` byte-identical to the golden's, the same shard metadata and Int4 configs."""
  tensors, metadata = stored
  written, written_metadata = read_int4(out)
  assert sorted(written) == sorted(tensors)
  for name, a in tensors.items():
    assert (written[name].dtype, written[name].shape) == (a.dtype, a.shape), name
    assert written[name].tobytes() == a.tobytes(), name
  assert {json.dumps(m) for m in written_metadata.values()} == {json.dumps(m) for m in metadata.values()}
  config, original = (json.loads((d / 'config.json').read_text()) for d in (out, int4_dir))
  assert config['quantization_config'] == original['quantization_config']
  assert config['torch_dtype'] == 'float16'
  quantize, original = (json.loads((d / 'quantize_config.json').read_text()) for d in (out, int4_dir))
  assert quantize == original


def test_export_is_byte_identical(packed, stored, int4_dir, tmp_path):
  """Packed tree (float leaves in float32) -> Int4 files: the golden's bytes."""
  model, params = packed
  out = export_int4(params, model.config, tmp_path / 'out', shard_size=10**6, src=int4_dir)
  assert len(list(out.glob('*.safetensors'))) > 2  # sharded by size, not as the golden
  assert_same_int4(out, int4_dir, stored)
  _, again = load_pretrained(out, keep_packed=True)  # and it loads as the original does
  chex.assert_trees_all_equal(again, params)


def test_export_refuses_a_tree_the_layout_cannot_hold(packed, tmp_path):
  """lm_head is float in the Int4 layout: a tree with it quantized is refused by name, nothing written."""
  model, params = packed
  head = params['lm_head']['kernel']
  tree = {**params, 'lm_head': {'q': np.zeros(head.shape, np.int8), 'scale': np.ones((2, head.shape[1]))}}
  with pytest.raises(CheckpointMismatchError, match='missing: lm_head/kernel'):
    export_int4(tree, model.config, tmp_path / 'out')
  assert list(tmp_path.iterdir()) == []  # nor a temporary directory


def test_desc_act_in_order_and_one_group(int4_dir, packed, tmp_path):
  """desc_act with the groups in order is the plain layout; group_size -1 (one group per layer) loads and
  exports back byte for byte."""
  src = edited_copy(int4_dir, tmp_path / 'a', config=lambda c: c['quantization_config'].update(desc_act=True))
  chex.assert_trees_all_equal(load_pretrained(src, keep_packed=True)[1], packed[1])

  def one_group(t):
    for layer in quantized_rules(packed[0].config):
      t[f'{layer}.scales'], t[f'{layer}.qzeros'] = t[f'{layer}.scales'][:1], t[f'{layer}.qzeros'][:1]
      t[f'{layer}.g_idx'] = np.zeros_like(t[f'{layer}.g_idx'])
  src = edited_copy(int4_dir, tmp_path / 'b', one_group,
                    lambda c: c['quantization_config'].update(group_size=-1))
  model, params = load_pretrained(src, keep_packed=True)
  assert params['decoder']['layers']['mlp']['w1']['scale'].shape == (2, 1, 256)  # [layers, groups, out]
  assert model.config.group_size == -1 and _shapes(params) == _shapes(param_shapes(model))
  out = export_int4(params, model.config, tmp_path / 'out', GptqConfig(group_size=-1), src=src)
  (tensors, _), (written, _) = read_int4(src), read_int4(out)
  assert sorted(written) == sorted(tensors)
  assert all(written[n].dtype == a.dtype and written[n].tobytes() == a.tobytes() for n, a in tensors.items())


def test_cli_rewrites_int4(int4_dir, stored, tmp_path, capsys):
  assert cli.main([str(int4_dir), str(tmp_path / 'out'), '--to-int4', '--quiet']) == 0
  assert_same_int4(tmp_path / 'out', int4_dir, stored)


def test_rewrite_streams_the_bytes_of_a_packed_load(int4_dir, tmp_path, monkeypatch):
  """--to-int4 writes what exporting the checkpoint's packed load in its dtype writes, file for file and
  byte for byte, read and written on the host without a device (bfloat16: c_attn's float16 bias goes
  through it as the load holds it; float16 is the golden files' own test)."""
  dtype = 'bfloat16'
  model, params = load_pretrained(int4_dir, dtype=dtype, keep_packed=True)
  want = export_int4(params, model.config, tmp_path / 'want', read_config(int4_dir), dtype, src=int4_dir)

  def on_a_device(*args, **kw):
    raise AssertionError('put on a device')
  monkeypatch.setattr(jax, 'device_put', on_a_device)
  got = rewrite_int4(int4_dir, tmp_path / 'got', dtype)
  files = sorted(p.name for p in want.iterdir())
  assert sorted(p.name for p in got.iterdir()) == files and any(f.endswith('.safetensors') for f in files)
  for name in files:
    assert (got / name).read_bytes() == (want / name).read_bytes(), name


def test_int4_without_its_quantization_config(int4_dir, tmp_path, capsys):
  src = shutil.copytree(int4_dir, tmp_path / 'float')
  d = json.loads((src / 'config.json').read_text())
  del d['quantization_config']
  (src / 'config.json').write_text(json.dumps(d))
  assert cli.main([str(src), str(tmp_path / 'o'), '--to-int4', '--quiet']) == 1
  assert 'config.json has no quantization_config' in capsys.readouterr().err
  with pytest.raises(CheckpointMismatchError, match='packed GPTQ tensors, but config.json has no quant'):
    load_pretrained(src)


def test_convert_dequantizes_to_float32(int4_dir, dequantized, tmp_path):
  assert cli.main([str(int4_dir), str(tmp_path / 'orbax'), '--quiet']) == 0
  assert 'quantization_config' not in json.loads((tmp_path / 'orbax' / 'config.json').read_text())
  _, params = load_pretrained(tmp_path / 'orbax')
  chex.assert_trees_all_equal(params, dequantized[1])


def test_released_int4_names_and_dims():
  """The released 9.6B model's Int4 layout: its dims pack and group exactly (11008 = 86 groups of 128)."""
  shapes = expected_shapes(qwen_vl_7b(), GptqConfig())
  assert shapes['transformer.h.31.attn.c_attn.qweight'] == (512, 12288)
  assert shapes['transformer.h.31.attn.c_attn.qzeros'] == (32, 1536)
  assert shapes['transformer.h.0.mlp.c_proj.scales'] == (86, 4096)
  assert shapes['transformer.h.0.mlp.c_proj.g_idx'] == (11008,)
  # Per layer 5 weights become 5 x 5 parts, one of which (c_attn.bias) is the float model's own.
  assert 'transformer.h.0.mlp.w2.weight' not in shapes and len(shapes) == 853 + 32 * (5 * 5 - 5 - 1)


# ----------------------------------------------------------------------------------- refusals

def edited_copy(int4_dir, dst, tensors=None, config=None):
  """A copy of the golden Int4 checkpoint with `tensors(dict)` and `config(dict)` applied in place."""
  shutil.copytree(int4_dir, dst)
  if tensors is not None:
    index = json.loads((dst / 'model.safetensors.index.json').read_text())
    every = {}
    for file in sorted(dst.glob('*.safetensors')):
      every.update(load_file(str(file)))
    tensors(every)
    weight_map = {n: index['weight_map'].get(n, 'model-00001-of-00002.safetensors') for n in every}
    for file in set(index['weight_map'].values()):
      save_file({n: a for n, a in every.items() if weight_map[n] == file}, str(dst / file),
                metadata={'format': 'pt'})
    (dst / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
  if config is not None:
    d = json.loads((dst / 'config.json').read_text())
    config(d)
    (dst / 'config.json').write_text(json.dumps(d))
  return dst


def _set(tensors, name, edit):
  a = tensors[name].copy()
  edit(a)
  tensors[name] = a


def _reversed_groups(a):
  a[:] = a[::-1]


REFUSED = {
    'bits': (None, lambda c: c['quantization_config'].update(bits=8),
             UnsupportedQuantizationError, 'quantization_config.bits 8 is not supported'),
    'sym': (None, lambda c: c['quantization_config'].update(sym=False),
            UnsupportedQuantizationError, 'sym false'),
    'group_size': (None, lambda c: c['quantization_config'].update(group_size=96),
                   UnsupportedQuantizationError, 'group_size 96 does not divide the input dim 256'),
    'group_size_type': (None, lambda c: c['quantization_config'].update(group_size='128'),
                        ConfigFileError, "key 'quantization_config.group_size': expected an integer"),
    'format': (None, lambda c: c['quantization_config'].update(checkpoint_format='gptq_v2'),
               UnsupportedQuantizationError, "checkpoint_format 'gptq_v2'"),
    'g_idx': (lambda t: _set(t, f'{LAYER}.g_idx', _reversed_groups), None,
              UnsupportedQuantizationError, f'{LAYER}.g_idx: input channels are not in consecutive groups'),
    'zeros': (lambda t: _set(t, f'{LAYER}.qzeros', lambda a: a.__setitem__((1, 3), a[1, 3] + 1)), None,
              UnsupportedQuantizationError, f'{LAYER}.qzeros: asymmetric zero points [9]'),
    'bias': (lambda t: _set(t, f'{LAYER}.bias', lambda a: a.__setitem__(5, 0.5)), None,
             UnsupportedQuantizationError, f'{LAYER}.bias: non-zero, but the original layer has no bias'),
    'dtype': (lambda t: t.update({f'{LAYER}.scales': t[f'{LAYER}.scales'].view(np.int16).astype(np.int32)}),
              None, UnsupportedQuantizationError, f'{LAYER}.scales (int32)'),
    'missing': (lambda t: t.pop(f'{LAYER}.qzeros'), None,
                CheckpointMismatchError, f'1 missing: {LAYER}.qzeros'),
    'extra': (lambda t: t.update({'transformer.h.0.mlp.w1.weight': np.zeros((512, 256), np.float16)}), None,
              CheckpointMismatchError, '1 unexpected: transformer.h.0.mlp.w1.weight'),
    'integer': (lambda t: t.update({'transformer.ln_f.weight': t['transformer.ln_f.weight'].view(np.int16)
                                    .astype(np.int32)}),
                None, CheckpointFormatError, 'integer tensors where float weights belong'),
}


@pytest.mark.parametrize('case', sorted(REFUSED))
def test_unsupported_is_refused_by_name(int4_dir, tmp_path, capsys, case):
  tensors, config, error, message = REFUSED[case]
  src = edited_copy(int4_dir, tmp_path / 'src', tensors, config)
  with pytest.raises(error) as e:
    load_pretrained(src)
  assert message in str(e.value), e.value
  assert cli.main([str(src), str(tmp_path / 'o'), '--quiet']) == 1
  err = capsys.readouterr().err
  assert message in err and not (tmp_path / 'o').exists(), err


def test_float_checkpoint_with_integer_tensors(golden_dir, tmp_path):
  """Without a quantization_config every tensor must be float, or it would be cast silently."""
  src = shutil.copytree(golden_dir / 'checkpoint', tmp_path / 'src')
  tensors = load_file(str(src / 'model.safetensors'))
  tensors['transformer.ln_f.weight'] = tensors['transformer.ln_f.weight'].view(np.int32)
  save_file(tensors, str(src / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(CheckpointFormatError, match='integer tensors .* no quantization_config.*ln_f'):
    load_pretrained(src)


def test_keep_packed_needs_a_quantized_checkpoint(golden_dir):
  with pytest.raises(ValueError, match='keep_packed needs a quantized checkpoint'):
    load_pretrained(golden_dir / 'checkpoint', keep_packed=True)

