"""Weight-only quantization (qwenvl_jax/quant.py): the quantizer, the CPU int8 kernel, golden accuracy,
the tree's forms, Orbax and the mesh."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from processes import xla_flags

import qwenvl_jax as q
from qwenvl_jax import cpu_kernels, param_layout
from qwenvl_jax.decode import generate
from qwenvl_jax.kernel_math import dequantize, pack_int4
from qwenvl_jax.quant import Q_MAX, dequantize_kernel, dequantize_params, quantize, quantized_config, unpack

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Measured on the tiny golden model (README-quant: int8 0.027, int4 0.42); the bounds leave ~1.5x room.
# Relative error: max |logits - fp32 logits| / max |fp32 logits|, teacher-forced on the golden generation.
LOGIT_ERROR = {'int8': 0.04, 'int4': 0.6}


@pytest.fixture(scope='module')
def tiny(golden_dir):
  return q.load_pretrained(golden_dir / 'checkpoint')


@pytest.fixture(scope='module')
def poster(tiny, golden_dir):
  return q.preprocess_images([golden_dir / 'img' / 'poster.jpg'], tiny[0].config.vision.image_size)


def _kernels(flat):
  return [p for p in flat if p[0] in ('decoder', 'lm_head') and p[-1] == 'kernel']


@pytest.mark.parametrize('mode', ['int8', 'int4'])
def test_quantize_is_within_half_a_step_and_deterministic(tiny, mode):
  model, params = tiny
  quantized = quantize(params, model.config, mode)
  flat, fq, back = (param_layout.flatten(t) for t in (params, quantized, dequantize_params(quantized)))
  assert _kernels(flat) and not _kernels(fq)
  for path in _kernels(flat):
    stored, scale = fq[path[:-1] + ('q',)], fq[path[:-1] + ('scale',)]
    qv = unpack(stored, path[:-1] + ('q',))
    assert qv.dtype == jnp.int8 and qv.shape == flat[path].shape
    # int4: two values per byte along the last input dim (kernel_math.pack_int4), int8 one
    assert stored.dtype == (jnp.uint8 if mode == 'int4' else jnp.int8)
    assert stored.size == flat[path].size // (2 if mode == 'int4' else 1)
    assert int(jnp.max(jnp.abs(qv))) <= Q_MAX[mode]
    outputs = param_layout.axes_of(path[:-1] + ('scale',))
    n_in = int(np.prod([n for n, a in zip(qv.shape, param_layout.axes_of(path)) if a not in outputs]))
    groups = scale.shape[outputs.index('quant_groups')]  # [layers (stacked), groups, *outputs]
    assert groups == (1 if mode == 'int8' else n_in // 128), path
    step = dequantize_kernel(jnp.ones_like(qv), scale, path[:-1] + ('q',))  # each weight's own scale
    np.testing.assert_array_less(np.abs(back[path] - flat[path]), 0.5 * step * (1 + 1e-4) + 1e-12)
  for path, leaf in flat.items():  # everything else is left as it is
    if path not in _kernels(flat):
      assert fq[path] is leaf
  again = param_layout.flatten(quantize(params, model.config, mode))
  assert all(np.array_equal(again[p], fq[p]) for p in fq)


def test_quantize_refuses_a_quantized_tree_and_unknown_modes(tiny):
  model, params = tiny
  with pytest.raises(ValueError, match='int3'):
    quantize(params, model.config, 'int3')
  quantized = quantize(params, model.config, 'int8')
  with pytest.raises(ValueError, match='quantized already'):
    quantize(quantized, model.config, 'int8')
  with pytest.raises(ValueError, match='int8 already'):
    quantize(params, quantized_config(model.config, 'int8'), 'int8')
  with pytest.raises(ValueError, match='group size 96'):
    quantize(params, model.config.replace(group_size=96), 'int4')


@pytest.mark.skipif(not cpu_kernels.available(), reason='the CPU kernel is not built here')
@pytest.mark.parametrize('eqn,x_shape,q_shape,groups', [
    ('btd,chkd->btchk', (1, 1, 256), (3, 4, 64, 256), 1),  # c_attn, weight-major, int8
    ('btd,chkd->btchk', (8, 1, 256), (3, 4, 64, 256), 2),  # batch 8, int4 groups of 128
    ('bthk,dhk->btd', (2, 3, 4, 64), (256, 4, 64), 2),  # two contracted dims (attention's c_proj)
])
@pytest.mark.parametrize('packed', [False, True])
def test_cpu_kernel_equals_the_dequantized_product(eqn, x_shape, q_shape, groups, packed):
  """int8 values, and int4 ones two per byte (the int4 kernel's stored form: its own FFI target)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  qv = jnp.asarray(rng.integers(-8, 8, q_shape) if packed else rng.integers(-127, 128, q_shape), jnp.int8)
  if packed:
    qv = pack_int4(qv, len(q_shape) - 1)
  kept = eqn.split('->')[1]
  q_dims = eqn.split(',')[1].split('->')[0]
  out_dims = ''.join(c for c in q_dims if c in kept)
  scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (groups,) + q_shape[:len(out_dims)]), jnp.float32)
  got = jax.jit(lambda x, qv, s: cpu_kernels.qmatmul_einsum(eqn, x, qv, s))(x, qv, scale)
  want = jnp.einsum(eqn, x, dequantize(qv, scale, q_dims, out_dims, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  many = jnp.zeros((cpu_kernels.QMATMUL_MAX_ROWS + 1,) + x_shape[1:], jnp.float32)
  assert cpu_kernels.qmatmul_einsum(eqn, many, qv, scale) is None  # prefill: XLA's dot


def _token_matches(ids, golden_ids):
  return int(np.sum(np.asarray(ids)[0, -40:] == golden_ids[0, -40:]))


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['int8', 'int4'])
def test_golden_generation_with_quantized_weights(tiny, poster, golden, mode):
  """Greedy decoding of the golden prompt keeps the golden tokens (int8: at least 35 of 40; int4 is
  measured, its first token already differs on this random model), and the teacher-forced logits stay
  within the documented error of fp32's."""
  model, params = tiny
  qmodel, qparams = q.QwenVL(quantized_config(model.config, mode)), quantize(params, model.config, mode)
  ids = generate(qmodel, qparams, golden['generate.prompt_ids'], poster, max_new_tokens=40,
                 min_new_tokens=40, do_sample=False)
  same = _token_matches(ids, golden['generate.output_ids'])
  seq = golden['generate.output_ids'].astype(np.int32)
  want = jax.jit(model.apply)({'params': params}, seq, poster)[0, 29:69]
  got = jax.jit(qmodel.apply)({'params': qparams}, seq, poster)[0, 29:69]
  error = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  agree = int(jnp.sum(jnp.argmax(got, -1) == jnp.argmax(want, -1)))
  print(f'{mode}: {same}/40 greedy tokens as fp32, teacher-forced argmax {agree}/40, '
        f'max logit error {error:.4f} of the largest logit')
  assert same >= 35 or mode == 'int4'
  assert error < LOGIT_ERROR[mode]


def test_quantized_tree_converts_between_forms_bit_exactly(tiny):
  model, params = tiny
  quantized = quantize(params, model.config, 'int4')
  decoding = param_layout.convert(quantized, scan_layers=False, weight_major=True)
  flat = param_layout.flatten(decoding)
  assert ('decoder', 'layers_0', 'attn', 'c_attn', 'q_t') in flat
  assert flat[('lm_head', 'q_t')].shape == (1024, 128)  # [vocab, embed / 2]: output dims first, 2 per byte
  back = param_layout.flatten(param_layout.convert(decoding, scan_layers=True, weight_major=False))
  original = param_layout.flatten(quantized)
  assert back.keys() == original.keys()
  assert all(np.array_equal(back[p], original[p]) and back[p].dtype == original[p].dtype for p in back)


@pytest.mark.slow
def test_quantized_params_shard_and_restore_on_a_mesh(golden_dir, tmp_path):
  """Quantized params placed on 4 simulated devices by their logical axes give one device's logits, and
  an Orbax checkpoint of them restores onto the mesh bit-identical."""
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=4'), JAX_PLATFORMS='cpu',
             PYTHONPATH=str(ROOT))
  proc = subprocess.run([sys.executable, str(ROOT / 'tests' / 'quant_mesh_check.py'), str(golden_dir),
                         str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'ok' in proc.stdout


@pytest.mark.slow
def test_qlora_step_lowers_the_loss_and_keeps_the_quantized_base(tiny, golden, golden_dir):
  """Stage-3 LoRA over an int4 base: the step trains LoRA alone, the int8-stored base stays bit-identical,
  and the merge exports float kernels that compute what the LoRA forward computes."""
  from test_train_step import _cfg, _golden_batch
  from train.lora import init_lora, merge_lora
  from train.optim import make_optimizer
  from train.step import init_state, make_train_step
  model, params = tiny
  base = quantize(params, model.config, 'int4')
  cfg = _cfg(model, lora=True, lora_rank=4, stage=3, peak_lr=1e-2, min_lr=1e-2, warmup_steps=0)
  lora = init_lora(base, cfg.lora_targets, cfg.lora_rank, jax.random.key(0))
  optimizer = make_optimizer(cfg, base)
  step = jax.jit(make_train_step(q.QwenVL(quantized_config(model.config, 'int4')), optimizer, cfg))
  state = init_state(cfg, base, optimizer, lora)
  batch = _golden_batch(golden, golden_dir)
  state, first = step(state, batch)
  state, second = step(state, batch)
  assert float(second['loss']) < float(first['loss'])
  before, after = param_layout.flatten(base), param_layout.flatten(state.params)
  assert before.keys() == after.keys()
  for path, leaf in before.items():
    assert after[path].dtype == leaf.dtype and np.asarray(after[path]).tobytes() == np.asarray(leaf).tobytes()
  merged = param_layout.flatten(merge_lora(state.params, state.lora, cfg.lora_alpha))
  assert not any(p[-1] == 'q' or (p[-1] == 'scale' and p[:-1] + ('kernel',) in merged) for p in merged)  # float
  head = ('lm_head',)  # not a LoRA target: the base dequantized
  np.testing.assert_array_equal(merged[head + ('kernel',)],
                                dequantize_kernel(before[head + ('q',)], before[head + ('scale',)], head + ('q',)))
  w2 = ('decoder', 'layers', 'mlp', 'w2')  # a target: the dequantized base plus (alpha / r) A @ B
  base_w2 = dequantize_kernel(before[w2 + ('q',)], before[w2 + ('scale',)], w2 + ('q',))
  a, b = (state.lora['decoder']['layers']['mlp']['w2'][k] for k in 'ab')
  np.testing.assert_allclose(merged[w2 + ('kernel',)] - base_w2, (cfg.lora_alpha / 4) * a @ b, rtol=1e-4, atol=1e-7)
  assert np.any(np.asarray(b))


def test_quantized_roots_leave_lm_head_float(tiny):
  """quantized_roots=('decoder',) (the released Int4's choice): lm_head stays the float kernel, and the
  model with those weights describes exactly that tree; a root that cannot be quantized is refused."""
  model, params = tiny
  config = model.config.replace(quantized_roots=('decoder',))
  quantized = param_layout.flatten(quantize(params, config, 'int8'))
  assert quantized[('lm_head', 'kernel')] is params['lm_head']['kernel']
  assert ('decoder', 'layers', 'mlp', 'w1', 'q') in quantized
  shapes = param_layout.flatten(q.model.param_shapes(q.QwenVL(quantized_config(config, 'int8'))))
  assert {p: s.shape for p, s in shapes.items()} == {p: x.shape for p, x in quantized.items()}
  with pytest.raises(ValueError, match="quantized_roots must be a tuple of .*'visual'"):
    model.config.replace(quantized_roots=('visual',))


def test_plan_counts_the_quantized_base(golden_dir):
  """`qwenvl-jax plan --lora --weights int8`: the frozen base's bytes as Q-LoRA holds it; --weights without
  --lora is refused by name."""
  from train.plan import make_plan
  config = q.QwenVLConfig.from_json(golden_dir / 'checkpoint')
  kw = dict(stage=3, lora=True, batch=1, seq=32, images=1, image_size=112)
  plans = {w: make_plan(config, 'data=1', weights=w, **kw) for w in ('float', 'int8')}
  shapes = param_layout.leaf_shapes(config)
  quantized = sum(np.prod(s) for p, s in shapes.items() if p[0] in ('decoder', 'lm_head') and p[-1] == 'kernel')
  saved = plans['float'].state['params'] - plans['int8'].state['params']
  # a frozen kernel is held in the compute dtype (bfloat16: train/frozen.py): 2 bytes become 1, plus scales
  assert 0 < saved <= quantized
  assert saved > 0.95 * quantized
  with pytest.raises(ValueError, match='--lora'):
    make_plan(config, 'data=1', weights='int8', stage=3, batch=1, seq=32, images=1, image_size=112)
