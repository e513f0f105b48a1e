"""Generation: golden parity, left-padded batches, compile counts, sampling, stop ids, streaming."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenvl_jax as q

from qwenvl_jax import param_layout
from qwenvl_jax.decode import Buckets, GenerationConfig, generate, generate_stream
from qwenvl_jax.decoder import ntk_alpha_of
from qwenvl_jax.sampling import Sampler, argmax_last, select, warp_logits

GREEDY = dict(do_sample=False)


@pytest.fixture(scope='module')
def tiny(golden_dir):
  return q.load_pretrained(golden_dir / 'checkpoint')


@pytest.fixture(scope='module')
def poster(tiny, golden_dir):
  model, _ = tiny
  return q.preprocess_images([golden_dir / 'img' / 'poster.jpg'], model.config.vision.image_size)


@pytest.fixture(scope='module')
def long_row(golden):
  return golden['long.input_ids'][0]  # 80 text tokens


@pytest.fixture(scope='module')
def text_prompt(long_row):
  return long_row[:20]


def test_golden_greedy_generation(tiny, poster, golden):
  model, params = tiny
  ids, logits = generate(model, params, golden['generate.prompt_ids'], poster, max_new_tokens=40,
                         min_new_tokens=40, output_logits=True, **GREEDY)
  np.testing.assert_array_equal(ids, golden['generate.output_ids'])
  chex.assert_trees_all_close(logits, golden['generate.step_logits'], atol=1e-4, rtol=0)


def test_left_padded_batch_equals_single_rows(tiny, poster, golden):
  """An image row of 30 tokens (NTK alpha 1) next to a text row of 45 (alpha 3): different padding."""
  model, params = tiny
  image_row, text_row = golden['batch.input_ids'][0], golden['long.input_ids'][0, :45]
  kw = dict(max_new_tokens=24, min_new_tokens=24, output_logits=True, **GREEDY)
  ids, logits = generate(model, params, [image_row, text_row], poster, **kw)
  alone = [generate(model, params, [image_row], poster, **kw), generate(model, params, [text_row], **kw)]
  for r, (row_ids, row_logits) in enumerate(alone):
    np.testing.assert_array_equal(ids[r, -24:], row_ids[0, -24:])
    chex.assert_trees_all_close(logits[r], row_logits[0], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(ids[0, :15], np.full(15, GenerationConfig().pad_id))  # left padding


def test_left_padded_array_with_mask_equals_ragged_rows(tiny, text_prompt):
  model, params = tiny
  rows = [text_prompt[:12], text_prompt]
  padded = np.zeros((2, 20), np.int32)
  padded[0, 8:], padded[1] = rows
  mask = padded != 0
  mask[1] = True
  kw = dict(max_new_tokens=6, **GREEDY)
  np.testing.assert_array_equal(generate(model, params, padded, attention_mask=mask, **kw)[:, -6:],
                                generate(model, params, rows, **kw)[:, -6:])


def test_one_compile_per_bucket(tiny, long_row, compiles):
  """Three prompt lengths in the 32 bucket and 40 decode steps: one XLA program for the whole loop."""
  model, params = tiny
  for length in (20, 25, 31):
    out = generate(model, params, [long_row[:length]], max_new_tokens=40, min_new_tokens=40, **GREEDY)
    assert out.shape == (1, length + 40)
  loops = [n for n in compiles if '_generate_on_device' in n]
  assert len(loops) == 1, compiles
  compiles.clear()
  generate(model, params, [long_row[:28]], max_new_tokens=33, **GREEDY)  # same buckets
  assert compiles == []


def test_stream_compiles_prefill_and_step_once(tiny, long_row, compiles):
  model, params = tiny
  for length in (18, 27):
    steps = list(generate_stream(model, params, [long_row[:length]], max_new_tokens=40,
                                 min_new_tokens=40, **GREEDY))
    assert len(steps) == 40
  assert sum('_prefill' in n for n in compiles) == 1, compiles
  assert sum('_advance' in n for n in compiles) == 1, compiles


@pytest.mark.parametrize('sampling', [dict(do_sample=False),
                                      dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=5)])
def test_stream_matches_generate(tiny, poster, golden, sampling):
  model, params = tiny
  prompts = [golden['batch.input_ids'][0], golden['long.input_ids'][0, :9]]
  ids = generate(model, params, prompts, poster, max_new_tokens=12, **sampling)
  steps = list(generate_stream(model, params, prompts, poster, max_new_tokens=12, **sampling))
  np.testing.assert_array_equal(np.stack(steps, 1), ids[:, 30:])


def test_top_k_1_and_tiny_top_p_are_greedy(tiny, text_prompt):
  model, params = tiny
  greedy = generate(model, params, [text_prompt], max_new_tokens=16, **GREEDY)
  for kw in (dict(top_k=1, temperature=5.0), dict(top_p=1e-6, temperature=5.0)):
    sampled = generate(model, params, [text_prompt], max_new_tokens=16, do_sample=True, seed=7, **kw)
    np.testing.assert_array_equal(sampled, greedy, err_msg=str(kw))


def test_seeded_sampling_is_reproducible(tiny, text_prompt):
  model, params = tiny
  kw = dict(max_new_tokens=24, do_sample=True, top_p=1.0, temperature=1.5)
  a, b = (generate(model, params, [text_prompt], seed=11, **kw) for _ in range(2))
  other = generate(model, params, [text_prompt], seed=jax.random.key(12), **kw)
  np.testing.assert_array_equal(a, b)
  assert (a != other).any()


def test_stop_id_ends_row_and_pads(tiny, text_prompt, golden):
  model, params = tiny
  prompts = [text_prompt, golden['long.input_ids'][0, 30:44]]
  free = generate(model, params, prompts, max_new_tokens=20, stop_ids=(), **GREEDY)[:, 20:]
  row0 = free[0]
  first = {int(t): i for i, t in reversed(list(enumerate(row0)))}  # first step of each token
  stop, at = next((t, i) for t, i in sorted(first.items(), key=lambda kv: kv[1]) if i >= 3
                  and t not in free[1])
  out = generate(model, params, prompts, max_new_tokens=20, stop_ids=(stop,), pad_id=1023, **GREEDY)[:, 20:]
  np.testing.assert_array_equal(out[0, :at + 1], row0[:at + 1])
  assert (out[0, at + 1:] == 1023).all() and at + 1 < 20
  np.testing.assert_array_equal(out[1], free[1])
  alone = generate(model, params, [text_prompt], max_new_tokens=20, stop_ids=(stop,), **GREEDY)
  assert alone.shape == (1, 20 + at + 1)  # the loop ends once every row stopped
  held = generate(model, params, [text_prompt], max_new_tokens=20, min_new_tokens=at + 2,
                  stop_ids=(stop,), **GREEDY)[0, 20:]
  assert held[at] != stop


def _hf_warp(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """Hugging Face's warpers written out in numpy, index by index."""
  x = logits / temperature
  if top_k:
    x = np.where(x < np.sort(x, -1)[:, -top_k][:, None], -np.inf, x)
  order = np.argsort(x, -1)
  ascending = np.take_along_axis(x, order, -1)
  p = np.exp(ascending - ascending.max(-1, keepdims=True))
  remove = np.cumsum(p / p.sum(-1, keepdims=True), -1) <= 1 - top_p
  remove[:, -1] = False
  out = x.copy()
  np.put_along_axis(out, order, np.where(remove, -np.inf, ascending), -1)
  return out


