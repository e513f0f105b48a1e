"""Quantized params on a mesh; tests/test_quant.py runs it as

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/quant_mesh_check.py GOLDEN_DIR TMP_DIR

The tiny golden model quantized to int4 is placed on a 1x2x2 (data x fsdp x tensor) mesh by its logical
axes ('fsdp_tp': q split like the float kernel, scale along its output dims), its sharded forward compared
with one device's; then an Orbax checkpoint of the sharded tree is restored onto the same shardings and
compared bit for bit. Prints 'ok' or raises.
"""
from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from sharded_checks import golden_batch, load_tiny  # noqa: E402

from qwenvl_jax import param_layout, sharding as sh  # noqa: E402
from qwenvl_jax.model import QwenVL  # noqa: E402
from qwenvl_jax.quant import quantize, quantized_config  # noqa: E402


def main(golden_dir: pathlib.Path, tmp: pathlib.Path) -> None:
  from safetensors.numpy import load_file
  assert jax.device_count() == 4, jax.devices()
  model, host = load_tiny(golden_dir)
  host = quantize(host, model.config, 'int4')
  model = QwenVL(quantized_config(model.config, 'int4'))
  batch = golden_batch(load_file(str(golden_dir / 'golden.safetensors')), rows=2)
  want = jax.jit(model.apply)({'params': host}, batch['input_ids'], batch['pixel_values'])

  mesh, rules = sh.make_mesh('data=1,fsdp=2,tensor=2'), 'fsdp_tp'
  params = sh.shard_params(mesh, host, rules)
  split = {k[-1] for k, x in param_layout.flatten(params).items() if x.sharding.shard_shape(x.shape) != x.shape}
  assert {'q', 'scale'} <= split, split  # quantized leaves are split over the mesh, not replicated
  forward = sh.sharded_jit(lambda p, b: model.apply({'params': p}, b['input_ids'], b['pixel_values']),
                           mesh, rules)
  got = forward(params, sh.shard_batch(mesh, rules, batch))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp / 'params', params)
  checkpointer.wait_until_finished()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
  restored = checkpointer.restore(tmp / 'params', target)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype and a.sharding == b.sharding, (a.dtype, b.dtype, a.sharding, b.sharding)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  print('ok')


if __name__ == '__main__':
  main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
