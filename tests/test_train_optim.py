"""Stage masks, the optimiser chain and the lr schedule of train/."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwenvl_jax import load_pretrained
from train.stages import trainable
from train.config import TrainConfig, stage_config
from train.optim import (TRAIN, combine, labels, lr_schedule, make_optimizer, partition, path_keys,
                         trainables, vit_layer_scale)
from train.step import init_state, make_train_step


def _flat(tree):
  return {'/'.join(path_keys(p)): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='module')
def golden_model(golden_dir):
  return load_pretrained(golden_dir / 'checkpoint')


def _batch(config, rows=2, seed=0):
  """Random tokens around one image span per row; loss on every text position."""
  rng = np.random.default_rng(seed)
  v = config.vision
  span = [v.image_start_id] + [v.image_pad_id] * v.n_queries + [v.image_end_id]
  ids = np.stack([np.concatenate([[rng.integers(0, 999)], span, rng.integers(0, 999, 8)])
                  for _ in range(rows)])
  t = ids.shape[1]
  return {'input_ids': ids.astype(np.int32), 'attention_mask': np.ones((rows, t), np.int32),
          'targets': np.tile(np.arange(t - 1, dtype=np.int32), (rows, 1)),
          'target_mask': np.ones((rows, t - 1), np.float32),
          'pixel_values': rng.normal(size=(rows, 1, v.image_size, v.image_size, 3)).astype(np.float32)}


EXPECTED_TRAINED = {
    1: lambda k: k.startswith('visual/') and k != 'visual/attn_pool/pos_embed',
    2: lambda k: k != 'visual/attn_pool/pos_embed',
    3: lambda k: (not k.startswith('visual/')) or (k.startswith('visual/attn_pool/')
                                                   and k != 'visual/attn_pool/pos_embed'),
}


@pytest.mark.parametrize('stage', [pytest.param(1, marks=pytest.mark.slow), 2,
                                   pytest.param(3, marks=pytest.mark.slow)])
def test_stage_mask_freezes_exactly_and_keeps_no_state(golden_model, stage):
  model, params = golden_model
  cfg = stage_config(stage, batch_size=2, grad_accum=1, steps=10, warmup_steps=0, peak_lr=1e-3,
                     min_lr=1e-3, image_size=model.config.vision.image_size, dtype='bfloat16')
  optimizer = make_optimizer(cfg, params)
  state = init_state(cfg, params, optimizer)
  step = jax.jit(make_train_step(model, optimizer, cfg))
  new = state
  for i in range(2):
    new, metrics = step(new, _batch(model.config, seed=i))
  assert np.isfinite(float(metrics['loss']))
  before, after = _flat(params), _flat(new.params)
  assert set(before) == set(after)
  for key in before:
    if EXPECTED_TRAINED[stage](key):
      assert not np.array_equal(before[key], after[key]), f'stage {stage}: {key} should have changed'
    else:
      assert np.asarray(after[key]).tobytes() == np.asarray(before[key]).tobytes(), (
          f'stage {stage}: frozen {key} changed')
      assert after[key].dtype == jnp.float32
  # Optimiser moments exist only for the trained leaves.
  adam = [s for s in jax.tree.leaves(new.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  mu = _flat(adam[0].mu)
  expected = {'params/' + k for k in before if EXPECTED_TRAINED[stage](k)}
  assert set(mu) == expected
  assert len(jax.tree.leaves(adam[0].nu)) == len(expected)


def test_stage_rules():
  assert trainable(('visual', 'blocks', 'c_fc', 'kernel'), 1)
  assert trainable(('visual', 'proj'), 1)
  assert not trainable(('decoder', 'layers', 'mlp', 'w1', 'kernel'), 1)
  assert not trainable(('visual', 'attn_pool', 'pos_embed'), 2)
  assert trainable(('visual', 'attn_pool', 'query'), 3)
  assert not trainable(('visual', 'ln_post', 'scale'), 3)
  assert trainable(('lm_head', 'kernel'), 3)
  with pytest.raises(ValueError, match='stage'):
    trainable(('wte', 'embedding'), 4)


def test_lora_freezes_the_base():
  params = {'wte': {'embedding': jnp.zeros((4, 2))}, 'visual': {'proj': jnp.zeros((2, 2))}}
  lora = {'w1': {'a': jnp.zeros((1, 2, 1)), 'b': jnp.zeros((1, 1, 2))}}
  labs = _flat(labels(TrainConfig(stage=2, lora=True), trainables(params, lora)))
  assert labs == {'params/wte/embedding': 'frozen', 'params/visual/proj': 'frozen',
                  'lora/w1/a': TRAIN, 'lora/w1/b': TRAIN}


def test_lr_schedule_values():
  cfg = TrainConfig(steps=110, warmup_steps=10, peak_lr=1e-3, min_lr=1e-5)
  lr = lr_schedule(cfg)
  np.testing.assert_allclose(float(lr(0)), 1e-4, rtol=1e-6)  # (0 + 1) / 10 of the peak
  np.testing.assert_allclose(float(lr(4)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(9)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)  # cosine starts at the peak
  np.testing.assert_allclose(float(lr(60)), (1e-3 + 1e-5) / 2, rtol=1e-5)  # half way
  np.testing.assert_allclose(float(lr(35)), 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi / 4)), rtol=1e-5)
  np.testing.assert_allclose(float(lr(110)), 1e-5, rtol=1e-6)
  np.testing.assert_allclose(float(lr(500)), 1e-5, rtol=1e-6)  # stays at the minimum
  no_warmup = lr_schedule(TrainConfig(steps=10, warmup_steps=0, peak_lr=2e-4, min_lr=0.0))
  np.testing.assert_allclose(float(no_warmup(0)), 2e-4, rtol=1e-6)


def test_paper_stage_defaults():
  s1, s2, s3 = (stage_config(s) for s in (1, 2, 3))
  assert (s1.peak_lr, s1.min_lr, s1.warmup_steps, s1.steps, s1.batch_size, s1.image_size) == (
      2e-4, 1e-6, 500, 50000, 30720, 224)
  assert (s2.peak_lr, s2.min_lr, s2.warmup_steps, s2.steps, s2.batch_size, s2.image_size) == (
      5e-5, 1e-5, 400, 19000, 4096, 448)
  assert (s3.peak_lr, s3.min_lr, s3.warmup_steps, s3.steps, s3.batch_size, s3.image_size) == (
      1e-5, 1e-6, 3000, 8000, 128, 448)
  for s in (s1, s2, s3):
    assert (s.b1, s.b2, s.eps, s.weight_decay, s.clip_norm) == (0.9, 0.98, 1e-6, 0.05, 1.0)


def test_vit_layer_scale():
  L, d = 4, 0.95
  block = vit_layer_scale(('params', 'visual', 'blocks', 'c_fc', 'kernel'), (L, 3, 5), L, d)
  np.testing.assert_allclose(block.reshape(-1), [d ** 4, d ** 3, d ** 2, d], rtol=1e-6)
  assert block.shape == (L, 1, 1)
  assert vit_layer_scale(('params', 'visual', 'conv1', 'kernel'), (2, 2, 3, 8), L, d) == pytest.approx(d ** 5)
  assert vit_layer_scale(('params', 'visual', 'proj'), (8, 8), L, d) == 1.0
  assert vit_layer_scale(('params', 'decoder', 'layers', 'mlp', 'w1', 'kernel'), (2, 8, 8), L, d) == 1.0
  # visual_lr_scale multiplies every visual factor (adapter included) and leaves the LLM alone
  block = vit_layer_scale(('params', 'visual', 'blocks', 'c_fc', 'kernel'), (L, 3, 5), L, d, 0.3)
  np.testing.assert_allclose(block.reshape(-1), 0.3 * np.array([d ** 4, d ** 3, d ** 2, d]), rtol=1e-6)
  assert vit_layer_scale(('params', 'visual', 'conv1', 'kernel'), (2, 2, 3, 8), L, d, 0.3) == pytest.approx(
      0.3 * d ** 5)
  assert vit_layer_scale(('params', 'visual', 'attn_pool', 'query'), (8, 8), L, d, 0.3) == pytest.approx(0.3)
  assert vit_layer_scale(('params', 'lm_head', 'kernel'), (8, 8), L, d, 0.3) == 1.0


def test_update_follows_adamw_with_layer_decay_and_clipping():
  """One step on a toy tree equals hand-written AdamW with the per-layer lr factors."""
  params = {'visual': {'blocks': {'c_fc': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((3, 2))}},
                       'proj': jnp.ones((2, 2))},
            'wte': {'embedding': jnp.ones((2, 2))}}
  cfg = TrainConfig(stage=1, steps=10, warmup_steps=0, peak_lr=0.1, min_lr=0.1, clip_norm=1.0,
                    weight_decay=0.05, vit_lr_decay=0.5)
  tx = make_optimizer(cfg, params)
  trained, frozen = partition(cfg, trainables(params))
  assert frozen['params']['wte']['embedding'] is params['wte']['embedding']  # frozen in stage 1
  assert all(a is b for a, b in zip(jax.tree.leaves(combine(trained, frozen)), jax.tree.leaves(params),
                                   strict=True))
  grads = jax.tree.map(lambda x: jnp.full_like(x, 2.0), trained)
  updates, _ = tx.update(grads, tx.init(trained), trained)
  # Trained leaves: 6 + 6 + 4 = 16 entries of 2.0 -> norm 8, clipped to 1: each grad 0.25.
  # Adam's first step gives g / (|g| + eps) ~ 1; decay adds 0.05 * p for kernels only.
  adam = 0.25 / (0.25 + 1e-6)
  kernel = np.asarray(updates['params']['visual']['blocks']['c_fc']['kernel'])
  np.testing.assert_allclose(kernel[:, 0], -0.1 * (adam + 0.05) * np.array([0.5 ** 3, 0.5 ** 2, 0.5]),
                             rtol=1e-5)
  bias = np.asarray(updates['params']['visual']['blocks']['c_fc']['bias'])
  np.testing.assert_allclose(bias[:, 0], -0.1 * adam * np.array([0.5 ** 3, 0.5 ** 2, 0.5]), rtol=1e-5)
  np.testing.assert_allclose(updates['params']['visual']['proj'], -0.1 * (adam + 0.05), rtol=1e-5)
  assert updates['params']['wte']['embedding'] is None  # no update, no state for a frozen leaf
