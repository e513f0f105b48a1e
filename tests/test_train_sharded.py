"""The train state on a 2-device mesh: weights read straight onto their shardings (the released layout by
slice, a converted checkpoint through Orbax, a run's out_dir), and a sharded resume that initialises
nothing and still equals six straight steps bit for bit.

The tests need two devices: `test_in_a_two_device_process` runs this file again in a process with two
simulated CPU devices, where it is the one test skipped.
"""

import jax
import numpy as np
import pytest

from processes import pytest_on_two_devices

from qwenvl_jax import load_pretrained, sharding as sh
from qwenvl_jax.model import QwenVL, param_shapes
from test_train_resume import _assert_bitwise_equal, _losses, _refuse, _restore, setup  # noqa: F401 (fixture)
from train.run_dir import CHECKPOINT_DIR
from train.trainer import initial_weights, run

TWO = jax.device_count() == 2
needs_two = pytest.mark.skipif(not TWO, reason='runs inside test_in_a_two_device_process')


@pytest.mark.slow
@pytest.mark.skipif(TWO, reason='this is the two-device process')
def test_in_a_two_device_process(tmp_path):
  pytest_on_two_devices(__file__, tmp_path)


def _shardings(model, mesh_spec, rules='fsdp'):
  return sh.param_shardings(sh.make_mesh(mesh_spec), param_shapes(model), rules)


def _check_placed(params, shardings, reference):
  """Every leaf float32 on its sharding with the reference's values; returns how many are split."""
  split = 0
  for x, s, r in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), jax.tree.leaves(reference)):
    assert x.sharding == s and x.dtype == np.float32 and x.shape == r.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(r, np.float32))
    split += x.addressable_shards[0].data.size < x.size
  return split


@needs_two
@pytest.mark.parametrize('mesh_spec,rules', [('fsdp=2', 'fsdp'), ('tensor=2', 'tp')])
def test_released_layout_read_by_slice_onto_the_mesh(golden_dir, mesh_spec, rules):
  """Each device's block copied out of the memory-mapped tensors (stacked layers, transposed kernels,
  packed qkv), equal to the one-device load."""
  model, whole = load_pretrained(golden_dir / 'checkpoint')
  shardings = _shardings(model, mesh_spec, rules)
  _, placed = load_pretrained(golden_dir / 'checkpoint', dtype='float32', shardings=shardings)
  assert _check_placed(placed, shardings, whole) >= 10


@needs_two
def test_converted_checkpoint_restored_onto_the_mesh_in_float32(golden_dir, tmp_path):
  """A bfloat16 conversion comes back as float32 master weights, on the run's shardings."""
  from convert.core import hf_to_orbax
  converted = hf_to_orbax(golden_dir / 'checkpoint', tmp_path / 'bf16', dtype='bfloat16', progress=False)
  model, whole = load_pretrained(converted, dtype='float32')
  shardings = _shardings(model, 'fsdp=2')
  _, placed = load_pretrained(converted, dtype='float32', shardings=shardings)
  assert _check_placed(placed, shardings, whole) >= 10


@needs_two
@pytest.mark.slow
def test_sharded_resume_initialises_nothing(setup, monkeypatch):
  """fsdp=2: six straight steps equal three, a stop and three resumed, and the resume never initialises;
  then the stopped run's out_dir starts another run straight on the mesh."""
  root, cfg = setup
  straight_dir, split_dir = root / 'fsdp_straight', root / 'fsdp_split'
  _, straight, _ = run(cfg.replace(out_dir=str(straight_dir)), mesh='fsdp=2', progress=False)
  split_cfg = cfg.replace(out_dir=str(split_dir))
  run(split_cfg, mesh='fsdp=2', progress=False, stop_after=3)

  with monkeypatch.context() as m:
    for target in ('train.trainer.create', 'train.trainer.initial_weights'):  # init, or weights read
      m.setattr(target, _refuse)
    _, resumed, _ = run(split_cfg, mesh='fsdp=2', progress=False, resume=True)
  leaf = jax.tree.leaves(resumed)[0]
  assert len(leaf.sharding.device_set) == 2
  _assert_bitwise_equal(straight, resumed)
  _assert_bitwise_equal(_restore(straight_dir / CHECKPOINT_DIR, 6), _restore(split_dir / CHECKPOINT_DIR, 6))
  a, b = _losses(straight_dir), _losses(split_dir)
  assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]

  from train.trainer import base_model_config, run_model_config
  next_cfg = cfg.replace(init_from=str(split_dir), model_config='')
  model = QwenVL(run_model_config(next_cfg, base_model_config(next_cfg)))
  shardings = _shardings(model, 'fsdp=2')
  assert _check_placed(initial_weights(next_cfg, None, shardings), shardings, resumed) >= 5
