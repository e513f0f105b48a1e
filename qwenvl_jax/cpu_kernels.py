"""Decode attention and int8-weight products as XLA FFI kernels on the CPU backend (`cpu_kernels.cc`), built
on first use.

At a decode step XLA's CPU backend computes each (row, head)'s one-query attention as a separate small
dot, a fifth of a batch-8 step on the bench dims; the kernel streams the cache once per (row, head) on
XLA's intra-op threads and reads only the slots a row may attend to. Other backends, and the CPU when the
kernel is off or cannot be built, use the same math in XLA (`kernel_math.attend`). `qmatmul_einsum` multiplies
a few rows by a weight-only quantized kernel reading its int8 values (XLA's CPU dot would first convert
the whole kernel to float).

The library is compiled with the system C++ compiler (`$CXX`, else c++, g++ or clang++) against the
installed jaxlib's FFI headers, into a cache directory (`$QWENVL_JAX_KERNEL_CACHE`, default
~/.cache/qwenvl_jax/kernels) under a name that hashes the source, jaxlib's version, the flags and the
machine's CPU, and is written to a temporary name first, so an interrupted build never leaves a library
half-written. If no compiler works, a warning says why and generation runs on XLA alone.
`QWENVL_JAX_CPU_KERNELS=0` turns the kernel off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.kernel_math import PACKED, attend, dequantize
from qwenvl_jax.logical import rules_active

Array = jax.Array

SOURCE = pathlib.Path(__file__).with_name('cpu_kernels.cc')
ATTEND_TARGET = 'qwenvl_attend_one'
QMATMUL_TARGET = 'qwenvl_qmatmul'
QMATMUL4_TARGET = 'qwenvl_qmatmul4'  # int4 two per byte (kernel_math.pack_int4)
# -ffast-math lets the compiler vectorise the float reductions; the code never relies on inf or NaN.
FLAGS = ('-std=c++17', '-O3', '-march=native', '-ffast-math', '-fPIC', '-shared', '-w')


def enabled() -> bool:
  return os.environ.get('QWENVL_JAX_CPU_KERNELS', '1').strip().lower() not in ('0', 'false', 'no', 'off')


def _compiler() -> str | None:
  for name in (os.environ.get('CXX'), 'c++', 'g++', 'clang++'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_id() -> str:
  """What -march=native compiles for: the CPU's model and feature flags, where the system says."""
  try:
    info = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
    return '\n'.join(sorted({line for line in info if line.startswith(('model name', 'flags', 'Features'))}))
  except OSError:
    return platform.processor() or platform.machine()


def cache_dir() -> pathlib.Path:
  default = pathlib.Path.home() / '.cache' / 'qwenvl_jax' / 'kernels'
  return pathlib.Path(os.environ.get('QWENVL_JAX_KERNEL_CACHE') or default)


