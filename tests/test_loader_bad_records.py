"""Bad records while training: a resume lists each skipped record once; on several processes every process
decides alike and all stop together, without a collective at every step: records found bad while a window
is built are counted by every process for the whole batch; images that fail, known to their process only,
are summed over the processes once a window."""
import json
import os
import pathlib
import random
import shutil
import sys
import threading

import pytest

from processes import free_port, run_workers, xla_flags
from train import world
from train.loader import LoaderConfig
from train.validate import make_loader


@pytest.fixture(scope='module')
def records(tmp_path_factory):
  root = tmp_path_factory.mktemp('bad')
  scenes, _ = world.make_world(root, 12, 0, seed=2, cfg=world.WorldConfig(size=56, grid=3, max_objects=2))
  return root, world.multitask_records(scenes, random.Random(0), other_tasks=1.0)


def _loader(tok, root, records, index=0, count=1, buckets=(44,), **kw):
  """With rows of 44 tokens and on_overlong=skip, the records over 44 tokens are bad records."""
  cfg = LoaderConfig(**{'batch_size': 8, 'seq_buckets': buckets, 'target_step': 8, 'max_images': 1,
                        'image_size': 28, 'seed': 0, 'window': 2, 'on_overlong': 'skip', **kw})
  return make_loader(records, tok, 'multitask', 'official', cfg, root, index, count)[0]


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
  assert len(lines) > 0 and lines == (tmp_path / 'straight.jsonl').read_text().splitlines()
  assert resumed.state()['bad'] == straight.state()['bad'] == [0, len(lines)]


def test_bad_records_of_a_window_stop_every_process_at_their_batch(tok, records):
  root, recs = records
  calls = []
  halves = [_loader(tok, root, recs, i, 2, on_bad_record='skip', max_bad_fraction=0.9) for i in range(2)]
  for h in halves:
    h.gather = lambda n: calls.append(n) or n
  skipped = [[h.last_skipped for _, _ in zip(range(6), h)] for h in halves]
  assert skipped[0] == skipped[1] and sum(skipped[0]) > 0  # the whole batch's, on each process
  assert len(calls) == 2 * 3  # image failures summed once a window of 2 batches, not every batch
  first = next(k for k, n in enumerate(skipped[0]) if n)
  stops = []
  for i in range(2):
    h = _loader(tok, root, recs, i, 2)  # on_bad_record=error
    h.gather = lambda n: pytest.fail('a collective before the stop')
    with pytest.raises(ValueError, match='on_bad_record=error'):
      for _ in h:
        pass
    stops.append(h.next_batch)
  assert stops == [first, first]
  # max_bad_fraction: every process counts the same, so all stop at the same batch.
  limit = (sum(skipped[0][:first + 1]) + 0.5) / halves[0].records_per_epoch
  stops = []
  for i in range(2):
    h = _loader(tok, root, recs, i, 2, on_bad_record='skip', max_bad_fraction=limit)
    h.gather = lambda n: n
    with pytest.raises(ValueError, match=r'bad records in epoch 0 .* over max_bad_fraction'):
      for _ in h:
        pass
    stops.append(h.next_batch)
  assert stops[0] == stops[1] > first


def _run(loader, out):
  try:
    for _ in loader:
      pass
  except ValueError as e:
    out.append((loader.next_batch, str(e)))


def test_image_failures_are_summed_once_a_window(tok, records, tmp_path):
  """An image that fails in one process's rows: that process goes on (the sample blanked) to the window's
  last batch, where the processes sum their counts (a collective: here two threads meeting at a barrier);
  both stop there, the owner naming the record. One process alone stops at the batch itself."""
  root, recs = records
  shutil.copytree(root, tmp_path / 'w')
  window = 4
  loaders = [_loader(tok, tmp_path / 'w', recs, i, 2, (256,), window=window) for i in range(2)]
  alone = _loader(tok, tmp_path / 'w', recs, buckets=(256,), window=window)
  (tmp_path / 'w' / '5.png').unlink()  # after the records were checked
  out = []
  _run(alone, out)
  failed_at, message = out[0]
  assert '5.png' in message
  stop = failed_at + (-(failed_at + 1)) % window  # the window's last batch
  assert stop > failed_at
  barrier, counts, calls = threading.Barrier(2, timeout=120), [0, 0], []

  def gather(i):
    def total(n):
      calls.append(i)
      counts[i] = n
      barrier.wait()
      s = sum(counts)
      barrier.wait()
      return s
    return total

  results = [[], []]
  threads = [threading.Thread(target=_run, args=(loaders[i], results[i])) for i in range(2)]
  for i in range(2):
    loaders[i].gather = gather(i)
    threads[i].start()
  for t in threads:
    t.join(300)
  assert [r[0][0] for r in results] == [stop, stop]
  messages = sorted(r[0][1] for r in results)
  assert '5.png' in messages[1] and 'other processes' in messages[0]
  assert len(calls) == 2 * (stop + 1) // window


def test_two_processes_stop_together_without_a_collective_each_step(tok, vocab_file, records, tmp_path):
  """As above with two real processes (jax.distributed on localhost): the counts are summed by a
  collective at the windows' last batches only, and both processes stop at the same batch."""
  root, recs = records
  shutil.copytree(root, tmp_path / 'w')
  (tmp_path / 'w' / 'records.json').write_text(json.dumps(recs))
  window, out = 4, []
  alone = _loader(tok, tmp_path / 'w', recs, buckets=(256,), window=window)
  (tmp_path / 'w' / '5.png').rename(tmp_path / '5.png')
  _run(alone, out)
  (tmp_path / '5.png').rename(tmp_path / 'w' / '5.png')
  stop = out[0][0] + (-(out[0][0] + 1)) % window
  tests = pathlib.Path(__file__).resolve().parent
  env = dict(os.environ, XLA_FLAGS=xla_flags(), JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(tests.parent), os.environ.get('PYTHONPATH', '')]))
  port = free_port()
  run_workers([[sys.executable, str(tests / 'loader_worker.py'), str(i), str(port), str(vocab_file),
                str(tmp_path / 'w'), str(window)] for i in range(2)], env, tmp_path, timeout=120)
  results = [json.loads((tmp_path / 'w' / f'stop-{i}.json').read_text()) for i in range(2)]
  assert [r['stop'] for r in results] == [stop, stop] and stop > out[0][0]
  assert [r['calls'] for r in results] == [list(range(window - 1, stop + 1, window))] * 2
  assert sorted('5.png' in r['message'] for r in results) == [False, True]
