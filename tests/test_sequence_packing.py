"""Sequence packing: several samples per row, each with its own positions and attention, give the loss and
gradients of the same samples one per row; packed batches resume exactly; a sample that finds no row waits
for the next window."""
import json
import random

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.decoder import causal_mask, positions_of
from qwenvl_jax.model import QwenVL, param_shapes
from qwenvl_jax.preprocess import normalize_on_device
from train import world
from train.config import stage_config
from train.data import Encoder
from train.loader import LoaderConfig
from train.rows import first_fit
from train.step import init_state, make_train_step, target_nll
from train.validate import make_loader

from conftest import SHORT_SPAN

# The real vocabulary needs its 151936 rows; seq_length 64 is shorter than a packed row (~180 tokens) and
# longer than any sample: a row-wide dynamic-NTK or logn factor would show as a different loss.
MODEL = {
    'vocab_size': 151936, 'hidden_size': 128, 'num_hidden_layers': 1, 'num_attention_heads': 2,
    'kv_channels': 64, 'intermediate_size': 256, 'seq_length': 64,
    'visual': {'image_size': 28, 'patch_size': 14, 'width': 32, 'layers': 1, 'heads': 2, 'mlp_ratio': 2.0,
               'output_dim': 128, 'n_queries': SHORT_SPAN, 'image_start_id': 151857},
}


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  """Stage-2 records of a small world: grounding, captions, VQA, OCR; 36 to 60 tokens each."""
  root = tmp_path_factory.mktemp('packing')
  scenes, _ = world.make_world(root, 12, 0, seed=2, cfg=world.WorldConfig(size=56, grid=3, max_objects=2))
  return root, world.multitask_records(scenes, random.Random(0), other_tasks=1.0)


def _loader(tok, root, records, per_row, batch=8, buckets=(64, 256), window=2, **kw):
  cfg = LoaderConfig(batch_size=batch, seq_buckets=buckets, target_step=8, max_images=1, image_size=28,
                     seed=0, window=window, samples_per_row=per_row, **kw)
  return make_loader(records, tok, 'multitask', 'official', cfg, root)[0]


def test_first_fit_respects_both_capacities():
  lengths = [5, 9, 3, 3, 7, 2]
  rows, left = first_fit(lengths, [0] * 6, rows=3, max_tokens=12, max_images=0)
  assert rows == [[1, 2], [4, 0], [3, 5]] and not left  # longest first, each into the first row with room
  rows, left = first_fit(lengths, [1] * 6, rows=3, max_tokens=12, max_images=1)
  assert rows == [[1], [4], [0]] and left == [2, 3, 5]  # one image per row: the rest find no room
  rows, left = first_fit(lengths, [0] * 6, rows=2, max_tokens=12, max_images=0)
  assert rows == [[1, 2], [4, 0]] and left == [3, 5]


def _first_fit_one_by_one(lengths, images, rows, max_tokens, max_images):
  """The definition, sample by sample: each, in first_fit's order, into the first row with room."""
  room, image_room = [max_tokens] * rows, [max_images] * rows
  out, left = [[] for _ in range(rows)], []
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], -images[i], i)):
    r = next((r for r in range(rows) if room[r] >= lengths[i] and image_room[r] >= images[i]), None)
    if r is None:
      left.append(i)
      continue
    out[r].append(i)
    room[r], image_room[r] = room[r] - lengths[i], image_room[r] - images[i]
  return out, left


