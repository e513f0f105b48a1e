"""Worker processes of the multi-process tests (jax.distributed on localhost)."""
import pathlib
import socket
import subprocess

import pytest


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_workers(commands: list[list[str]], env: dict, log_dir: pathlib.Path, timeout: float = 400) -> list[str]:
  """Runs the commands side by side and returns each one's output; fails the test, with the end of every
  log, unless all exit 0. Workers still running at the end are killed."""
  paths = [log_dir / f'worker{i}.log' for i in range(len(commands))]
  logs = [open(path, 'w') for path in paths]
  procs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) for cmd, log in zip(commands, logs)]
  try:
    codes = [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  outputs = [path.read_text() for path in paths]
  if codes != [0] * len(commands):
    pytest.fail(f'worker exit codes {codes}:\n' + '\n'.join(out[-3000:] for out in outputs))
  return outputs