@pytest.mark.parametrize('scale', [3.0, 0.1])  # peaked: top-p among the best 256; flat: full sort
@pytest.mark.parametrize('temperature,top_k,top_p', [(1.0, 0, 0.5), (0.6, 0, 0.9), (1.3, 40, 0.8),
                                                     (1.0, 5, 1.0), (2.0, 0, 1.0)])
def test_warpers_match_hugging_face(temperature, top_k, top_p, scale):
  logits = np.random.default_rng(0).normal(size=(3, 1000)).astype(np.float32) * scale
  ours = np.asarray(warp_logits(jnp.asarray(logits), temperature, top_k, top_p))
  np.testing.assert_allclose(ours, _hf_warp(logits, temperature, top_k, top_p), rtol=1e-6)


def test_warpers_per_row_match_hugging_face():
  """Settings given per row as arrays (the server's rows, traced): each row warped as alone, top_k past
  the candidates and flat rows (top-p over every token) included."""
  rows = [(1.0, 0, 0.5, 3.0), (0.6, 0, 0.9, 0.1), (1.3, 40, 0.8, 3.0), (1.0, 300, 1.0, 1.0), (2.0, 0, 1.0, 0.1),
          (1.0, 5, 0.95, 0.1)]
  t, k, p, scale = (np.array(x) for x in zip(*rows))
  logits = np.random.default_rng(0).normal(size=(len(rows), 1000)).astype(np.float32) * scale[:, None].astype(np.float32)
  ours = np.asarray(jax.jit(warp_logits)(jnp.asarray(logits), t.astype(np.float32), k.astype(np.int32),
                                         p.astype(np.float32)))
  for i, (temperature, top_k, top_p, _) in enumerate(rows):
    np.testing.assert_allclose(ours[i], _hf_warp(logits[i:i + 1], temperature, top_k, top_p)[0], rtol=1e-6)