def build(compiler: str, out_dir: pathlib.Path) -> pathlib.Path:
  """The compiled library in out_dir, compiled unless a library of the same key is there already."""
  import jaxlib
  include = jax.ffi.include_dir()
  key = hashlib.sha256('\0'.join([SOURCE.read_text(), jaxlib.__version__, compiler, *FLAGS,
                                  _cpu_id()]).encode()).hexdigest()[:16]
  target = out_dir / f'qwenvl_cpu_kernels-{key}.so'
  if target.exists():
    return target
  out_dir.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=target.name + '.', suffix='.tmp', dir=out_dir)
  os.close(fd)
  try:
    result = subprocess.run([compiler, *FLAGS, f'-I{include}', str(SOURCE), '-o', tmp],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
      raise RuntimeError(f'{compiler} failed ({result.returncode}): {result.stderr.strip()[-2000:]}')
    os.replace(tmp, target)  # atomic: readers see the whole library or none
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target


@functools.lru_cache(maxsize=None)
def _registered() -> bool:
  """Builds, loads and registers the kernel once per process; False (after a warning) if it cannot."""
  if not hasattr(jax, 'ffi'):
    return False
  compiler = _compiler()
  if compiler is None:
    warnings.warn('qwenvl_jax: no C++ compiler found (set $CXX); CPU decode attention runs on XLA alone, '
                  'slower at larger batches', RuntimeWarning, stacklevel=3)
    return False
  try:
    library = ctypes.CDLL(str(build(compiler, cache_dir())))
    jax.ffi.register_ffi_target(ATTEND_TARGET, jax.ffi.pycapsule(library.QwenvlAttendOne), platform='cpu')
    jax.ffi.register_ffi_target(QMATMUL_TARGET, jax.ffi.pycapsule(library.QwenvlQMatmul), platform='cpu')
    jax.ffi.register_ffi_target(QMATMUL4_TARGET, jax.ffi.pycapsule(library.QwenvlQMatmul4), platform='cpu')
  except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
    warnings.warn(f'qwenvl_jax: CPU decode kernel unavailable ({e}); running on XLA alone',
                  RuntimeWarning, stacklevel=3)
    return False
  return True


def available() -> bool:
  """Whether attend_one uses the kernel: on when the default backend is the CPU (a GPU or TPU process
  neither builds it nor warns about a missing compiler); built on the first call."""
  return enabled() and jax.default_backend() == 'cpu' and _registered()


def _xla_attend_one(q: Array, k: Array, v: Array, valid: Array) -> Array:
  keys, values = (jnp.einsum('bhds->bshd', c[:q.shape[0]]) for c in (k, v))
  return attend(q[:, None], keys, values, valid[:, None], q.dtype)[:, 0]


def attend_one(q: Array, k: Array, v: Array, valid: Array) -> Array:
  """Softmax attention of one query per (row, head), float32: q [b, h, d], k and v [b', h, d, s] (slots
  last; b' >= b, the first b rows attended over, with no copy of them), valid [b, s] -> [b, h, d]:
  `kernel_math.attend`, up to float rounding on the CPU."""
  if not available() or not all(x.dtype == jnp.float32 for x in (q, k, v)):
    return _xla_attend_one(q, k, v, valid)
  scale = np.float32(1.0 / np.sqrt(q.shape[-1]))

  def kernel(q, k, v, valid):
    return jax.ffi.ffi_call(ATTEND_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, k, v, valid.astype(bool), scale=scale)
  return jax.lax.platform_dependent(q, k, v, valid, cpu=kernel, default=_xla_attend_one)


# Rows of x up to which `qmatmul_einsum` takes the kernel: decode steps. Past it (prefill) the product is
# compute-bound and XLA's dot over the dequantized kernel is the faster.
QMATMUL_MAX_ROWS = 16


def qmatmul_einsum(eqn: str, x: Array, q: Array, scale: Array) -> Array | None:
  """jnp.einsum(eqn, x, w) in float32 for w = `kernel_math.dequantize`(q, scale) with q weight-major (the dims
  kept in the output first, the contracted ones last), through the kernel; None where the kernel does not
  apply (another backend's process, the kernel off, sharding rules active, more than QMATMUL_MAX_ROWS rows
  of x) and the caller's XLA path runs instead."""
  x_dims, rest = eqn.split(',')
  q_dims, out = rest.split('->')
  contracted = ''.join(c for c in q_dims if c not in out)
  kept = q_dims[:len(q_dims) - len(contracted)]
  batch = ''.join(c for c in x_dims if c not in contracted)
  rows = int(np.prod([x.shape[x_dims.index(c)] for c in batch]))
  if kept + contracted != q_dims or rows > QMATMUL_MAX_ROWS or rules_active() or not available():
    return None
  packed = q.dtype == PACKED  # int4 two per byte along the last (contracted) dim: a row is whole bytes
  n_in = int(np.prod(q.shape[len(kept):])) * (2 if packed else 1)
  n_out = int(np.prod(q.shape[:len(kept)]))
  xs = jnp.einsum(f'{x_dims}->{batch}{contracted}', x).astype(jnp.float32).reshape(rows, n_in)
  q2, s2 = q.reshape(n_out, -1), scale.astype(jnp.float32).reshape(scale.shape[0], n_out)
  target = QMATMUL4_TARGET if packed else QMATMUL_TARGET

  def kernel(xs, q2, s2):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, n_out), jnp.float32))(xs, q2, s2)

  def xla(xs, q2, s2):
    return jnp.einsum('ni,oi->no', xs, dequantize(q2, s2, 'oi', 'o', jnp.float32))
  y = jax.lax.platform_dependent(xs, q2, s2, cpu=kernel, default=xla)
  y = y.reshape(tuple(x.shape[x_dims.index(c)] for c in batch) + q.shape[:len(kept)])
  return jnp.einsum(f'{batch}{kept}->{out}', y)
