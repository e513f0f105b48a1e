"""Shared fixtures: the reference data in ../shared (or $QWENVL_SHARED_DIR).

Outside CI a missing ../shared skips the tests that need it, with the reason; in CI (CI=true) it fails them.
"""
import os
import pathlib

import jax
import numpy as np
import pytest

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


@pytest.fixture
def compiles():
  """Names of the functions XLA compiles while the test runs, starting from empty caches."""
  jax.clear_caches()
  names = []

  def listen(event, duration, **kw):
    if event == '/jax/core/compile/backend_compile_duration':
      names.append(kw.get('fun_name', '?'))

  jax.monitoring.register_event_duration_secs_listener(listen)
  yield names
  jax.monitoring.unregister_event_duration_listener(listen)
