"""Sharded runs of the tiny golden model against one device; tests/test_sharding.py runs it as

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_checks.py GOLDEN_DIR OUT.json

Meshes are data x fsdp [x tensor]: '1x8' with the 'fsdp' rules, '2x2x2' (all three axes) with 'fsdp_tp'. Each
mesh runs sharded init, the forward pass, greedy generation and one AdamW train step; the reference is the
same code on a mesh of one device. Then an Orbax checkpoint saved from one mesh is restored straight onto
another mesh's shardings. Writes max differences and every failed check to OUT.json.

The model, batch and train step helpers are shared with the multi-process worker tests/dist_worker.py.
"""
from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import traceback

import chex
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from qwenvl_jax import sharding as sh
from qwenvl_jax.checkpoint import read_released
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.decode import generate
from qwenvl_jax.model import QwenVL, lm_loss
from qwenvl_jax.params import params_from_hf

MESHES = {'1x8': 'fsdp', '2x2x2': 'fsdp_tp'}
INIT_MESH = '2x2x2'
ROWS = 8  # the golden batch of 2 rows tiled 4 times, so that the batch splits over all 8 devices
NEW_TOKENS = 6
TOL = dict(atol=2e-5, rtol=2e-5)  # fp32: only the order of reductions differs between meshes


def load_tiny(golden_dir: pathlib.Path) -> tuple[QwenVL, dict]:
  """The tiny golden model with host (numpy) params."""
  config = QwenVLConfig.from_json(golden_dir / 'checkpoint')
  return QwenVL(config), params_from_hf(read_released(golden_dir / 'checkpoint'), config)


def golden_batch(golden: dict, rows: int = ROWS) -> dict[str, np.ndarray]:
  """The golden batch (one image per row) tiled to `rows` rows; images follow their rows."""
  reps = rows // 2
  return {'input_ids': np.tile(golden['batch.input_ids'].astype(np.int32), (reps, 1)),
          'pixel_values': np.tile(golden['pixel_values'][:2].transpose(0, 2, 3, 1), (reps, 1, 1, 1))}


def make_optimizer() -> optax.GradientTransformation:
  # Adam's first step is lr * g / (|g| + eps): with the usual eps=1e-8 it turns reduction-order noise in
  # gradients near zero into O(lr) differences; eps=1e-5 keeps the comparison at fp32 tolerance.
  return optax.adamw(1e-3, eps=1e-5, weight_decay=0.1)


def make_train_step(model: QwenVL, optimizer: optax.GradientTransformation):
  """(params, opt_state, batch) -> (params, opt_state, loss): train-mode loss as the golden data's."""
  def step(params, opt_state, batch):
    def loss_fn(p):
      logits = model.apply({'params': p}, batch['input_ids'], batch['pixel_values'], train=True)
      return lm_loss(logits, batch['input_ids'])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def jit_train_step(model, optimizer, mesh, rules, params, batch):
  """The sharded step plus its initial optimizer state, created on the state's shardings."""
  p_sh = sh.param_shardings(mesh, params, rules)
  o_sh = sh.state_shardings(mesh, jax.eval_shape(optimizer.init, params), rules)
  b_sh = {k: sh.batch_sharding(mesh, rules, v.shape) for k, v in batch.items()}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_state = jax.jit(optimizer.init, out_shardings=o_sh)(params)
  step = sh.sharded_jit(make_train_step(model, optimizer), mesh, rules,
                        in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, replicated))
  return step, opt_state


