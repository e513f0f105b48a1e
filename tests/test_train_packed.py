"""Packed datasets: `qwenvl-data pack`, the same batches as from JSON, processes' shares, bad records."""
import io
import json
import random
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.preprocess import normalize_on_device, preprocess_images
from train import world
from train.config import TrainConfig
from train.data import Encoder
from train.inputs import open_data
from train.loader import Loader, LoaderConfig
from train.packed import PackedSource, is_packed
from train.packing import SKIPPED, PackError, pack
from train.validate import make_loader

from conftest import SHORT_SPAN as SPAN


@pytest.fixture(scope='module')
def packed(tmp_path_factory):
  """A world's chat records as a JSON file with loose images, and packed (3 shards)."""
  root = tmp_path_factory.mktemp('packed')
  scenes, _ = world.make_world(root / 'w', 40, 0, seed=1, cfg=world.WorldConfig(size=56, grid=3, max_objects=3))
  records = world.chat_records(scenes, random.Random(0))
  data = world.write_json(records, root / 'w' / 'chat.json')
  pack(data, root / 'p', 'chat', shard_size=40, span=SPAN, say=lambda _: None)
  return root, data, records


def _cfg(**kw):
  return LoaderConfig(**{'batch_size': 8, 'seq_buckets': (64, 96), 'target_step': 8, 'max_images': 1,
                         'image_size': 28, 'seed': 5, 'window': 2, **kw})


def _packed_loader(tok, directory, index=0, count=1, **kw):
  return Loader(PackedSource(directory), Encoder(tok, 'chat'), _cfg(**kw), index, count)


def _same(a, b):
  return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_json_and_packed_give_identical_batches(tok, packed):
  root, data, records = packed
  from_json = make_loader(records, tok, 'chat', 'official', _cfg(), data.parent)[0]
  from_shards = _packed_loader(tok, root / 'p')
  assert len(PackedSource(root / 'p').manifest['shards']) == 3
  assert from_json.batches_per_epoch == from_shards.batches_per_epoch == len(records) // 8
  for k in (0, 3, from_json.batches_per_epoch + 1):  # into the second epoch
    assert _same(from_json.batch(k), from_shards.batch(k))
  # The bytes shipped are the float preprocessing's input: normalised on the device, its very numbers.
  batch = from_shards.batch(0)
  assert batch['pixel_values'].dtype == np.uint8
  image = tok.image_paths(batch['input_ids'][0].tolist())[0]
  on_device = np.asarray(jax.jit(normalize_on_device)(batch['pixel_values'][0, 0]))
  np.testing.assert_array_equal(on_device, preprocess_images([data.parent / image], 28)[0])


def test_two_processes_cover_an_epoch_once(tok, packed):
  """Process index and count given explicitly, as jax.process_index()/process_count() would be."""
  root, _, records = packed
  halves = [_packed_loader(tok, root / 'p', index=i, count=2) for i in range(2)]
  whole = _packed_loader(tok, root / 'p')
  seen = []
  for h in halves:
    rows = [h.batch(k) for k in range(h.batches_per_epoch)]
    seen.append({tuple(r[m > 0]) for b in rows for r, m in zip(b['input_ids'], b['attention_mask'])})
    assert sum(b['input_ids'].shape[0] for b in rows) == len(seen[-1]) == h.batches_per_epoch * 4
  assert not seen[0] & seen[1]
  epoch = {tuple(r[m > 0]) for k in range(whole.batches_per_epoch)
           for b in [whole.batch(k)] for r, m in zip(b['input_ids'], b['attention_mask'])}
  assert seen[0] | seen[1] == epoch and len(epoch) == whole.batches_per_epoch * 8