def test_sample_frequencies_follow_temperature():
  logits = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
  sampler = Sampler(True, 2.0, 0, 1.0, (), 0)
  draws = jax.vmap(lambda s: select(logits, s, 0, jax.random.key(0), sampler))(jnp.arange(4000))
  freq = np.bincount(np.asarray(draws)[:, 0], minlength=3) / 4000
  expected = np.sqrt([0.6, 0.3, 0.1]) / np.sqrt([0.6, 0.3, 0.1]).sum()  # p ** (1 / T), renormalised
  np.testing.assert_allclose(freq, expected, atol=0.03)
  assert abs(freq[0] - 0.6) > 0.1  # the flattened distribution, not the original


def test_generation_config_from_checkpoint(golden_dir, tmp_path):
  g = GenerationConfig.from_pretrained(golden_dir / 'checkpoint')
  assert (g.do_sample, g.top_k, g.top_p, g.stop_ids, g.pad_id, g.max_new_tokens) == (
      True, 0, 0.5, (151643,), 151643, 512)
  assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig()
  (tmp_path / 'generation_config.json').write_text('{"num_beams": 4}')
  with pytest.raises(ValueError, match='num_beams'):
    GenerationConfig.from_pretrained(tmp_path)
  with pytest.raises(TypeError, match='max_tokens'):
    g.replace(max_tokens=3)
  with pytest.raises(ValueError, match='top_p'):
    g.replace(top_p=0.0)