@pytest.mark.parametrize('n, rows, max_tokens, max_images', [(600, 90, 256, 7), (400, 150, 40, 2), (300, 30, 1000, 4)])
def test_first_fit_equals_placing_samples_one_by_one(n, rows, max_tokens, max_images):
  """Runs of one size are placed together; the rows are those of placing each sample in turn (with many
  repeated sizes, a few, and samples that find no room)."""
  rng = np.random.default_rng(n)
  lengths = rng.integers(0, max_tokens // 2, n).tolist()
  images = rng.integers(0, 3, n).tolist()
  assert first_fit(lengths, images, rows, max_tokens, max_images) == \
      _first_fit_one_by_one(lengths, images, rows, max_tokens, max_images)


def test_segments_give_per_sample_positions_and_a_block_diagonal_mask():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(positions_of(seg, 0, 8)[0, :6], [0, 1, 0, 1, 2, 0])
  mask = np.asarray(causal_mask(seg, 8))[0]
  expected = np.zeros((8, 8), bool)
  for lo, hi in ((0, 2), (2, 5), (5, 6)):
    expected[lo:hi, lo:hi] = np.tril(np.ones((hi - lo, hi - lo), bool))
  np.testing.assert_array_equal(mask[:6], expected[:6])
  # A 0/1 mask is one sample: left padding and a hole (a cache slot never written) keep counting on.
  plain = jnp.asarray([[0, 0, 1, 1, 1, 0, 1]])
  np.testing.assert_array_equal(positions_of(plain, 0, 7)[0], [0, 0, 0, 1, 2, 2, 3])
  m = np.asarray(causal_mask(plain, 7))[0]
  np.testing.assert_array_equal(m, plain[0].astype(bool)[None, :] & np.tri(7, dtype=bool))
  # Decoding: queries at slots 5.. of a cache see their own sample only.
  np.testing.assert_array_equal(np.asarray(causal_mask(seg, 1, 5))[0, 0], [0, 0, 0, 0, 0, 1, 0, 0])


def test_packed_rows_hold_every_sample_whole(tok, records):
  root, recs = records
  loader = _loader(tok, root, recs, per_row=4)
  encoded = {tuple(Encoder(tok, 'multitask')(r).ids) for r in recs}
  seen = []
  for k in range(loader.batches_per_epoch):
    batch = loader.batch(k)
    assert batch['input_ids'].shape[0] == 2 and batch['pixel_values'].shape[1] == 4
    for r in range(2):
      seg, ids = batch['attention_mask'][r], batch['input_ids'][r]
      targets = set(batch['targets'][r][batch['target_mask'][r] > 0].tolist())
      for s in range(1, seg.max() + 1):
        span = np.flatnonzero(seg == s)
        assert np.array_equal(span, np.arange(span[0], span[-1] + 1))  # contiguous
        seen.append(tuple(ids[span]))
        assert span[0] - 1 not in targets  # nothing predicts a sample's first token from the one before
      n_images = int((ids == MODEL['visual']['image_start_id']).sum())
      assert np.abs(batch['pixel_values'][r, :n_images]).reshape(n_images, -1).sum(1).min() > 0
      assert not batch['pixel_values'][r, n_images:].any()
  assert len(seen) == len(set(seen)) == loader.batches_per_epoch * 8 and set(seen) <= encoded


@pytest.fixture(scope='module')
def model_params():
  """The model with random parameters (numpy's generator: flax's init of the 152k-row tables is slow)."""
  model = QwenVL(QwenVLConfig.from_dict(MODEL))
  rng = np.random.default_rng(0)
  return model, jax.tree.map(lambda s: 0.02 * rng.standard_normal(s.shape, np.float32), param_shapes(model))


def _batch(tok, root, recs, per_row):
  """One batch holding the same 8 records: 8 rows of one sample, or 2 rows of 4."""
  return _loader(tok, root, recs[:8], per_row, buckets=(256,), window=1).batch(0)


def test_packed_loss_equals_unpacked(tok, records, model_params):
  """The summed per-token loss and the target count of the same samples, packed or not (the forward, as the
  train step runs it)."""
  root, recs = records
  model, params = model_params

  @jax.jit
  def loss(params, batch):
    slots = batch['pixel_values'].reshape((-1,) + batch['pixel_values'].shape[2:])  # all in use here
    logits = model.apply({'params': params}, batch['input_ids'], normalize_on_device(slots),
                         attention_mask=batch['attention_mask'], logits_at=batch['targets'], train=True)
    nll = target_nll(logits, batch['input_ids'], batch['targets']) * batch['target_mask']
    return nll.sum(), batch['target_mask'].sum()

  single, packed = _batch(tok, root, recs, 1), _batch(tok, root, recs, 4)
  assert single['input_ids'].shape[0] == 8 and packed['input_ids'].shape[0] == 2
  assert packed['attention_mask'].max() == 4 and (packed['attention_mask'] != 0).sum(1).max() > 64
  assert (packed['input_ids'] == MODEL['visual']['image_start_id']).sum() == 8  # every image slot in use
  (sum1, count1), (sum4, count4) = loss(params, single), loss(params, packed)
  assert float(count1) > 0
  chex.assert_trees_all_close((sum4, count4), (sum1, count1), rtol=2e-6)


@pytest.mark.slow
def test_packed_gradients_equal_unpacked(tok, records, model_params):
  """Through the train step (stage 2, SGD at lr 1: the update is minus the mean gradient): the loss, the
  target count and every parameter's update of the packed batch equal the unpacked one's."""
  root, recs = records
  model, params = model_params
  results = []
  for per_row in (1, 4):
    cfg = stage_config(2, batch_size=8, grad_accum=1, steps=2, warmup_steps=1, image_size=28,
                       dtype='float32', samples_per_row=per_row)
    optimizer = optax.sgd(1.0)
    state, metrics = jax.jit(make_train_step(model, optimizer, cfg))(init_state(cfg, params, optimizer),
                                                                     _batch(tok, root, recs, per_row))
    update = jax.tree.map(lambda new, old: new - old, state.params, params)
    results.append((metrics['loss'], metrics['targets'], update))
  (loss1, count1, update1), (loss4, count4, update4) = results
  chex.assert_trees_all_close((loss4, count4), (loss1, count1), rtol=2e-6)
  chex.assert_trees_all_close(update4, update1, rtol=1e-4, atol=1e-8)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(update1)) > 1e-4  # the update is not zero


