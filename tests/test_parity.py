"""Numeric parity with the original PyTorch Qwen-VL (golden data made by the original code, fp32, CPU)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenvl_jax import QwenVL, lm_loss, load_pretrained, preprocess_images
from qwenvl_jax.params import get_path, params_to_hf, rules

# Tolerances reached (fp32): max abs diff ~8e-6 on logits of magnitude ~4, ~4e-6 relative on gradients.
RTOL = ATOL = 1e-5
IMAGES = ('poster.jpg', 'menu.jpg', 'radar.png')


@pytest.fixture(scope='module')
def tiny(golden_dir):
  return load_pretrained(golden_dir / 'checkpoint')


@pytest.fixture(scope='module')
def pixels(golden_dir, tiny):
  model, _ = tiny
  return preprocess_images([golden_dir / 'img' / n for n in IMAGES], model.config.vision.image_size)


@pytest.fixture(scope='module')
def forward(tiny):
  model, _ = tiny
  return jax.jit(lambda p, ids, px: model.apply({'params': p}, ids, px, return_hidden=True))


def nchw(x):
  return np.transpose(x, (0, 3, 1, 2))


@pytest.mark.parametrize('size,key', [(112, 'pixel_values'), (448, 'pixel_values_448')])
def test_preprocess(golden_dir, golden, size, key):
  px = preprocess_images([golden_dir / 'img' / n for n in IMAGES], size)
  chex.assert_trees_all_close(nchw(px), golden[key], rtol=RTOL, atol=ATOL)


def test_image_features(tiny, pixels, golden):
  model, params = tiny
  features = model.apply({'params': params}, pixels, method=model.encode_images)
  chex.assert_trees_all_close(features, golden['image_features'], rtol=RTOL, atol=ATOL)


def test_batch_logits_and_hidden_states(forward, tiny, pixels, golden):
  _, params = tiny
  out = forward(params, golden['batch.input_ids'], pixels[:2])
  chex.assert_trees_all_close(out['logits'], golden['batch.logits'], rtol=RTOL, atol=ATOL)
  assert len(out['hidden']) == 3
  for i, hidden in enumerate(out['hidden']):
    chex.assert_trees_all_close(hidden, golden[f'batch.hidden.{i}'], rtol=RTOL, atol=ATOL)


def test_two_images_in_one_row(tiny, pixels, golden):
  """45 tokens > seq_length 32: dynamic NTK (alpha 3) and logn scaling are active."""
  model, params = tiny
  logits = model.apply({'params': params}, golden['two_images.input_ids'], pixels[1:3])
  chex.assert_trees_all_close(logits, golden['two_images.logits'], rtol=RTOL, atol=ATOL)


def test_long_text(tiny, golden):
  """80 tokens, text only: alpha 7 and logn query scaling."""
  model, params = tiny
  logits = model.apply({'params': params}, golden['long.input_ids'])
  chex.assert_trees_all_close(logits, golden['long.logits'], rtol=RTOL, atol=ATOL)


def test_train_loss_and_every_gradient(tiny, pixels, golden):
  model, params = tiny
  ids = golden['batch.input_ids']
  loss, grads = jax.value_and_grad(
      lambda p: lm_loss(model.apply({'params': p}, ids, pixels[:2], train=True), ids))(params)
  chex.assert_trees_all_close(loss, golden['train.loss'].reshape(()), rtol=RTOL, atol=ATOL)
  hf_grads = dict(params_to_hf(jax.tree.map(np.asarray, grads), model.config))
  expected = {k[len('train.grad.'):]: v for k, v in golden.items() if k.startswith('train.grad.')}
  # Every trainable tensor of the original has a golden gradient; pos_embed is frozen there.
  assert set(expected) == set(hf_grads) - {'transformer.visual.attn_pool.pos_embed'}
  chex.assert_trees_all_close({k: hf_grads[k] for k in expected}, expected, rtol=RTOL, atol=ATOL)


def test_parity_is_sensitive_to_every_tensor(tiny, pixels, golden, forward):
  """Each released tensor, perturbed alone by +-1e-3, breaks the batch-logits parity."""
  model, params = tiny
  ids, want = golden['batch.input_ids'], golden['batch.logits']
  rng = np.random.default_rng(0)
  undetected = []
  for name, rule in rules(model.config).items():
    leaf = np.array(get_path(params, rule.path))
    where = slice(None) if rule.layer is None else rule.layer
    leaf[where] += 1e-3 * rng.choice([-1.0, 1.0], size=leaf[where].shape)
    # Placed as the loaded leaf (committed to its device): an uncommitted array would compile anew per tensor.
    leaf = jax.device_put(leaf, get_path(params, rule.path).sharding)
    logits = forward(_replace(params, rule.path, leaf), ids, pixels[:2])['logits']
    try:
      chex.assert_trees_all_close(logits, want, rtol=RTOL, atol=ATOL)
      undetected.append(name)
    except AssertionError:
      pass
  assert not undetected, f'perturbations not detected by the parity check: {undetected}'


def test_bfloat16_compute_error(golden_dir, pixels, golden):
  """bf16 matmuls (norms, softmax, rotary and logits in fp32): documented bound on logit error."""
  model, params = load_pretrained(golden_dir / 'checkpoint', dtype='bfloat16')
  model = QwenVL(model.config.replace(dtype='bfloat16'))
  logits = model.apply({'params': params}, golden['batch.input_ids'], pixels[:2])
  err = np.abs(np.asarray(logits) - golden['batch.logits'])
  # Measured (README, "bfloat16"): max abs error 0.068 and mean 0.010 on logits with std 1.0 and max 4.3;
  # the argmax agrees on 96.7% of positions (random weights make near-ties common).
  assert err.max() < 0.1 and err.mean() < 0.02, (err.max(), err.mean())
  agree = (np.argmax(logits, -1) == np.argmax(golden['batch.logits'], -1)).mean()
  assert agree > 0.9, agree


def _replace(tree, path, value):
  if not path:
    return value
  return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}