def unsharded_big_leaves(tree, min_size: int = 4096) -> list[str]:
  """Leaves of at least min_size elements that some device holds whole."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shard = leaf.sharding.shard_shape(leaf.shape)
    if leaf.size >= min_size and np.prod(shard) >= leaf.size:
      bad.append(f'{jax.tree_util.keystr(path)} {leaf.shape} spec {leaf.sharding.spec}')
  return bad


def device_fraction(tree) -> float:
  """Bytes on the first device over the bytes of the whole tree."""
  dev = jax.tree.leaves(tree)[0].sharding.mesh.devices.flat[0]
  held = sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)
  return held / sum(x.nbytes for x in jax.tree.leaves(tree))


def run(model, host_params, batch, mesh, rules, init: bool) -> dict:
  """Every entry point on one mesh; arrays stay on their devices. `init` adds the sharded init
  (compiling the initializers takes as long as the train step, so only one mesh checks it)."""
  config = model.config
  out = {'init': sh.shard_init(model, mesh, rules, jax.random.key(0))} if init else {}
  params = sh.shard_params(mesh, host_params, rules)
  dev_batch = sh.shard_batch(mesh, rules, batch)
  logits_sh = sh.logical_sharding(mesh, sh.get_rules(rules), ('batch', 'length', 'act_vocab'),
                                  batch['input_ids'].shape + (config.text.vocab_size,))
  forward = sh.sharded_jit(
      lambda p, b: model.apply({'params': p}, b['input_ids'], b['pixel_values']), mesh, rules,
      in_shardings=(sh.param_shardings(mesh, params, rules), jax.tree.map(lambda x: x.sharding, dev_batch)),
      out_shardings=logits_sh)
  out['logits'] = forward(params, dev_batch)
  out['constraints'] = forward.lower(params, dev_batch).as_text().count('sharding_constraint')
  with sh.use_rules(mesh, rules):  # generate() follows the params' shardings
    prompt = np.tile(batch['input_ids'][:1], (ROWS, 1))
    pixels = np.tile(batch['pixel_values'][:1], (ROWS, 1, 1, 1))
    out['tokens'] = generate(model, params, prompt, pixels, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False)
  step, opt_state = jit_train_step(model, make_optimizer(), mesh, rules, params, batch)
  out['params'], out['opt_state'], out['loss'] = step(params, opt_state, dev_batch)
  return out


def to_host(x):
  return np.asarray(jax.device_get(x))


def check(report: dict, name: str, got, want, **tol) -> None:
  """chex comparison; the failure message and the max difference go to the report."""
  got, want = jax.tree.map(to_host, got), jax.tree.map(to_host, want)
  diffs = [np.max(np.abs(a.astype(np.float64) - b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
  report.setdefault('max_diff', {})[name] = float(max(diffs))
  try:
    chex.assert_trees_all_close(got, want, **(tol or TOL))
  except AssertionError as e:
    report.setdefault('failures', []).append(f'{name}: {str(e)[:2000]}')


def check_mesh(report: dict, out: dict, ref: dict, mesh, rules: str) -> None:
  for name in ('init', 'logits', 'loss', 'params', 'opt_state'):
    if name in out:
      check(report, name, out[name], ref[name])
  if not np.array_equal(out['tokens'], ref['tokens']):
    report.setdefault('failures', []).append(f'tokens differ: {out["tokens"]} vs {ref["tokens"]}')
  want = sh.param_shardings(mesh, out['params'], rules)
  for tree in {'init', 'params'} & set(out):
    same = jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), out[tree], want)
    if not all(jax.tree.leaves(same)):
      report.setdefault('failures', []).append(f'{tree}: shardings differ from param_shardings')
    for leaf in unsharded_big_leaves(out[tree]):
      report.setdefault('failures', []).append(f'{tree}: not sharded: {leaf}')
  mu = out['opt_state'][0].mu
  for leaf in unsharded_big_leaves(mu):
    report.setdefault('failures', []).append(f'adam mu not sharded: {leaf}')
  report['param_fraction_per_device'] = device_fraction(out['params'])
  report['activation_constraints'] = out['constraints']
  report['batch_spec'] = str(sh.batch_sharding(mesh, rules, (ROWS, 30)).spec)


def check_restore(report: dict, saved: dict, mesh, rules: str) -> None:
  """Saves a train state from one mesh and restores it onto `mesh`'s shardings (no host copy)."""
  state = {'params': saved['params'], 'opt_state': saved['opt_state']}
  target = sh.with_shardings(state, {'params': sh.param_shardings(mesh, state['params'], rules),
                                     'opt_state': sh.state_shardings(mesh, state['opt_state'], rules)})
  with tempfile.TemporaryDirectory() as tmp:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(pathlib.Path(tmp) / 'state', state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(pathlib.Path(tmp) / 'state', target)
  check(report, 'restored', restored, state, atol=0, rtol=0)
  same = jax.tree.map(lambda r, t: r.sharding.is_equivalent_to(t.sharding, r.ndim), restored, target)
  if not all(jax.tree.leaves(same)):
    report.setdefault('failures', []).append('restored arrays are not on the target shardings')


def main(golden_dir: str, out_file: str) -> int:
  from safetensors.numpy import load_file
  golden_dir = pathlib.Path(golden_dir)
  golden = load_file(str(golden_dir / 'golden.safetensors'))
  model, host_params = load_tiny(golden_dir)
  batch = golden_batch(golden)
  results: dict = {'devices': jax.device_count()}
  ref = run(model, host_params, batch, sh.make_mesh('data=1', devices=jax.devices()[:1]), 'fsdp', init=True)
  reference: dict = {}
  check(reference, 'golden_logits', ref['logits'], np.tile(golden['batch.logits'], (ROWS // 2, 1, 1)),
        atol=1e-4, rtol=0)
  check(reference, 'golden_loss', ref['loss'], golden['train.loss'], atol=1e-5, rtol=0)
  want_tokens = np.tile(golden['generate.output_ids'][:, :30 + NEW_TOKENS], (ROWS, 1))
  if not np.array_equal(ref['tokens'], want_tokens):
    reference.setdefault('failures', []).append(f'tokens {ref["tokens"]} != golden {want_tokens}')
  results['reference'] = reference
  runs = {}
  for spec, rules in MESHES.items():
    report: dict = {'rules': rules}
    try:
      mesh = sh.make_mesh(spec)
      report['mesh'] = dict(mesh.shape)
      runs[spec] = run(model, host_params, batch, mesh, rules, init=spec == INIT_MESH)
      check_mesh(report, runs[spec], ref, mesh, rules)
    except Exception:  # report every mesh, not only the first that breaks
      report.setdefault('failures', []).append(traceback.format_exc())
    results[spec] = report
  restore: dict = {'from': '1x8', 'to': '2x2x2'}
  if '1x8' in runs:
    check_restore(restore, runs['1x8'], sh.make_mesh('2x2x2'), MESHES['2x2x2'])
  results['restore'] = restore
  pathlib.Path(out_file).write_text(json.dumps(results, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main(*sys.argv[1:]))
