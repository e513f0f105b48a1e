"""Sharding: the logical-axis table, mesh specs, rule resolution, and sharded runs on 8 simulated devices."""
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from processes import xla_flags
from jax.sharding import PartitionSpec as P

from qwenvl_jax import QwenVL, QwenVLConfig, qwen_vl_7b
from qwenvl_jax import param_layout, sharding as sh
from qwenvl_jax.model import param_shapes

TESTS = pathlib.Path(__file__).resolve().parent
SIZES_V4_32 = {'data': 1, 'fsdp': 16, 'tensor': 2}


def abstract(config):
  return param_shapes(QwenVL(config))


@pytest.fixture(scope='module')
def released():
  return abstract(qwen_vl_7b())


@pytest.fixture(scope='module')
def tiny_config(golden_dir):
  return QwenVLConfig.from_json(golden_dir / 'checkpoint')


def leaf_paths(tree):
  return {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_table_covers_every_leaf_exactly(released, tiny_config):
  for params in (released, abstract(tiny_config)):
    assert leaf_paths(params) == set(param_layout.axes_table())
    axes = sh.logical_axes(params)  # also checks every rank
    qkv = axes[('decoder', 'layers', 'attn', 'c_attn', 'kernel')]
    assert qkv == ('layers', 'embed', 'qkv', 'heads', 'head_dim')


def test_unknown_or_misshaped_leaf_is_named():
  with pytest.raises(KeyError, match='decoder/extra/kernel'):
    sh.logical_axes({'params': {'decoder': {'extra': {'kernel': np.zeros((2, 2))}}}})
  with pytest.raises(ValueError, match='lm_head/kernel has shape'):
    sh.logical_axes({'lm_head': {'kernel': np.zeros((2, 2, 2))}})


@pytest.mark.parametrize('spec,devices,want', [
    ('2x4', 8, (2, 4, 1)),
    ('2x2x2', 8, (2, 2, 2)),
    ('1x8', 8, (1, 8, 1)),
    ('data=2,fsdp=-1', 8, (2, 4, 1)),
    ('tensor=2, fsdp=16', 32, (1, 16, 2)),
    ('-1x2', 8, (4, 2, 1)),
    ('data=-1', 3, (3, 1, 1)),
])
def test_mesh_shape(spec, devices, want):
  sizes = sh.mesh_shape(spec, devices)
  assert tuple(sizes[a] for a in sh.MESH_AXES) == want


@pytest.mark.parametrize('spec,error', [
    ('pipeline=2', 'unknown axes'),
    ('data=two', 'not an integer'),
    ('data=-1,fsdp=-1', 'at most one -1'),
    ('data=0', 'positive'),
    ('data=3', 'needs 3 devices but 8'),
    ('fsdp=3,data=-1', 'do not divide'),
    ('2x2x2x1', 'expected e.g.'),
    ('data=2,data=4', 'given twice'),
])
def test_mesh_errors(spec, error):
  with pytest.raises(ValueError, match=error):
    sh.mesh_shape(spec, 8)


def test_make_mesh_names_and_sizes():
  mesh = sh.make_mesh(devices=jax.devices()[:1])
  assert mesh.axis_names == sh.MESH_AXES and dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  with pytest.raises(ValueError, match='needs 2 devices'):
    sh.make_mesh('data=2', devices=jax.devices()[:1])


def test_rule_sets_and_errors():
  assert sh.get_rules('fsdp')['embed'] == 'fsdp' and 'heads' not in sh.get_rules('fsdp')
  assert sh.get_rules('tp')['heads'] == 'tensor' and 'embed' not in sh.get_rules('tp')
  assert sh.get_rules('fsdp_tp')['batch'] == ('data', 'fsdp')
  with pytest.raises(ValueError, match='unknown sharding rules'):
    sh.get_rules('zero3')
  with pytest.raises(ValueError, match='unknown logical axes'):
    sh.get_rules({'emb': 'fsdp'})
  with pytest.raises(ValueError, match='unknown mesh axes'):
    sh.get_rules({'embed': 'model'})
  assert sh.default_rules({'fsdp': 4, 'tensor': 2}) == 'fsdp_tp'
  assert sh.default_rules({'data': 8}) == 'fsdp' and sh.default_rules({'tensor': 8}) == 'tp'


def test_spec_resolution():
  rules = sh.get_rules('fsdp_tp')
  sizes = {'data': 2, 'fsdp': 4, 'tensor': 2}
  # Uneven dimensions stay whole (the tiny ViT's MLP width 315); each mesh axis is used once.
  assert sh.spec_for(('vit_embed', 'vit_mlp'), (64, 315), sizes, rules) == P('fsdp', None)
  assert sh.spec_for(('embed', 'embed'), (256, 256), sizes, rules) == P('fsdp', None)
  # The batch keeps the leading part of ('data', 'fsdp') that divides it.
  assert sh.spec_for(('batch', None), (16, 3), sizes, rules) == P(('data', 'fsdp'), None)
  assert sh.spec_for(('batch', None), (2, 3), sizes, rules) == P('data', None)
  assert sh.spec_for(('batch', None), (1, 3), sizes, rules) == P(None, None)
  # Size-1 mesh axes are left out.
  data_only = {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert sh.spec_for(('batch', 'act_vocab'), (8, 64), data_only, rules) == P('data', None)
  with pytest.raises(ValueError, match='rank 3'):
    sh.spec_for(('batch',), (2, 3, 4), sizes, rules)
  with pytest.raises(ValueError, match="unknown logical axis 'btach'"):
    sh.spec_for(('btach',), (2,), sizes, rules)


def test_released_specs_and_bytes(released):
  specs = sh.param_specs(released, SIZES_V4_32, 'fsdp_tp')
  assert specs['decoder']['layers']['attn']['c_attn']['kernel'] == P(None, 'fsdp', None, 'tensor', None)
  assert specs['decoder']['layers']['mlp']['c_proj']['kernel'] == P(None, 'tensor', 'fsdp')
  assert specs['wte']['embedding'] == P('tensor', 'fsdp')
  assert specs['lm_head']['kernel'] == P('fsdp', 'tensor')
  assert specs['visual']['blocks']['c_fc']['kernel'] == P(None, 'fsdp', 'tensor')
  assert specs['decoder']['ln_f']['scale'] == P(None)

  assert sh.shard_shape((32, 4096, 3, 32, 128), P(None, 'fsdp', None, 'tensor', None), SIZES_V4_32) == (
      32, 256, 3, 16, 128)
  shard_elements = lambda leaf, spec: np.prod(sh.shard_shape(leaf.shape, spec, SIZES_V4_32))
  per_device = sum(jax.tree.leaves(jax.tree.map(shard_elements, released, specs)))
  total = sum(x.size for x in jax.tree.leaves(released))
  assert total == 9_656_935_168
  assert total / 32 <= per_device < 1.01 * total / 32  # only norms and a few biases are replicated


def test_optimizer_state_follows_params(released):
  state = jax.eval_shape(optax.adamw(1e-4).init, released)
  specs = sh.state_specs(state, SIZES_V4_32, 'fsdp_tp')
  params = sh.param_specs(released, SIZES_V4_32, 'fsdp_tp')
  assert specs[0].mu == params and specs[0].nu == params
  assert specs[0].count == P()


def test_constrain_only_inside_use_rules(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.lax, 'with_sharding_constraint', lambda x, s: calls.append(s) or x)
  mesh = sh.make_mesh(devices=jax.devices()[:1])
  x = jnp.ones((2, 3, 4))
  assert sh.constrain(x, ('batch', 'length', 'act_embed')) is x and not calls
  with sh.use_rules(mesh, 'fsdp'):
    sh.constrain(x, ('batch', 'length', 'act_embed'))
  sh.constrain(x, ('batch', 'length', 'act_embed'))
  assert len(calls) == 1 and calls[0].mesh == mesh and calls[0].spec == P(None, None, None)


def test_abstract_params_carry_shardings(released):
  mesh = sh.make_mesh(devices=jax.devices()[:1])
  target = sh.abstract_params(QwenVL(qwen_vl_7b()), mesh, 'fsdp')  # nothing allocated: 38 GB in fp32
  leaf = target['lm_head']['kernel']
  assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (4096, 151936)
  assert leaf.sharding.mesh.shape == mesh.shape


@pytest.mark.slow
def test_meshes_match_one_device(golden_dir, tmp_path):
  """1x8 (fsdp, 'fsdp' rules) and 2x2x2 (data x fsdp x tensor, 'fsdp_tp') on 8 simulated
  CPU devices: init, forward logits, greedy tokens, one train step and an Orbax restore onto another mesh
  match one device; params and Adam moments really are split."""
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=8'), JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get('PYTHONPATH', '')]))
  out = tmp_path / 'report.json'
  start = time.time()
  proc = subprocess.run([sys.executable, str(TESTS / 'sharded_checks.py'), str(golden_dir), str(out)],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  report = json.loads(out.read_text())
  print(f'8-device checks: {time.time() - start:.1f}s\n{json.dumps(report, indent=1)}')
  assert report['devices'] == 8
  failures = {k: v['failures'] for k, v in report.items() if isinstance(v, dict) and v.get('failures')}
  assert not failures, json.dumps(failures, indent=1)[:8000]
  for spec, shape in {'1x8': (1, 8, 1), '2x2x2': (2, 2, 2)}.items():
    r = report[spec]
    assert tuple(r['mesh'][a] for a in sh.MESH_AXES) == shape
    assert {'logits', 'loss', 'params', 'opt_state'} <= set(r['max_diff'])
    # Each device holds its 1/(fsdp*tensor) share plus the replicated norms (and the tiny ViT's MLP
    # width 315, which does not split over tensor=2).
    assert r['param_fraction_per_device'] < 1.15 / (shape[1] * shape[2])
    assert r['activation_constraints'] > 0  # the model's constrain() calls reach the compiled program
  assert report['1x8']['batch_spec'] == "P('fsdp', None)"
  assert report['2x2x2']['max_diff']['init'] == 0.0
  assert report['restore']['max_diff']['restored'] == 0.0


def test_shard_shape_of_a_short_spec_keeps_the_rest_whole():
  sizes = {'data': 1, 'fsdp': 2, 'tensor': 1}
  assert sh.shard_shape((4, 6), P(), sizes) == (4, 6)  # replicated: not ()
  assert sh.shard_shape((4, 6), P('fsdp'), sizes) == (2, 6)
  assert sh.shard_shape((4, 6), P(None, 'fsdp'), sizes) == (4, 3)