def test_training_opens_packed_data(tok, packed, tmp_path):
  root, data, _ = packed
  cfg = TrainConfig(data=str(root / 'p'), data_format='chat', seq_buckets=(64, 96), target_step=8,
                    image_size=28, batch_size=8, grad_accum=1, bucket_window=2, seed=5)
  loader, report = open_data(cfg, tok, None, 0, 1)
  assert isinstance(loader.source, PackedSource) and 'packed records in 3 shard(s)' in report.summary(96)
  with pytest.raises(ValueError, match="packed as data_format='chat'.*set data_format=chat"):
    open_data(cfg.replace(data_format='caption'), tok, None, 0, 1)
  (tmp_path / 'half').mkdir()
  with pytest.raises(Exception, match='without a finished pack'):
    open_data(cfg.replace(data=str(tmp_path / 'half')), tok, None, 0, 1)


def _webdataset(path, samples):
  with tarfile.open(path, 'w') as tar:
    for name, data in samples:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _png(colour):
  buf = io.BytesIO()
  Image.new('RGB', (32, 32), colour).save(buf, 'PNG')
  return buf.getvalue()


def test_webdataset_bad_records_are_reported_or_skipped(tmp_path):
  good = [(f'{k:03d}.png', _png((k, 0, 0))) for k in range(5)] + [(f'{k:03d}.txt', f'shape {k}'.encode())
                                                                  for k in range(5)]
  samples = sorted(good)[:4] + [('002.png', _png((2, 0, 0))[:-30]), ('002.txt', b'cut short')]  # corrupt
  samples += [('003.json', b'{"url": "x"}'), ('003.png', _png((3, 0, 0)))]  # no caption
  samples += sorted(good)[8:]
  _webdataset(tmp_path / 'shard-0.tar', samples)
  with pytest.raises(PackError, match=r'shard-0.tar key 002: cannot decode image .002.png') as e:
    pack(tmp_path / 'shard-0.tar', tmp_path / 'out', 'caption', say=lambda _: None)
  assert 'nothing was written' in str(e.value)
  assert list(tmp_path.iterdir()) == [tmp_path / 'shard-0.tar']  # no dataset, no partial directory
  manifest = pack(tmp_path, tmp_path / 'out', 'caption', shard_size=2, on_bad_record='skip',
                  say=lambda _: None)
  assert manifest['records'] == 3 and manifest['skipped'] == 2
  assert [s['records'] for s in manifest['shards']] == [2, 1]
  logged = [json.loads(line) for line in (tmp_path / 'out' / SKIPPED).read_text().splitlines()]
  assert [(s['key'], s['reason'][:20]) for s in logged] == [('002', 'cannot decode image '),
                                                            ('003', "missing field 'capti")]
  source = PackedSource(tmp_path / 'out')
  assert source.records([0, 2]) == [{'image': '000.png', 'caption': 'shape 0'},
                                    {'image': '004.png', 'caption': 'shape 4'}]
  assert source.image(2, '004.png').getpixel((0, 0)) == (4, 0, 0)


def test_interrupted_pack_leaves_nothing(packed, tmp_path, monkeypatch):
  _, data, _ = packed
  import train.packing
  calls = []

  def add(self, *a):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt
  monkeypatch.setattr(train.packing._ShardWriter, 'add', add)
  with pytest.raises(KeyboardInterrupt):
    pack(data, tmp_path / 'out', 'chat', span=SPAN)
  assert list(tmp_path.iterdir()) == [] and not is_packed(tmp_path / 'out')


