"""Multi-host runs: `jax.distributed` start-up, per-process batch loading and process-0 logging.

Every process runs the same program (multi-controller JAX). Each one:
  1. calls `initialize()` before touching any device: from flags, the JAX_COORDINATOR_ADDRESS /
     JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables, or the cluster's own detection
     (TPU pods, SLURM, ...) with `auto=True`;
  2. builds the same global mesh (`sharding.make_mesh` over `jax.devices()`, every process's devices);
  3. loads only the rows of the global batch that its own devices hold (`process_batch_slice`) and
     assembles the global array with `host_to_global`.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from qwenvl_jax.sharding import batch_sharding

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """--coordinator, --num-processes, --process-id (each defaults to its environment variable) and
  --auto-distributed (the cluster's own detection)."""
  parser.add_argument('--coordinator', default=None,
                      help=f'host:port of process 0 for jax.distributed (default: ${ENV_COORDINATOR})')
  parser.add_argument('--num-processes', type=int, default=None,
                      help=f'number of processes (default: ${ENV_NUM_PROCESSES})')
  parser.add_argument('--process-id', type=int, default=None,
                      help=f'this process, 0..num_processes-1 (default: ${ENV_PROCESS_ID})')
  parser.add_argument('--auto-distributed', action='store_true',
                      help='start jax.distributed from the cluster itself (Cloud TPU pod slices, SLURM, '
                           'Open MPI): run the same command on every host, no other flag needed')


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'${name}={value!r} is not an integer') from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
               auto: bool = False, timeout_s: int = 300) -> bool:
  """Starts `jax.distributed` when a multi-process run is asked for; returns whether it did.

  Arguments win over the environment. With none given and `auto`, JAX's cluster detection fills them
  in (Cloud TPU pods, SLURM, Open MPI, ...). With none given otherwise, this is a single-process run and
  nothing happens. CPU devices exchange data through gloo collectives.
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  given = {'coordinator': coordinator, 'num_processes': num_processes, 'process_id': process_id}
  if all(v is None for v in given.values()):
    if not auto:
      return False
  elif not auto and None in given.values():
    missing = [k for k, v in given.items() if v is None]
    raise ValueError(f'multi-process run needs coordinator, num_processes and process_id; missing {missing} '
                     f'(flags --coordinator/--num-processes/--process-id or ${ENV_COORDINATOR}, '
                     f'${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID})')
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'process_id must be in [0, {num_processes}), got {process_id}')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=timeout_s)
  return True


def initialize_from_args(args: argparse.Namespace, auto: bool = False) -> bool:
  return initialize(args.coordinator, args.num_processes, args.process_id,
                    auto=auto or getattr(args, 'auto_distributed', False))


def is_main() -> bool:
  return jax.process_index() == 0


def log0(*args: Any, **kwargs: Any) -> None:
  """print() on process 0 only, so a pod's log holds each line once."""
  if is_main():
    print(*args, **kwargs, flush=True)


def process_batch_slice(sharding: NamedSharding, global_shape: Sequence[int]) -> slice:
  """The rows of the global batch (leading dimension) that this process's devices hold.

  Rows are contiguous per process for `sharding.make_mesh` meshes; anything else is refused rather than
  silently loading the wrong rows.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    start, stop, _ = index[0].indices(global_shape[0])
    rows.update(range(start, stop))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f'process {jax.process_index()} holds non-contiguous batch rows {sorted(rows)} under '
                     f'{sharding.spec}; build the mesh with sharding.make_mesh')
  return slice(lo, hi)


def host_to_global(local: np.ndarray, sharding: NamedSharding, global_rows: int) -> jax.Array:
  """This process's rows (from `process_batch_slice`) -> one global jax.Array of `global_rows` rows."""
  global_shape = (global_rows,) + tuple(np.shape(local)[1:])
  want = process_batch_slice(sharding, global_shape)
  if np.shape(local)[0] != want.stop - want.start:
    raise ValueError(f'process {jax.process_index()} must pass rows {want.start}:{want.stop} of the global '
                     f'batch ({want.stop - want.start} rows), got {np.shape(local)[0]}')
  return jax.make_array_from_process_local_data(sharding, np.asarray(local), global_shape)


def global_batch(mesh, rules, local: Mapping[str, np.ndarray], global_rows: Mapping[str, int]) -> dict:
  """A dict of per-process row slices -> global arrays split along the batch axes.

  `global_rows` gives each entry's global leading size (images and text rows may differ).
  """
  out = {}
  for name, x in local.items():
    shape = (global_rows[name],) + tuple(np.shape(x)[1:])
    out[name] = host_to_global(x, batch_sharding(mesh, rules, shape), global_rows[name])
  return out