def test_packed_batches_resume_exactly(tok, records):
  root, recs = records
  a = _loader(tok, root, recs, per_row=4)
  straight = [b for _, b in zip(range(5), a)]
  state = json.loads(json.dumps(a.state()))  # as the checkpoint stores it
  b = _loader(tok, root, recs, per_row=4)
  b.restore(state)
  nxt = next(iter(b))
  expected = a.batch(5)
  assert all(np.array_equal(nxt[k], expected[k]) for k in expected)
  assert all(np.array_equal(straight[2][k], b.batch(2)[k]) for k in expected)
  with pytest.raises(ValueError, match='samples_per_row=4.*samples_per_row=2'):
    _loader(tok, root, recs, per_row=2).restore(state)


def test_samples_without_room_wait_for_the_next_windows(tok, records):
  """Rows of 64 tokens hold one or two samples: with 4 samples per row, most find no room. They are
  carried, oldest first, into the next windows, which take as many new records as there is room left: none
  is lost, counted as a bad record (on_bad_record=error would stop) or trained on twice."""
  root, recs = records
  loader = _loader(tok, root, recs, per_row=4, buckets=(64,))
  seen = []
  for _, batch in zip(range(12), loader):
    assert loader.last_skipped == 0
    seen += [tuple(ids[m == s]) for ids, m in zip(batch['input_ids'], batch['attention_mask'])
             for s in range(1, m.max() + 1)]
  end = loader.make._window[2]  # the start of window 6: the records read, those waiting
  assert end.batch == 12 and len(end.carry) > 4 and end.position - len(end.carry) == len(seen) < 12 * 8
  ids = lambda indices: [tuple(loader.make._encode(r)[0].ids) for r in loader.source.records(indices)]
  stream = loader.make._records(np.arange(end.position)).tolist()
  assert sorted(seen + ids(end.carry)) == sorted(ids(stream))
  assert set(ids(stream[:12])) <= set(seen)  # the first window's records went first