def test_bad_records_at_training_time(tok, packed, tmp_path):
  """An image that passed the header check but does not decode: 'error' names it, 'skip' blanks its row,
  logs it and counts it, and too many stop the run."""
  root, data, records = packed
  images = tmp_path / 'w'
  images.mkdir()
  for f in data.parent.glob('*.png'):
    (images / f.name).write_bytes(f.read_bytes())
  bad = records[0]['conversations'][0]['value'].split('<img>')[1].split('</img>')[0]
  jpeg = io.BytesIO()
  Image.open(images / bad).save(jpeg, 'JPEG')
  (images / bad).write_bytes(jpeg.getvalue()[:-20])  # the header reads, the last pixels do not
  users = [k for k, r in enumerate(records) if f'<img>{bad}</img>' in r['conversations'][0]['value']]

  def loader(**kw):
    return make_loader(records, tok, 'chat', 'official', _cfg(**kw), images)[0]
  strict = loader()
  with pytest.raises(ValueError, match=rf'data record ({"|".join(map(str, users))}): cannot decode image '
                                       rf".{bad}.*on_bad_record=error"):
    [strict.batch(k) for k in range(strict.batches_per_epoch)]
  lenient = loader(on_bad_record='skip', max_bad_fraction=0.5)
  lenient.skipped_file = tmp_path / SKIPPED
  batches = iter(lenient)
  skipped = 0
  for _ in range(lenient.batches_per_epoch):
    batch = next(batches)
    skipped += lenient.last_skipped
    blank = batch['attention_mask'].sum(1) == 1
    assert blank.sum() == lenient.last_skipped and not batch['target_mask'][blank].any()
  batches.close()
  logged = [json.loads(line) for line in (tmp_path / SKIPPED).read_text().splitlines()]
  assert 0 < skipped == len(logged) <= len(users) and all(bad in s['reason'] for s in logged)
  assert lenient.state()['bad'] == [0, skipped]
  strictest = loader(on_bad_record='skip', max_bad_fraction=0.0)
  with pytest.raises(ValueError, match='bad records in epoch 0 .* over max_bad_fraction=0.0'):
    for _ in zip(range(strictest.batches_per_epoch), strictest):
      pass


@pytest.mark.slow
def test_pack_memory_does_not_grow_with_the_source(tmp_path):
  """Peak memory of `qwenvl-data pack` over 1000 and 3000 records (49 KB of image each) differs by far less
  than the 98 MB of images the larger one holds more."""
  noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noise).save(buf, 'PNG')  # ~49 KB: noise does not compress
  peaks = {}
  for n in (1000, 3000):
    src = tmp_path / str(n)
    src.mkdir()
    with open(src / 'data.jsonl', 'w') as f:
      for k in range(n):
        (src / f'{k}.png').write_bytes(buf.getvalue())
        f.write(json.dumps({'image': f'{k}.png', 'caption': f'noise {k}'}) + '\n')
    # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark (this pytest worker's) into a child.
    code = ('import sys; from train.data_cli import main; rc = main(sys.argv[1:]); '
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]); sys.exit(rc)")
    out = subprocess.run([sys.executable, '-c', code, 'pack', str(src / 'data.jsonl'), str(src / 'out'),
                          '--shard-size', '1000'], capture_output=True, text=True, check=True)
    peaks[n] = int(out.stdout.split()[-1]) / 1024  # MB
    assert PackedSource(src / 'out').manifest['records'] == n
  print(f'peak memory of pack: {peaks} MB')
  assert peaks[3000] - peaks[1000] < 40, peaks  # measured: 207 and 230 MB (all images held: +98 MB)


def test_packed_overlong_records_follow_on_overlong(tok, packed):
  """Packed records are not measured up front: a sample over the longest bucket meets on_overlong when its
  batch is made, and a refused one is a bad record, named by shard, record and key."""
  root, _, _ = packed
  strict = _packed_loader(tok, root / 'p', seq_buckets=(64,), on_overlong='error')
  with pytest.raises(ValueError, match=r'texts-0000\d.array_record record \d+ \(key \w+\): \d+ tokens, over '
                                       r'the longest bucket \(64\) \(on_overlong=error\)'):
    [strict.batch(k) for k in range(strict.batches_per_epoch)]
  lenient = _packed_loader(tok, root / 'p', seq_buckets=(64,), on_overlong='skip', on_bad_record='skip')
  batch = lenient.batch(0)
  assert batch['input_ids'].shape[1] == 64 and lenient.last_skipped > 0
  assert (batch['attention_mask'].sum(1) == 1).sum() == lenient.last_skipped
  cut = _packed_loader(tok, root / 'p', seq_buckets=(64,))  # truncate: nothing is bad
  assert cut.batch(0) is not None and cut.last_skipped == 0 and cut.last_truncated > 0
