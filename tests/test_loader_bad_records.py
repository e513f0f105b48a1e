"""Bad records while training: a resume lists each skipped record once; on several processes the stop
decisions (on_bad_record=error, max_bad_fraction) rest on the count over all of them, so all stop together."""
import random

import pytest

from train import world
from train.loader import LoaderConfig
from train.validate import make_loader


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  root = tmp_path_factory.mktemp('bad')
  scenes, _ = world.make_world(root, 12, 0, seed=2, cfg=world.WorldConfig(size=56, grid=3, max_objects=2))
  return root, world.multitask_records(scenes, random.Random(0), other_tasks=1.0)


def _loader(tok, root, records, per_row=4, process_count=1, **kw):
  """With 4 samples per row of 64 tokens (one sample fits), 3 samples of each row are bad records."""
  cfg = LoaderConfig(batch_size=8, seq_buckets=(64,), target_step=8, max_images=1, image_size=28, seed=0,
                     window=2, samples_per_row=per_row, **kw)
  return make_loader(records, tok, 'multitask', 'official', cfg, root, 0, process_count)[0]


def test_a_resume_lists_skipped_records_once(tok, records, tmp_path):
  root, recs = records
  straight = _loader(tok, root, recs, on_bad_record='skip', max_bad_fraction=0.9)
  straight.skipped_file = tmp_path / 'straight.jsonl'
  for _ in zip(range(3), straight):
    pass
  stopped = _loader(tok, root, recs, on_bad_record='skip', max_bad_fraction=0.9)
  stopped.skipped_file = tmp_path / 'run.jsonl'
  it = iter(stopped)
  next(it)
  saved = stopped.state()  # the checkpoint after batch 0; batches 1 and 2 are read, then the run is killed
  next(it), next(it)
  it.close()
  resumed = _loader(tok, root, recs, on_bad_record='skip', max_bad_fraction=0.9)
  resumed.skipped_file = tmp_path / 'run.jsonl'
  resumed.restore(saved)
  for _ in zip(range(2), resumed):
    pass
  lines = (tmp_path / 'run.jsonl').read_text().splitlines()
  assert len(lines) == 18 and lines == (tmp_path / 'straight.jsonl').read_text().splitlines()
  assert resumed.state()['bad'] == straight.state()['bad'] == [0, 18]


def test_stop_decisions_count_every_process(tok, records):
  root, recs = records
  # This process's row holds 3 bad records per batch, the other process's as many: 6 over all.
  half = _loader(tok, root, recs, process_count=2, on_bad_record='skip')
  fraction = 4.5 / half.records_per_epoch  # allows this process's 3, not the pod's 6
  half = _loader(tok, root, recs, process_count=2, on_bad_record='skip', max_bad_fraction=fraction)
  half.gather = lambda n: 2 * n
  with pytest.raises(ValueError, match=r'6 bad records in epoch 0 .* over max_bad_fraction'):
    next(iter(half))
  # on_bad_record=error: clean rows here, one bad record elsewhere: this process stops as well.
  cfg = LoaderConfig(batch_size=8, seq_buckets=(64,), target_step=8, max_images=1, image_size=28, seed=0)
  clean = make_loader(recs, tok, 'multitask', 'official', cfg, root, 0, 2)[0]
  clean.gather = lambda n: n + 1
  assert clean.batch(0) is not None  # nothing bad in this process's rows
  with pytest.raises(ValueError, match=r'1 bad record\(s\) in batch 0 of other processes.*on_bad_record=error'):
    next(iter(clean))
