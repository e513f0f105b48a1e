"""Shared fixtures: the reference data in ../shared (or $QWENVL_SHARED_DIR).

Outside CI a missing ../shared skips the tests that need it, with the reason; in CI (CI=true) it fails them.
"""
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import pytest

from processes import FAST_CODEGEN

# Most of the suite's time is XLA compiling small programs, and the CPU backend's code generation is most of
# each compile while buying nothing on tiny models (processes.FAST_CODEGEN; no buffer changes). Set before
# any backend starts; worker processes and subprocesses inherit it.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_CODEGEN}".strip()

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("QWENVL_SHARED_DIR", ROOT.parent / "shared"))


def _require(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    msg = f"reference data not found at {path} (set QWENVL_SHARED_DIR to the shared/ folder)"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return path


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  return _require(SHARED)


@pytest.fixture(scope="session")
def golden_dir(shared_dir) -> pathlib.Path:
  return _require(shared_dir / "golden")


@pytest.fixture(scope="session")
def golden(golden_dir) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(str(golden_dir / "golden.safetensors"))


@pytest.fixture(scope="session")
def vocab_file(shared_dir) -> pathlib.Path:
  return _require(shared_dir / "qwen.tiktoken")


SHORT_SPAN = 16  # image span of the data tests' tokenizer (and their tiny models' n_queries)


@pytest.fixture(scope="session")
def tok(vocab_file):
  """The real vocabulary with short image spans, for data tests."""
  from qwenvl_jax.tokenizer import QwenVLTokenizer
  return QwenVLTokenizer(vocab_file, image_span_length=SHORT_SPAN)


@pytest.fixture
def compiles():
  """Names of the functions XLA compiles while the test runs, starting from empty caches (the persistent
  cache off, so that every program counted is compiled)."""
  jax.clear_caches()
  jax.config.update('jax_enable_compilation_cache', False)
  names = []

  def listen(event, duration, **kw):
    if event == '/jax/core/compile/backend_compile_duration':
      names.append(kw.get('fun_name', '?'))

  jax.monitoring.register_event_duration_secs_listener(listen)
  yield names
  jax.monitoring.unregister_event_duration_listener(listen)
  jax.config.update('jax_enable_compilation_cache', True)


_OWN_CACHE = []  # the cache directory this process made (and removes at the end)


def pytest_configure(config):
  """One persistent XLA compilation cache for the session, its worker processes and subprocesses, made
  fresh for each session: many tests compile the same small programs (a train step per run of the CLI,
  the tiny model's forward)."""
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _OWN_CACHE.append(tempfile.mkdtemp(prefix='qwenvl-jax-test-xla-cache-'))
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_CACHE[0]
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))


def pytest_unconfigure(config):
  for path in _OWN_CACHE:
    shutil.rmtree(path, ignore_errors=True)