def test_buckets():
  b = Buckets()
  assert [b.length(n) for n in (1, 32, 33, 64, 300, 512, 513, 1100)] == [32, 32, 64, 64, 512, 512, 1024, 1536]
  assert [Buckets.count(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


def test_bad_inputs(tiny, poster, golden):
  model, params = tiny
  image_row = golden['batch.input_ids'][:1]
  with pytest.raises(ValueError, match='1 image spans but no pixel_values'):
    generate(model, params, image_row, max_new_tokens=2)
  with pytest.raises(ValueError, match='0 image spans but 1 images'):
    generate(model, params, golden['long.input_ids'][:, :10], poster, max_new_tokens=2)
  with pytest.raises(ValueError, match='left padding'):
    generate(model, params, image_row, poster, attention_mask=np.arange(30)[None] < 20, max_new_tokens=2)
  with pytest.raises(ValueError, match='outside the vocabulary'):
    generate(model, params, [[5, 2000]], max_new_tokens=2)
  with pytest.raises(ValueError, match='holds no tokens'):
    generate(model, params, [[5], []], max_new_tokens=2)
  with pytest.raises(ValueError, match=r'pixel_values must be \[n, 112, 112, 3\]'):
    generate(model, params, image_row, poster[:, :50], max_new_tokens=2)


def test_images_given_as_paths(tiny, poster, golden, golden_dir):
  model, params = tiny
  prompt = golden['generate.prompt_ids']
  kw = dict(max_new_tokens=5, **GREEDY)
  np.testing.assert_array_equal(generate(model, params, prompt, [str(golden_dir / 'img' / 'poster.jpg')], **kw),
                                generate(model, params, prompt, poster, **kw))


@pytest.mark.parametrize('scan_layers,weight_major', [(False, True), (False, False)])
def test_param_forms_round_trip_and_generate_alike(tiny, text_prompt, scan_layers, weight_major):
  """Every form converts back bit for bit, and generation reads any form to the same tokens."""
  model, params = tiny
  other = param_layout.convert(params, scan_layers=scan_layers, weight_major=weight_major)
  assert param_layout.form(other) == (scan_layers, weight_major)
  layer = other['decoder']['layers' if scan_layers else 'layers_1']
  kernel = layer['attn']['c_attn']['kernel_t' if weight_major else 'kernel']
  stacked = params['decoder']['layers']['attn']['c_attn']['kernel']
  want = stacked if scan_layers else stacked[1]
  np.testing.assert_array_equal(kernel, np.moveaxis(want, -4, -1) if weight_major else want)
  chex.assert_trees_all_equal(param_layout.convert(other, scan_layers=True, weight_major=False), params)
  kw = dict(max_new_tokens=5, **GREEDY)
  np.testing.assert_array_equal(generate(model, other, [text_prompt], **kw),
                                generate(model, params, [text_prompt], **kw))
  copy = jax.tree.map(lambda x: x, params)
  consumed = param_layout.convert(copy, scan_layers=scan_layers, weight_major=weight_major, consume=True)
  assert not jax.tree.leaves(copy)
  chex.assert_trees_all_equal(consumed, other)


@pytest.mark.parametrize('scan_layers,slots_last', [(True, False), (False, True)])
def test_cached_decoding_equals_full_forward(tiny, long_row, scan_layers, slots_last):
  """The model's cached forward (prefill, then single-token steps at one slot per row: rows at
  different lengths) gives the full forward's logits at every position."""
  model, params = tiny
  config = model.config.replace(scan_layers=scan_layers, weight_major=slots_last)
  decoding = q.QwenVL(config)
  p = param_layout.convert(params, scan_layers=scan_layers, weight_major=slots_last)
  b, n, slots = 2, 40, 48
  ids = np.stack([long_row[:n], long_row[20:20 + n]]).astype(np.int32)
  full = decoding.apply({'params': p}, ids)  # 40 tokens > seq_length 32: NTK and logn are active
  text = config.text
  if scan_layers:
    cache = q.KVCache.zeros(text, b, slots, jnp.float32, layers=text.num_layers)
  else:
    cache = tuple(q.KVCache.zeros(text, b, slots, jnp.float32, slots_last=slots_last)
                  for _ in range(text.num_layers))
  lengths = np.array([30, 25])  # row 1 runs 5 tokens behind row 0
  mask = np.ones((b, slots), bool)
  prefix = np.stack([ids[0, :30], np.concatenate([ids[1, :25], np.zeros(5, np.int32)])])
  alpha = ntk_alpha_of(jnp.ones((b, n), bool), text)  # the full forward's: dynamic NTK of 40 tokens
  step = jax.jit(lambda p, x, c, i: decoding.apply({'params': p}, x, attention_mask=mask, alpha=alpha,
                                                   cache=c, cache_index=i))
  out = step(p, prefix, cache, jnp.zeros((b,), jnp.int32))
  for r in range(b):
    chex.assert_trees_all_close(out['logits'][r, :lengths[r]], full[r, :lengths[r]], atol=1e-4, rtol=0)
  cache = out['cache']
  for i in range(5):
    at = jnp.asarray(lengths + i, jnp.int32)
    out = step(p, ids[np.arange(b), lengths + i][:, None], cache, at)
    cache = out['cache']
    for r in range(b):
      chex.assert_trees_all_close(out['logits'][r, 0], full[r, lengths[r] + i], atol=1e-4, rtol=0)


@pytest.mark.parametrize('batch', [1, 3])  # without the kernel a batch of 1 is stored without its b axis
def test_cache_layouts_hold_the_same(tiny, batch):
  """Both layouts, one write index or one per row, attend alike over what was written."""
  text = tiny[0].config.text
  rng = np.random.default_rng(0)
  keys, values, query = rng.normal(size=(3, batch, 5, text.num_heads, text.head_dim)).astype(np.float32)
  index = jnp.asarray([4, 1, 6][:batch], jnp.int32)
  valid = jnp.ones((batch, 12), bool)
  for at in (jnp.int32(4), index):
    got = []
    for slots_last in (False, True):
      cache = q.KVCache.zeros(text, batch, 12, jnp.float32, slots_last=slots_last)
      cache = cache.write(jnp.asarray(keys), jnp.asarray(values), at)
      got.append(cache.attend(jnp.asarray(query[:, :1]), valid[:, None], jnp.float32))
    chex.assert_trees_all_close(got[0], got[1], atol=1e-5, rtol=1e-5)
  first = q.KVCache.zeros(text, batch, 12, jnp.float32).write(jnp.asarray(keys), jnp.asarray(values), index)
  for r in range(batch):
    np.testing.assert_array_equal(first.k[r, int(index[r]):int(index[r]) + 5], keys[r])
    assert not np.asarray(first.k[r, :int(index[r])]).any()


@pytest.mark.parametrize('eqn, x_shape, w_shape', [
    ('btd,chkd->btchk', (2, 3, 8), (3, 2, 4, 8)),  # c_attn
    ('bthk,dhk->btd', (2, 3, 2, 4), (8, 2, 4)),  # attn.c_proj
    ('btd,cfd->btcf', (1, 1, 8), (2, 16, 8)),  # w12
    ('btd,vd->btv', (3, 1, 8), (32, 8)),  # lm_head
])
def test_weight_major_einsum_equals_einsum(eqn, x_shape, w_shape):
  from qwenvl_jax.layers import weight_major_einsum
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=x_shape).astype(np.float32), rng.normal(size=w_shape).astype(np.float32)
  want = jnp.einsum(eqn, x, w)
  got = jax.jit(weight_major_einsum, static_argnums=0)(eqn, x, w)
  assert got.shape == want.shape
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_argmax_last_equals_argmax():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 1000)).astype(np.float32)
  x[1, [3, 700]] = 9.0  # ties: the first
  x[2, [5, 9]] = np.nan  # NaN wins, the first one
  x[3] = -np.inf
  x[4, 999] = np.inf
  x[5] = np.round(x[5])  # many ties
  got = jax.jit(argmax_last)(x)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
