"""One process of the two-process test in tests/test_distributed.py:

  python tests/dist_worker.py PROCESS_ID NUM_PROCESSES PORT GOLDEN_DIR OUT_DIR

Each process sees 4 CPU devices (the test sets XLA_FLAGS); the 2x2x2 mesh (data x fsdp x tensor, 'fsdp_tp'
rules) spans both processes. The process loads only its own rows of the global batch, runs one sharded
train step, saves the train state with Orbax and restores it onto the same shardings. Process 0 writes
the loss, the updated params (gathered) and the restore check to OUT_DIR/result.npz.
"""
from __future__ import annotations

import pathlib
import sys

MESH, RULES = '2x2x2', 'fsdp_tp'


def main(process_id: str, num_processes: str, port: str, golden_dir: str, out_dir: str) -> int:
  from qwenvl_jax import distributed
  distributed.initialize(f'127.0.0.1:{port}', int(num_processes), int(process_id), timeout_s=120)

  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils
  from safetensors.numpy import load_file

  import sharded_checks as sc
  from qwenvl_jax import sharding as sh

  golden_dir, out_dir = pathlib.Path(golden_dir), pathlib.Path(out_dir)
  mesh = sh.make_mesh(MESH)
  model, host_params = sc.load_tiny(golden_dir)
  params = sh.shard_params(mesh, host_params, RULES)
  full = sc.golden_batch(load_file(str(golden_dir / 'golden.safetensors')))
  ids_sharding = sh.batch_sharding(mesh, RULES, full['input_ids'].shape)
  rows = distributed.process_batch_slice(ids_sharding, full['input_ids'].shape)
  # Stands in for a loader that reads only these rows (one image per row, so images follow rows).
  local = {name: x[rows] for name, x in full.items()}
  batch = distributed.global_batch(mesh, RULES, local, {name: len(x) for name, x in full.items()})

  step, opt_state = sc.jit_train_step(model, sc.make_optimizer(), mesh, RULES, params, batch)
  params, opt_state, loss = step(params, opt_state, batch)
  state = {'params': params, 'opt_state': opt_state}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out_dir / 'state', state)
  ckptr.wait_until_finished()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = ckptr.restore(out_dir / 'state', target)
  equal = jax.jit(lambda a, b: jax.tree.reduce(lambda acc, eq: acc & eq,
                                               jax.tree.map(lambda x, y: (x == y).all(), a, b)))
  same_values = bool(equal(restored, state))
  same_shardings = all(jax.tree.leaves(jax.tree.map(lambda r, s: r.sharding == s.sharding, restored, state)))
  gathered = multihost_utils.process_allgather(params, tiled=True)
  distributed.log0(f'processes={jax.process_count()} devices={jax.device_count()} rows={rows} '
                   f'loss={float(loss):.6f} restored_equal={same_values}')
  if distributed.is_main():
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(gathered)[0]}
    np.savez(out_dir / 'result.npz', loss=np.asarray(loss), restored_equal=same_values,
             restored_shardings=same_shardings, process_count=jax.process_count(),
             device_count=jax.device_count(), rows=np.array([rows.start, rows.stop]), **flat)
  multihost_utils.sync_global_devices('done')  # process 0 keeps the coordinator up until both finish
  return 0


if __name__ == '__main__':
  sys.exit(main(*sys.argv[1:]))
