"""Worker processes of the multi-process tests (jax.distributed on localhost)."""
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

# XLA's CPU code generated without LLVM's expensive optimisations (the tests' programs compile in about 60%
# of the CPU time) and by the elemental emitters instead of the MLIR fusion emitters, which spend most of a
# compile lowering the fusions of these small programs (the tiny model's train step: 13 s -> 2.3 s), with
# the same buffers and the same results (the conftest sets it for the session).
FAST_CODEGEN = ('--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0 '
                '--xla_cpu_use_fusion_emitters=false')


def xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a test's subprocess: the suite's fast code generation plus `flags`."""
  return ' '.join((FAST_CODEGEN,) + flags)


def pytest_on_two_devices(test_file: str, tmp_path: pathlib.Path) -> None:
  """Runs `test_file`'s tests in a pytest process with 2 simulated CPU devices (its two-device tests run
  there; its others skip there) and asserts they passed."""
  tests = pathlib.Path(__file__).resolve().parent
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=2'), JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(tests.parent), os.environ.get('PYTHONPATH', '')]))
  result = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider',
                           '--basetemp', str(tmp_path), test_file], env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
  assert ' passed' in result.stdout and ' failed' not in result.stdout, result.stdout[-2000:]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_workers(commands: list[list[str]], env: dict, log_dir: pathlib.Path, timeout: float = 400) -> list[str]:
  """Runs the commands side by side and returns each one's output; fails the test, with the end of every
  log, unless all exit 0. Workers still running at the end are killed."""
  return [output for output, _ in run_measured(commands, env, log_dir, timeout)]


# The start of a child script that measures its own resident peak: `hwm()` is its VmHWM in bytes so far,
# read after JAX's backend has started (what every load pays before reading anything).
HWM_PREAMBLE = '''
import json, pathlib, sys
import jax
def hwm():
  return next(int(l.split()[1]) * 1024 for l in pathlib.Path('/proc/self/status').read_text().splitlines()
              if l.startswith('VmHWM:'))
jax.numpy.zeros(1).block_until_ready()
'''


def _high_water(pid: int) -> int:
  """Peak resident bytes of a running process so far; 0 once it has exited."""
  try:
    for line in pathlib.Path(f'/proc/{pid}/status').read_text().splitlines():
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024  # kB
  except OSError:
    pass
  return 0


def run_measured(commands: list[list[str]], env: dict, log_dir: pathlib.Path, timeout: float = 400
                 ) -> list[tuple[str, int]]:
  """As `run_workers`, returning each command's (output, peak resident bytes): the kernel's high-water
  mark of that process's own memory (VmHWM in /proc/PID/status, polled while it runs). Not wait4's
  ru_maxrss: Linux carries the parent's high-water mark across fork and exec into it, so a child of a
  big pytest worker would report at least the worker's size."""
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
          peaks[p.pid] = max(peaks.get(p.pid, 0), _high_water(p.pid))
          pid, status = os.waitpid(p.pid, os.WNOHANG)
          if pid:
            codes[pid] = p.returncode = os.waitstatus_to_exitcode(status)
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
