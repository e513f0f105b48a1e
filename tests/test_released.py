"""The released 9.6B model, without allocating it: shapes, parameter count and the name mapping."""
import json
import math
from collections import Counter

import jax
import numpy as np
import pytest

from qwenvl_jax import QwenVL, QwenVLConfig, qwen_vl_7b
from qwenvl_jax.model import init_params, param_shapes
from qwenvl_jax.params import CheckpointMismatchError, check_names, params_from_hf, params_to_hf, rules


@pytest.fixture(scope='module')
def released(shared_dir):
  with open(shared_dir / 'released_qwen_vl_tensors.json') as f:
    return json.load(f)


@pytest.fixture(scope='module')
def abstract_params():
  """eval_shape of init with the released dims: nothing is allocated."""
  cfg = qwen_vl_7b()
  return param_shapes(QwenVL(cfg))


def leaves_by_path(tree):
  return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_config_from_released_json(released):
  cfg = QwenVLConfig.from_dict(released['config'])
  assert cfg == qwen_vl_7b()
  assert cfg.vision.n_queries == 256  # absent from the released config: the original's default
  assert cfg.vision.mlp_width == 8192 and cfg.text.mlp_width == 11008 and cfg.vision.resampler_heads == 32


def test_parameter_count(abstract_params, released):
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
  assert total == released['total_params'] == 9_656_935_168


def test_mapping_covers_every_released_tensor_once(abstract_params, released):
  cfg = qwen_vl_7b()
  table = rules(cfg)
  assert set(table) == set(released['tensors']) and len(table) == 853
  for name, shape in released['tensors'].items():
    assert table[name].hf_shape == tuple(shape), name
  check_names({n: tuple(s) for n, s in released['tensors'].items()}, cfg)

  leaves = leaves_by_path(abstract_params)
  uses = Counter((r.path, r.layer) for r in table.values())
  assert max(uses.values()) == 1  # no slice is claimed twice
  for path, leaf in leaves.items():
    claimed = [r for r in table.values() if r.path == path]
    assert claimed, f'{path} is not covered by any released tensor'
    assert claimed[0].leaf_shape == leaf.shape, path
    if claimed[0].layer is None:
      assert len(claimed) == 1
    else:  # every layer slice of a stacked leaf exactly once
      assert sorted(r.layer for r in claimed) == list(range(leaf.shape[0])), path
  assert {r.path for r in table.values()} == set(leaves)


def test_round_trip_is_exact_on_a_small_random_model():
  cfg = qwen_vl_7b().replace(
      text={'vocab_size': 64, 'hidden_size': 256, 'num_layers': 2, 'num_heads': 2, 'intermediate_size': 96},
      vision={'width': 32, 'layers': 3, 'heads': 2, 'output_dim': 256, 'image_size': 56, 'n_queries': 4})
  params = init_params(QwenVL(cfg), jax.random.key(1))
  hf = dict(params_to_hf(jax.tree.map(np.asarray, params), cfg))
  back = params_from_hf(hf, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


def test_mismatch_lists_every_problem_together():
  cfg = qwen_vl_7b()
  shapes = {r.hf_name: r.hf_shape for r in rules(cfg).values()}
  del shapes['lm_head.weight']
  shapes['transformer.extra.weight'] = (3,)
  shapes['transformer.h.0.mlp.w1.weight'] = (11008, 4095)
  with pytest.raises(CheckpointMismatchError) as e:
    check_names(shapes, cfg)
  msg = str(e.value)
  assert 'lm_head.weight' in msg and 'transformer.extra.weight' in msg and 'mlp.w1' in msg
  assert e.value.missing == ['lm_head.weight'] and e.value.unexpected == ['transformer.extra.weight']
