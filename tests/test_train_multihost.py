"""`qwenvl-train` on two hosts (two processes on localhost, one CPU device each, `--mesh fsdp=2`): each
process holds about half the train state, and the run's losses are those of one process on one device."""
import json
import os
import pathlib
import sys

import numpy as np
import pytest

from processes import free_port, run_measured, xla_flags
from qwenvl_jax.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from test_train_resume import MODEL, setup  # noqa: F401 (fixture)
from train.run_dir import METRICS_FILE

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A train state of ~1.8 GB (16 bytes a parameter: float32 weights, two AdamW moments and the gradients) in
# 12 wide MLP layers, so that it outweighs the runtime and what FSDP gathers whole for a moment (one
# layer's weights, the head and embedding at the narrow width 128); tiny images and ViT keep steps short.
D, F, LAYERS = 128, 16384, 12
BIG = {**MODEL, 'hidden_size': D, 'intermediate_size': 2 * F, 'num_hidden_layers': LAYERS}  # w1, w2: F each
PARAMS = 2 * 151936 * D + LAYERS * (3 * D * F + 4 * D * D)  # the ViT and resampler: under 1%


def _losses(out_dir: pathlib.Path) -> list[float]:
  return [json.loads(line)['loss'] for line in (out_dir / METRICS_FILE).read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_each_hold_half_the_state(setup, tmp_path):
  root, cfg = setup
  (tmp_path / 'model.json').write_text(json.dumps(BIG))
  config = tmp_path / 'train.json'
  # float32 compute: bfloat16 roundings would differ with XLA's fusion choices, which differ between the
  # one-device and the sharded program, and hide the reduction order being the only difference. One row
  # per process and no accumulation: the state's memory is the point, and the time is the steps' compute.
  config.write_text(json.dumps({**cfg.to_dict(), 'model_config': str(tmp_path / 'model.json'), 'steps': 2,
                                'save_every': 2, 'log_every': 1, 'dtype': 'float32', 'batch_size': 2,
                                'grad_accum': 1}))
  env = {k: v for k, v in os.environ.items() if k not in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(), PYTHONPATH=os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')]))

  def train(out, *flags):
    return [sys.executable, '-m', 'train.cli', '--config', str(config), '--no-progress', *flags,
            f'out_dir={tmp_path / out}']  # an override after the flags, as users type them

  (tmp_path / 'one').mkdir()
  [(_, one)] = run_measured([train('one')], env, tmp_path / 'one')
  port = free_port()
  (tmp_path / 'logs').mkdir()
  two = run_measured([train('two', '--mesh', 'fsdp=2', '--coordinator', f'127.0.0.1:{port}',
                           '--num-processes', '2', '--process-id', str(i)) for i in range(2)],
                     env, tmp_path / 'logs')
  peaks = [peak for _, peak in two]
  gb = 1 << 30
  print(f'state {16 * PARAMS / gb:.2f} GB; peak resident: one process {one / gb:.2f} GB, '
        f'two processes {peaks[0] / gb:.2f} + {peaks[1] / gb:.2f} GB ({max(peaks) / one:.2f}x)')
  assert max(peaks) < 0.7 * one, (one, peaks)
  assert one > 16 * PARAMS  # the single process really held the whole state

  single, sharded = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  assert len(single) == len(sharded) == 2  # one metrics file, written by process 0 alone
  print(f'losses: one process {single}, two processes {sharded}')
  np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=0)
  assert 'loss' in two[0][0] and 'loss' not in two[1][0]  # the result line printed once
