"""Multi-host support: start-up arguments, per-process batch rows, and a real 2-process run on localhost."""
import argparse
import os
import pathlib
import sys
import time

import chex
import jax
import numpy as np
import pytest

from processes import free_port, run_workers, xla_flags
from qwenvl_jax import distributed
from qwenvl_jax import sharding as sh

TESTS = pathlib.Path(__file__).resolve().parent
ENV_VARS = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID)


@pytest.fixture
def no_dist_env(monkeypatch):
  for name in ENV_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: pytest.fail(f'initialize called: {kw}'))


def test_single_process_without_settings(no_dist_env):
  assert distributed.initialize() is False


def test_partial_settings_name_what_is_missing(no_dist_env, monkeypatch):
  with pytest.raises(ValueError, match=r"missing \['process_id'\]"):
    distributed.initialize('127.0.0.1:1234', 2)
  monkeypatch.setenv(distributed.ENV_COORDINATOR, '127.0.0.1:1234')
  with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
    distributed.initialize()
  with pytest.raises(ValueError, match=r'process_id must be in \[0, 2\)'):
    distributed.initialize(num_processes=2, process_id=2)
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, 'two')
  with pytest.raises(ValueError, match='JAX_NUM_PROCESSES'):
    distributed.initialize()


def test_settings_come_from_flags_then_environment(no_dist_env, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, 'update', lambda *a: calls.append(a))
  monkeypatch.setenv(distributed.ENV_COORDINATOR, '10.0.0.1:9999')
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, '4')
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, '3')
  parser = argparse.ArgumentParser()
  distributed.add_arguments(parser)
  assert distributed.initialize_from_args(parser.parse_args(['--process-id', '1']))
  assert calls[0] == ('jax_cpu_collectives_implementation', 'gloo')
  kw = calls[1]
  assert (kw['coordinator_address'], kw['num_processes'], kw['process_id']) == ('10.0.0.1:9999', 4, 1)


def test_auto_detection_leaves_the_settings_to_jax(no_dist_env, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, 'update', lambda *a: None)
  parser = argparse.ArgumentParser()
  distributed.add_arguments(parser)
  assert distributed.initialize_from_args(parser.parse_args(['--auto-distributed']))
  assert (calls[0]['coordinator_address'], calls[0]['num_processes'], calls[0]['process_id']) == (None,) * 3


def test_train_cli_refuses_partial_settings(no_dist_env, capsys):
  from train.cli import main
  assert main(['--config', 'stage2', '--coordinator', '127.0.0.1:1234', '--process-id', '0']) == 2
  assert "missing ['num_processes']" in capsys.readouterr().err


def test_log0_prints_on_process_zero_only(capsys, monkeypatch):
  distributed.log0('hello', 1)
  assert capsys.readouterr().out == 'hello 1\n'
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  distributed.log0('hidden')
  assert capsys.readouterr().out == ''


def test_single_process_owns_the_whole_batch():
  mesh = sh.make_mesh('data=1', devices=jax.devices()[:1])
  sharding = sh.batch_sharding(mesh, 'fsdp', (6, 5))
  assert distributed.process_batch_slice(sharding, (6, 5)) == slice(0, 6)
  rows = np.arange(30).reshape(6, 5)
  got = distributed.global_batch(mesh, 'fsdp', {'ids': rows}, {'ids': 6})
  np.testing.assert_array_equal(got['ids'], rows)
  with pytest.raises(ValueError, match='must pass rows 0:8'):
    distributed.host_to_global(rows, sh.batch_sharding(mesh, 'fsdp', (8, 5)), 8)


def _reference(golden_dir, golden):
  """One sharded train step on a single device, with the helpers the workers use."""
  sys.path.insert(0, str(TESTS))
  import sharded_checks as sc
  model, host_params = sc.load_tiny(golden_dir)
  mesh = sh.make_mesh('data=1', devices=jax.devices()[:1])
  params = sh.shard_params(mesh, host_params, 'fsdp')
  batch = sc.golden_batch(golden)
  step, opt_state = sc.jit_train_step(model, sc.make_optimizer(), mesh, 'fsdp', params, batch)
  params, _, loss = step(params, opt_state, sh.shard_batch(mesh, 'fsdp', batch))
  flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  return float(loss), flat


@pytest.mark.slow
def test_two_processes_train_and_checkpoint(golden_dir, golden, tmp_path):
  """2 processes x 4 CPU devices (gloo): a 2x2x2 train step and Orbax round trip equal one device."""
  env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
  env.update(XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=4'), JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(TESTS.parent), env.get('PYTHONPATH', '')]))
  port = free_port()
  start = time.time()
  run_workers([[sys.executable, str(TESTS / 'dist_worker.py'), str(i), '2', str(port), str(golden_dir),
                str(tmp_path)] for i in range(2)], env, tmp_path)
  print(f'two-process run: {time.time() - start:.1f}s')

  result = dict(np.load(tmp_path / 'result.npz'))
  assert int(result.pop('process_count')) == 2 and int(result.pop('device_count')) == 8
  np.testing.assert_array_equal(result.pop('rows'), [0, 4])  # process 0 loaded only the first half
  assert bool(result.pop('restored_equal')) and bool(result.pop('restored_shardings'))
  loss = float(result.pop('loss'))
  ref_loss, ref_params = _reference(golden_dir, golden)
  np.testing.assert_allclose(loss, ref_loss, atol=1e-5)
  np.testing.assert_allclose(loss, golden['train.loss'], atol=1e-5)
  chex.assert_trees_all_close(result, ref_params, atol=2e-5, rtol=2e-5)
