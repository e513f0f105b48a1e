"""The loader's order at pod scale: a window costs what it reads, whatever the dataset's size; each epoch
is a permutation, alike in every process and worker; packed samples without room are carried to the next
window, neither lost nor counted as bad records; runs saved with the old order keep it to the epoch's end."""
import json
import pickle
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.tokenizer import QwenVLTokenizer
from train.data import Encoder
from train.loader import Loader, LoaderConfig
from train.packed import RecordSource
from train.shuffle import index_shuffle

WORDS = 'a red circle on the left of two blue squares near one small green triangle under it'.split()


class FakeSource(RecordSource):
  """n caption records made on demand: record i names itself; a few are malformed (no caption)."""

  def __init__(self, n: int, malformed=()):
    self.n, self.malformed, self.name = n, set(malformed), f'fake{n}'

  def __len__(self):
    return self.n

  def records(self, indices):
    out = []
    for i in indices:
      words = ' '.join(WORDS[j] for j in np.random.default_rng(i).integers(0, len(WORDS), 2 + i % 40))
      out.append({'image': f'{i}.png'} if i in self.malformed else
                 {'image': f'{i}.png', 'caption': f'record {i}: {words}'})
    return out

  def image(self, i, path):
    return Image.new('RGB', (28, 28), (i % 256, 7, 9))

  def where(self, i):
    return f'{self.name} record {i}'


def _cfg(**kw):
  return LoaderConfig(**{'batch_size': 8, 'seq_buckets': (256,), 'target_step': 8, 'max_images': 1,
                         'image_size': 28, 'seed': 3, 'window': 2, **kw})


def _records_of(batch, tok):
  """The record index of each sample of a batch (the fake records name themselves)."""
  out = []
  for ids, seg in zip(batch['input_ids'], batch['attention_mask']):
    for s in range(1, seg.max() + 1):
      text = tok.decode(ids[seg == s].tolist())
      if 'record ' in text:
        out.append(int(text.split('record ')[1].split(':')[0]))
  return out


def test_index_shuffle_is_a_keyed_permutation():
  for n in (1, 2, 7, 1000, 4097):
    order = index_shuffle(np.arange(n), n, (0, 1))
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(order, index_shuffle(np.arange(n), n, (0, 1)))  # a pure function of the key
  assert not np.array_equal(index_shuffle(np.arange(1000), 1000, (0, 1)), index_shuffle(np.arange(1000), 1000, (0, 2)))
  with pytest.raises(ValueError, match=r'positions must lie in \[0, 10\)'):
    index_shuffle([10], 10, (0,))


def test_a_window_costs_the_same_at_a_billion_records(tok):
  """A window of 16 records of a 10**9-record source: no array of the dataset's size (a permutation of it
  held 8 GB), the same memory and time as at 10**4; every process and pickled worker makes the same batch."""
  costs = []
  for n in (10 ** 4, 10 ** 9):
    loader = Loader(FakeSource(n), Encoder(tok, 'caption'), _cfg())
    loader.batch(0)  # imports and caches warmed
    tracemalloc.start()
    start = time.perf_counter()
    batches = [loader.batch(k) for k in (2, 5 * loader.batches_per_epoch + 2)]  # epochs 0 and 5
    costs.append((time.perf_counter() - start, tracemalloc.get_traced_memory()[1]))
    tracemalloc.stop()
  (t_small, m_small), (t_big, m_big) = costs
  assert m_big < 2 * m_small + 2 ** 20 and m_big < 32 * 2 ** 20, costs
  assert t_big < 2 * t_small + 0.5, costs
  worker = pickle.loads(pickle.dumps(loader.make))  # as grain hands it to a worker process
  again = json.loads(worker(2)['meta']), worker(2)['batch']
  assert all(np.array_equal(again[1][k], batches[0][k]) for k in batches[0])
  halves = [Loader(FakeSource(10 ** 9), Encoder(tok, 'caption'), _cfg(), i, 2).batch(2) for i in range(2)]
  assert _records_of(halves[0], tok) + _records_of(halves[1], tok) == _records_of(batches[0], tok)


def test_each_epoch_is_a_permutation(tok):
  n = 203  # 25 batches of 8 an epoch, 3 records left out of each (a different 3 each epoch)
  loader = Loader(FakeSource(n), Encoder(tok, 'caption'), _cfg())
  epochs = [[i for k in range(e * 25, (e + 1) * 25) for i in _records_of(loader.batch(k), tok)] for e in (0, 1)]
  for seen in epochs:
    assert len(seen) == len(set(seen)) == 200 and set(seen) <= set(range(n))
  assert epochs[0] != epochs[1]


@pytest.fixture(scope='module')
def tok256(vocab_file):
  """Stage 1's tokenizer: 256 image tokens a sample."""
  return QwenVLTokenizer(vocab_file, image_span_length=256)


