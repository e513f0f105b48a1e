"""Worker processes of the multi-process tests (jax.distributed on localhost)."""
import os
import pathlib
import socket
import subprocess
import time

import pytest


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_workers(commands: list[list[str]], env: dict, log_dir: pathlib.Path, timeout: float = 400) -> list[str]:
  """Runs the commands side by side and returns each one's output; fails the test, with the end of every
  log, unless all exit 0. Workers still running at the end are killed."""
  return [output for output, _ in run_measured(commands, env, log_dir, timeout)]


def run_measured(commands: list[list[str]], env: dict, log_dir: pathlib.Path, timeout: float = 400
                 ) -> list[tuple[str, int]]:
  """As `run_workers`, returning each command's (output, peak resident bytes): the kernel's high-water
  mark of that process alone (ru_maxrss from wait4, not the sum or maximum over every child)."""
  paths = [log_dir / f'worker{i}.log' for i in range(len(commands))]
  logs = [open(path, 'w') for path in paths]
  procs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) for cmd, log in zip(commands, logs)]
  codes: dict[int, int] = {}
  peaks: dict[int, int] = {}
  deadline = time.monotonic() + timeout
  try:
    # Until all end, one fails (the others would wait for it forever) or time runs out.
    while len(codes) < len(procs) and not any(codes.values()) and time.monotonic() < deadline:
      for p in procs:
        if p.pid not in codes:
          pid, status, usage = os.wait4(p.pid, os.WNOHANG)
          if pid:
            codes[pid] = p.returncode = os.waitstatus_to_exitcode(status)
            peaks[pid] = usage.ru_maxrss * 1024  # kilobytes on Linux
      time.sleep(0.05)
  finally:
    for p in procs:
      if p.pid not in codes:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  outputs = [path.read_text() for path in paths]
  if [codes.get(p.pid) for p in procs] != [0] * len(commands):
    pytest.fail(f'worker exit codes {[codes.get(p.pid) for p in procs]}:\n'
                + '\n'.join(out[-3000:] for out in outputs))
  return [(out, peaks[p.pid]) for out, p in zip(outputs, procs)]
