"""A Q-LoRA run saved before int4 values were packed two per byte resumes: its values are read as stored
(int8, one per byte) and packed as the state now holds them (train/earlier_int4.py)."""
import jax
import jax.numpy as jnp
import numpy as np

import qwenvl_jax as q
from qwenvl_jax import param_layout
from qwenvl_jax.kernel_math import PACKED
from qwenvl_jax.quant import quantize, unpack
from train.checkpointing import Checkpointer
from train.step import TrainState


def test_a_run_saved_with_int4_one_per_byte_resumes_packed(golden_dir, tmp_path):
  model, params = q.load_pretrained(golden_dir / 'checkpoint')
  now = quantize(params, model.config, 'int4')
  flat = param_layout.flatten(now)
  packed_paths = [p for p, leaf in flat.items() if leaf.dtype == PACKED]
  assert packed_paths
  earlier = jax.tree_util.tree_map_with_path(  # as an earlier version held them: int8, shaped as the kernel
      lambda path, leaf: unpack(leaf, tuple(str(k.key) for k in path)) if leaf.dtype == PACKED else leaf, now)
  state = lambda params: TrainState(jnp.zeros((), jnp.int32), params, {}, None)
  checkpointer = Checkpointer(tmp_path / 'checkpoints', save_every=1, keep=1)
  said = []
  try:
    checkpointer.save(1, state(earlier), {'epoch': 0})
    checkpointer._manager.wait_until_finished()
    restored, _ = checkpointer.restore(state(jax.tree.map(jnp.zeros_like, now)), say=said.append)
  finally:
    checkpointer.close()
  got = param_layout.flatten(restored.params)
  for path, leaf in flat.items():
    assert got[path].dtype == leaf.dtype and np.asarray(got[path]).tobytes() == np.asarray(leaf).tobytes(), path
  assert any('packed two per byte' in s for s in said)
