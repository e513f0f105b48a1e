"""One process of the two-process loader test in tests/test_loader_bad_records.py:

  python tests/loader_worker.py PROCESS_ID PORT VOCAB DATA_DIR WINDOW

Both processes read DATA_DIR/records.json (multitask records, images beside it) with on_bad_record=error;
after both have checked the records, process 0 removes 5.png. Each process iterates until the loader stops
it and writes DATA_DIR/stop-PROCESS_ID.json: the batch it stopped before, the message, its collectives.
"""
from __future__ import annotations

import json
import pathlib
import sys


def main(process_id: str, port: str, vocab: str, data_dir: str, window: str) -> int:
  from qwenvl_jax import distributed
  distributed.initialize(f'127.0.0.1:{port}', 2, int(process_id), timeout_s=120)

  import jax
  from jax.experimental import multihost_utils

  from qwenvl_jax.tokenizer import QwenVLTokenizer
  from train.loader import LoaderConfig, sum_over_processes
  from train.validate import make_loader

  data = pathlib.Path(data_dir)
  tok = QwenVLTokenizer(vocab, image_span_length=16)
  cfg = LoaderConfig(batch_size=8, seq_buckets=(256,), target_step=8, max_images=1, image_size=28, seed=0,
                     window=int(window))
  records = json.loads((data / 'records.json').read_text())
  loader = make_loader(records, tok, 'multitask', 'official', cfg, data, jax.process_index(), 2)[0]
  multihost_utils.sync_global_devices('checked')
  if jax.process_index() == 0:
    (data / '5.png').unlink()
  multihost_utils.sync_global_devices('removed')
  calls = []
  loader.gather = lambda n: calls.append(loader.next_batch) or sum_over_processes(n)
  stop, message = None, ''
  try:
    for _ in loader:
      pass
  except ValueError as e:
    stop, message = loader.next_batch, str(e)
  (data / f'stop-{process_id}.json').write_text(json.dumps({'stop': stop, 'message': message, 'calls': calls}))
  multihost_utils.sync_global_devices('done')  # process 0 keeps the coordinator up until both finish
  return 0


if __name__ == '__main__':
  sys.exit(main(*sys.argv[1:]))
