"""The train step: golden loss and gradient norm, logits only at targets, gradient accumulation, image
order, LoRA."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from qwenvl_jax import load_pretrained, lm_loss, preprocess_images
from qwenvl_jax.layers import Einsum
from qwenvl_jax.lora import LoraConfig
from qwenvl_jax.model import QwenVL
from qwenvl_jax.params import get_path
from train.config import stage_config
from train.lora import init_lora, lora_config, merge_lora
from train.optim import make_optimizer
from train.step import image_order, init_state, make_train_step, target_nll


@pytest.fixture(scope='module')
def golden_model(golden_dir):
  return load_pretrained(golden_dir / 'checkpoint')


def _golden_batch(golden, golden_dir):
  ids = golden['batch.input_ids'].astype(np.int32)
  b, t = ids.shape
  pixels = preprocess_images([golden_dir / 'img' / 'poster.jpg', golden_dir / 'img' / 'menu.jpg'], 112)
  return {'input_ids': ids, 'attention_mask': np.ones((b, t), np.int32),
          'targets': np.tile(np.arange(t - 1, dtype=np.int32), (b, 1)),
          'target_mask': np.ones((b, t - 1), np.float32), 'pixel_values': pixels[:, None]}


def _cfg(model, stage=2, **kw):
  return stage_config(stage, **{'batch_size': 2, 'grad_accum': 1, 'steps': 10, 'warmup_steps': 2,
                            'image_size': model.config.vision.image_size, 'dtype': 'float32', **kw})


def test_stage2_step_on_golden_checkpoint(golden_model, golden, golden_dir):
  """Loss before the update equals the original's train.loss; the gradient norm equals that of the
  original's gradients (all 60 trained tensors: every parameter but the resampler's pos_embed)."""
  model, params = golden_model
  cfg = _cfg(model)
  optimizer = make_optimizer(cfg, params)
  step = jax.jit(make_train_step(model, optimizer, cfg))
  state, metrics = step(init_state(cfg, params, optimizer), _golden_batch(golden, golden_dir))
  np.testing.assert_allclose(float(metrics['loss']), float(golden['train.loss'].reshape(())), rtol=1e-5)
  grads = [golden[k].astype(np.float64) for k in golden if k.startswith('train.grad.')]
  assert len(grads) == 60
  np.testing.assert_allclose(float(metrics['grad_norm']), np.sqrt(sum((g ** 2).sum() for g in grads)),
                             rtol=1e-5)
  assert int(state.step) == 1 and float(metrics['targets']) == 58


def test_target_nll_equals_lm_loss(golden_model):
  model, params = golden_model
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 999, (2, 12)).astype(np.int32)
  mask = (rng.random((2, 12)) < 0.5).astype(np.float32)
  mask[:, 0] = 0
  full = model.apply({'params': params}, ids, train=True)
  reference = lm_loss(full, ids, mask)
  targets = np.zeros((2, 11), np.int32)
  weights = np.zeros((2, 11), np.float32)
  for r in range(2):
    pos = np.flatnonzero(mask[r, 1:])
    targets[r, :len(pos)], weights[r, :len(pos)] = pos, 1
  at = model.apply({'params': params}, ids, logits_at=jnp.asarray(targets), train=True)
  ours = (target_nll(at, ids, targets) * weights).sum() / weights.sum()
  np.testing.assert_allclose(float(ours), float(reference), rtol=1e-6)


def test_gradient_accumulation_matches_one_batch(golden_model, golden, golden_dir):
  """Two micro-batches of one row each give the update of the two-row batch (token-weighted mean)."""
  model, params = golden_model
  batch = _golden_batch(golden, golden_dir)
  batch['target_mask'][1, 20:] = 0  # unequal target counts: the mean must weight tokens, not rows
  results = []
  for accum in (1, 2):
    cfg = _cfg(model, grad_accum=accum)
    optimizer = make_optimizer(cfg, params)
    state, metrics = jax.jit(make_train_step(model, optimizer, cfg))(init_state(cfg, params, optimizer), batch)
    results.append((state.params, metrics))
  np.testing.assert_allclose(float(results[0][1]['loss']), float(results[1][1]['loss']), rtol=1e-6)
  np.testing.assert_allclose(float(results[0][1]['grad_norm']), float(results[1][1]['grad_norm']), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_image_order_maps_row_slots_to_splice_order():
  start = 7
  ids = np.array([[1, 2, 3, 4],  # no image
                  [start, 0, start, 0],  # two images: slots 2 and 3
                  [0, start, 0, 0]])  # one image: slot 4
  order = np.asarray(image_order(jnp.asarray(ids), start, slots=2))
  assert order.shape == (6,)
  np.testing.assert_array_equal(order[:3], [2, 3, 4])


def test_multi_image_rows_match_plain_model(golden_model):
  """Per-row image slots reordered by the step give the logits of the model fed images in order."""
  model, params = golden_model
  v = model.config.vision
  span = [v.image_start_id] + [v.image_pad_id] * v.n_queries + [v.image_end_id]
  ids = np.array([[5] + span + [6, 7] + [8] * (len(span)),  # one image, slot 1 left empty
                  [5] + span + [6, 7] + span]).astype(np.int32)  # two images
  pixels = np.random.default_rng(1).normal(size=(2, 2, 112, 112, 3)).astype(np.float32)
  cfg = _cfg(model, max_images=2)
  optimizer = make_optimizer(cfg, params)
  t = ids.shape[1]
  batch = {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'pixel_values': pixels,
           'targets': np.tile(np.arange(t - 1, dtype=np.int32), (2, 1)),
           'target_mask': np.ones((2, t - 1), np.float32)}
  _, metrics = jax.jit(make_train_step(model, optimizer, cfg))(init_state(cfg, params, optimizer), batch)
  in_order = np.stack([pixels[0, 0], pixels[1, 0], pixels[1, 1]])
  logits = model.apply({'params': params}, ids, in_order, train=True)
  np.testing.assert_allclose(float(metrics['loss']), float(lm_loss(logits, ids)), rtol=1e-5)


def test_lora_starts_at_base_and_trains_only_lora(golden_model, golden, golden_dir):
  model, params = golden_model
  cfg = _cfg(model, lora=True, lora_rank=4, stage=3, peak_lr=1e-2, min_lr=1e-2, warmup_steps=0)
  lora = init_lora(params, cfg.lora_targets, cfg.lora_rank, jax.random.key(0))
  attn, mlp = lora['decoder']['layers']['attn'], lora['decoder']['layers']['mlp']
  assert attn['c_attn']['a'].shape == (2, 256, 4) and attn['c_attn']['b'].shape == (2, 4, 3, 4, 64)
  assert attn['c_proj']['a'].shape == (2, 4, 64, 4) and mlp['w1']['b'].shape == (2, 4, 256)
  merged = merge_lora(params, lora, cfg.lora_alpha)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):  # B = 0: no change yet
    np.testing.assert_array_equal(a, b)
  optimizer = make_optimizer(cfg, params)
  step = jax.jit(make_train_step(model, optimizer, cfg))
  state = init_state(cfg, params, optimizer, lora)
  batch = _golden_batch(golden, golden_dir)
  state, first = step(state, batch)
  state, _ = step(state, batch)
  state, third = step(state, batch)
  assert float(third['loss']) < float(first['loss'])
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert np.any(np.asarray(state.lora['decoder']['layers']['mlp']['w1']['b']))
  # The merged export computes what the LoRA forward (without dropout) computes.
  merged = merge_lora(state.params, state.lora, cfg.lora_alpha)
  ids = batch['input_ids']
  with_lora = QwenVL(model.config.replace(lora=lora_config(cfg)))
  direct = with_lora.apply({'params': state.params, 'lora': state.lora}, ids, batch['pixel_values'][:, 0])
  exported = model.apply({'params': merged}, ids, batch['pixel_values'][:, 0])
  np.testing.assert_allclose(direct, exported, rtol=1e-5, atol=1e-5)
  path = ('decoder', 'layers', 'attn', 'c_proj', 'kernel')
  delta = get_path(merged, path) - get_path(params, path)
  a, b = (state.lora['decoder']['layers']['attn']['c_proj'][k] for k in 'ab')
  np.testing.assert_allclose(delta, (cfg.lora_alpha / 4) * np.einsum('lhkr,lrd->lhkd', a, b), rtol=1e-4,
                             atol=1e-7)


def test_lora_at_init_is_the_base_model_exactly(golden_model):
  """B = 0: the LoRA model's logits equal the base model's bit for bit (float32, with dropout drawn too),
  and the factors init_lora makes are the collection the model declares, with their logical axes."""
  model, params = golden_model
  cfg = _cfg(model, lora=True, lora_rank=4, stage=3)
  lora = init_lora(params, cfg.lora_targets, cfg.lora_rank, jax.random.key(0))
  with_lora = QwenVL(model.config.replace(lora=lora_config(cfg)))
  ids = np.random.default_rng(0).integers(0, 999, (2, 12)).astype(np.int32)
  base = model.apply({'params': params}, ids)
  for rngs in ({}, {'dropout': jax.random.key(1)}):
    out = with_lora.apply({'params': params, 'lora': lora}, ids, rngs=rngs)
    assert np.asarray(out).tobytes() == np.asarray(base).tobytes()
  declared = jax.eval_shape(lambda: with_lora.init(jax.random.key(0), ids)['lora'])
  boxed = lambda x: isinstance(x, nn.Partitioned)
  assert jax.tree.map(lambda x: x.value.shape, declared, is_leaf=boxed) == jax.tree.map(jnp.shape, lora)
  names = jax.tree.map(lambda x: x.names, declared, is_leaf=boxed)['decoder']['layers']['attn']['c_attn']
  assert names == {'a': ('layers', 'embed', 'lora_rank'),
                   'b': ('layers', 'lora_rank', 'qkv', 'heads', 'head_dim')}


def test_lora_dropout_is_drawn_per_token():
  """PEFT's B(A(dropout(x))): equal tokens get different LoRA updates under dropout, the same key gives the
  same masks, and without a 'dropout' rng the update is the exact (alpha / r) x A B."""
  layer = Einsum((8, 6), lora=LoraConfig(rank=2, alpha=4.0, dropout=0.5))
  x = jnp.ones((1, 16, 8))
  variables = layer.init(jax.random.key(0), 'btd,df->btf', x)
  variables['lora'] = {'a': jnp.ones((8, 2)), 'b': jnp.ones((2, 6))}
  base = x @ variables['params']['kernel']
  run = lambda rngs: layer.apply(variables, 'btd,df->btf', x, rngs=rngs) - base
  np.testing.assert_allclose(run({}), np.full((1, 16, 6), 2.0 * 8 * 2), rtol=1e-6)
  one, again, other = (run({'dropout': jax.random.key(k)}) for k in (1, 1, 2))
  np.testing.assert_array_equal(one, again)
  assert not np.array_equal(one, other)
  assert len(np.unique(np.asarray(one[0, :, 0]))) > 2  # tokens with equal inputs, different masks


def test_unknown_lora_target_is_refused(golden_model):
  _, params = golden_model
  with pytest.raises(ValueError, match='unknown LoRA target'):
    init_lora(params, ('q_proj',), 4, jax.random.key(0))