def test_packing_carries_samples_without_room(tok256):
  """Stage 1's shape: ~260..300-token captions, 7 to a row of 2048. First-fit leaves a few without room in
  each window (the old loader counted them as bad records: far over max_bad_fraction); they go into the
  next window: every record of the stream is trained on once, in order, and only malformed ones are bad."""
  malformed = {5, 77, 150}
  source = FakeSource(56 * 4 * 6, malformed)  # the 16 batches read within epoch 0
  cfg = _cfg(batch_size=56, seq_buckets=(2048,), window=4, samples_per_row=7, on_bad_record='skip',
             max_bad_fraction=0.01)
  loader = Loader(source, Encoder(tok256, 'caption'), cfg)
  seen, skipped, carried = [], 0, []
  for k, batch in zip(range(16), loader):
    assert batch['input_ids'].shape == (8, 2048)
    seen += _records_of(batch, tok256)
    skipped += loader.last_skipped
    if k % 4 == 3:
      carried.append(len(loader.make._window[2].carry))
  assert max(carried) > 0  # rows did run out of room
  end = loader.make._window[2]  # the start of window 4: its position and what is carried into it
  stream = loader.make._records(np.arange(end.position)).tolist()
  expected = sorted(set(stream) - malformed - set(end.carry))
  assert len(seen) == len(set(seen)) and sorted(seen) == expected
  assert skipped == loader.bad[1] == len(malformed & set(stream) - set(end.carry)) > 0


def test_a_resume_inside_a_carrying_window_is_exact(tok256):
  cfg = _cfg(batch_size=56, seq_buckets=(2048,), window=4, samples_per_row=7)
  a = Loader(FakeSource(1000), Encoder(tok256, 'caption'), cfg)
  it = iter(a)
  for _ in range(6):
    next(it)
  state = json.loads(json.dumps(a.state()))  # as the checkpoint stores it
  expected = [next(it) for _ in range(4)]
  it.close()
  assert state['window']['batch'] == 4 and state['window']['carry']  # mid-window, with records carried in
  b = Loader(FakeSource(1000), Encoder(tok256, 'caption'), cfg)
  b.restore(state)
  for want, got in zip(expected, b):
    assert all(np.array_equal(want[k], got[k]) for k in want)


def _old_order(seed, epoch, n, lo, hi):
  """The order runs saved before the index shuffle used: a permutation of all records per epoch."""
  return np.random.default_rng([seed, epoch]).permutation(n)[lo:hi].tolist()


def test_a_run_saved_with_the_old_order_keeps_it_to_the_epoch_end(tok):
  n, cfg = 203, _cfg()
  loader = Loader(FakeSource(n), Encoder(tok, 'caption'), cfg)
  saved = {'next_batch': 30, 'seed': 3, 'records': n, 'batch_size': 8, 'samples_per_row': 1, 'bad': [1, 0]}
  loader.restore(saved)  # epoch 1, batch 5 of its 25: the old order to batch 50, the new one from there
  rest = [i for k in range(29, 50) for i in _records_of(loader.batch(k), tok)]  # from batch 30's window on
  assert sorted(rest) == sorted(_old_order(3, 1, n, 32, 200))  # windows 2.. of epoch 1, as the old run
  assert loader.state()['legacy_until'] == 50 and loader.state()['order'] == 'feistel-v1'
  fresh = Loader(FakeSource(n), Encoder(tok, 'caption'), cfg)
  epoch2 = [i for k in range(50, 75) for i in _records_of(loader.batch(k), tok)]
  assert sorted(epoch2) == sorted(i for k in range(50, 75) for i in _records_of(fresh.batch(k), tok))
  assert len(set(epoch2)) == 200
  with pytest.raises(ValueError, match="order is 'feistel-v0'.*resume with the version that wrote"):
    loader.restore({**loader.state(), 'order': 'feistel-v0'})


def test_a_packed_run_saved_with_the_old_order_keeps_its_windows(tok256):
  """Packed, the old order also reported samples without room as bad records (nothing carried): its
  windows are rebuilt so to the epoch's end, each record of them placed or reported once."""
  n, cfg = 56 * 4 * 3, _cfg(batch_size=56, seq_buckets=(2048,), window=4, samples_per_row=7)
  loader = Loader(FakeSource(n), Encoder(tok256, 'caption'), cfg)
  loader.restore({'next_batch': 5, 'seed': 3, 'records': n, 'batch_size': 56, 'samples_per_row': 7})
  placed, bad = [], []
  for k in range(4, 8):  # window 1 of epoch 0
    made = loader.make(k)
    placed += _records_of(made['batch'], tok256)
    bad += [int(b['record'].split()[-1]) for b in json.loads(made['meta'])['bad']]
  assert bad and sorted(placed + bad) == sorted(_old_order(3, 0, n, 224, 448))
  assert loader.state()['legacy_until'] == 12  # the new order, carrying, from epoch 1 on
