"""`qwenvl-eval run` on two processes (jax.distributed on localhost, CPU): each takes its slice, process 0
merges; the files equal a one-process run's."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from processes import free_port, run_workers, xla_flags
from test_eval_run import GQA, _files, _jsonl, _run, loaded, world  # noqa: F401,F811 (fixtures shared)

TESTS = pathlib.Path(__file__).resolve().parent
ENV_VARS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


@pytest.mark.slow  # two fresh processes load and compile (~60 s on 2 busy cores)
def test_two_processes_write_what_one_writes(world, loaded, vocab_file, tmp_path):
  _jsonl(world / 'gqa5.jsonl', GQA + [{**g, 'question_id': 200 + i} for i, g in enumerate(GQA[:2])])
  single = _run(loaded, world, 'gqa_testdev', 'gqa5.jsonl', 'gqa5_one')
  env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([str(TESTS.parent), env.get('PYTHONPATH', '')]))
  port = free_port()
  out = world / 'gqa5_two'
  common = ['run', 'gqa_testdev', '--ckpt', str(world / 'ckpt'), '--vocab', str(vocab_file),
            '--data', str(world / 'gqa5.jsonl'), '--image-root', str(world / 'img'), '--out', str(out),
            '--no-progress', '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2']
  outputs = run_workers([[sys.executable, '-m', 'qwenvl_eval', *common, '--process-id', str(i)]
                         for i in range(2)], env, tmp_path)
  printed = outputs[0].strip().splitlines()[-1]
  assert json.loads(printed) == {k: single[k] for k in ('task', 'metric', 'score', 'count')}
  assert '"task"' not in outputs[1]  # process 0 alone reports
  assert _files(world, 'gqa5_two') == _files(world, 'gqa5_one')
  assert sorted(p.name for p in out.iterdir()) == ['metrics.json', 'predictions.json', 'predictions.jsonl',
                                                    'run.json']


@pytest.mark.slow  # a fresh process with 2 CPU devices loads and compiles (~40 s on 2 busy cores)
def test_mesh_over_local_devices_writes_what_one_device_writes(world, loaded, vocab_file, tmp_path):
  _jsonl(world / 'gqa5.jsonl', GQA + [{**g, 'question_id': 200 + i} for i, g in enumerate(GQA[:2])])
  single = _run(loaded, world, 'gqa_testdev', 'gqa5.jsonl', 'gqa5_one')
  env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=2'),
             PYTHONPATH=os.pathsep.join([str(TESTS.parent), env.get('PYTHONPATH', '')]))
  done = subprocess.run([sys.executable, '-m', 'qwenvl_eval', 'run', 'gqa_testdev', '--ckpt', str(world / 'ckpt'),
                         '--vocab', str(vocab_file), '--data', str(world / 'gqa5.jsonl'), '--image-root',
                         str(world / 'img'), '--out', str(world / 'gqa5_mesh'), '--no-progress',
                         '--mesh', 'tensor=2', '--batch', '2'],
                        env=env, capture_output=True, text=True, timeout=400)
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads(done.stdout) == {k: single[k] for k in ('task', 'metric', 'score', 'count')}
  assert _files(world, 'gqa5_mesh') == _files(world, 'gqa5_one')
