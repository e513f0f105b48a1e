"""`qwenvl-jax plan`: per-device memory of training on a mesh, computed from shapes alone.

Nothing is allocated: parameter shapes come from `jax.eval_shape` of the model's init, their per-device
shards from the sharding rules and the mesh sizes (no devices needed), activations from the formula in
`activation_bytes`.

  python -m qwenvl_jax.plan --mesh data=1,fsdp=16,tensor=2 --stage 2 --batch 32 --seq 2048 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from typing import Mapping, Sequence

import jax

from qwenvl_jax import sharding as sh
from qwenvl_jax.config import QwenVLConfig, as_dtype, qwen_vl_7b
from qwenvl_jax.model import QwenVL, param_shapes
from qwenvl_jax.params import get_path

GiB = 1024 ** 3
# HBM per JAX device. A v4 chip (two TensorCores in megacore mode) and a v5p chip are one device each.
ACCELERATORS = {'TPU v4': 32, 'TPU v5e': 16, 'TPU v5p': 95, 'H100 80GB': 80}
USABLE = 0.9  # XLA needs the rest for temporaries, collectives' buffers and fragmentation

STAGES = {
    1: 'pre-training: the vision tower and the adapter train, the LLM is frozen',
    2: 'multi-task pre-training: everything trains',
    3: 'supervised fine-tuning: the LLM and the adapter train, the ViT is frozen',
}


def trainable(path: Sequence[str], stage: int) -> bool:
  """Whether a parameter trains in a stage. The resampler's 2D sin-cos table never trains; the adapter
  of stage 3 is the resampler (attn_pool), as in the original fine-tuning script's `fix_vit`."""
  if tuple(path[-2:]) == ('attn_pool', 'pos_embed'):
    return False
  if stage == 1:
    return path[0] == 'visual'
  if stage == 2:
    return True
  if stage == 3:
    return path[0] != 'visual' or path[1:2] == ('attn_pool',)
  raise ValueError(f'unknown stage {stage}; stages are {sorted(STAGES)}')


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes per device; activations without and with full remat of every block."""
  mesh: Mapping[str, int]
  rules: str
  stage: int
  batch: int
  seq: int
  dtype: str  # compute
  param_dtype: str
  images: int
  image_size: int
  total_params: int
  trainable_params: int
  params: int
  grads: int
  optimizer: int
  activations: int
  activations_remat: int

  def total(self, remat: bool) -> int:
    return self.params + self.grads + self.optimizer + (self.activations_remat if remat else self.activations)


def _split(sizes: Mapping[str, int], rules, name: str, size: int) -> int:
  """How many ways a dimension of this logical name and size is split on the mesh."""
  return size // sh.shard_shape((size,), sh.spec_for((name,), (size,), sizes, rules), sizes)[0]


@functools.lru_cache(maxsize=8)
def abstract_params(config: QwenVLConfig):
  """ShapeDtypeStructs of the params (jax.eval_shape of init): nothing allocated."""
  return param_shapes(QwenVL(config))


def param_bytes(config: QwenVLConfig, sizes: Mapping[str, int], rules, stage: int, dtype) -> dict[str, int]:
  """Parameter counts and per-device bytes of params, gradients and AdamW state."""
  abstract = abstract_params(config)
  specs = sh.param_specs(abstract, sizes, rules)
  width = as_dtype(dtype).itemsize
  # AdamW keeps two fp32 moments, plus an fp32 master copy when the params themselves are lower precision.
  opt_width = 8 + (4 if width < 4 else 0)
  out = dict(total_params=0, trainable_params=0, params=0, grads=0, optimizer=0)
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    keys = tuple(k.key for k in path)
    spec = get_path(specs, keys)
    local = math.prod(sh.shard_shape(leaf.shape, spec, sizes))
    out['total_params'] += leaf.size
    out['params'] += local * width
    if trainable(keys, stage):
      out['trainable_params'] += leaf.size
      out['grads'] += local * width
      out['optimizer'] += local * opt_width
  return out


def activation_bytes(config: QwenVLConfig, sizes: Mapping[str, int], rules, stage: int, batch: int,
                     seq: int, dtype, images: int) -> tuple[int, int]:
  """Estimated activations kept for the backward pass per device: (no remat, full remat).

  Per token of a decoder layer, with c bytes per compute element and tp the tensor split of heads/MLP:
    c * (4d + 6d/tp + 4f/tp) + (4 + c) * (h/tp) * s + s
  (residual, two norm outputs and the attention input; q, k, v, rotated q and k and the attention output;
  up, gate, silu(gate) and their product; fp32 softmax probabilities and their cast for the value matmul;
  the boolean mask). The ViT layer is the same with its widths, P = patches instead of s, no mask, and
  c * 2F/tp for its MLP (fc output and GELU). The loss adds fp32 logits and log-probabilities,
  8 * V/tp per token. Full remat keeps only each block's input (c * d per token) plus one block
  recomputed during the backward pass. The frozen ViT of stage 3 keeps nothing (one layer's transient);
  the frozen LLM of stage 1 still passes gradients to the adapter, so it is counted as trained.
  """
  t, v = config.text, config.vision
  c = as_dtype(dtype).itemsize
  rows = batch // _split(sizes, rules, 'batch', batch)
  tokens, patches = rows * seq, v.grid * v.grid
  tp_h, tp_f = _split(sizes, rules, 'act_heads', t.num_heads), _split(sizes, rules, 'act_mlp', t.mlp_width)
  d, f, h = t.hidden_size, t.mlp_width, t.num_heads
  text_layer = tokens * (c * (4 * d + 6 * d / tp_h + 4 * f / tp_f) + (4 + c) * h / tp_h * seq + seq)
  loss = tokens * (8 * t.vocab_size / _split(sizes, rules, 'act_vocab', t.vocab_size) + c * d)
  w, vf, vh = v.width, v.mlp_width, v.heads
  vtp_h, vtp_f = _split(sizes, rules, 'act_heads', vh), _split(sizes, rules, 'act_mlp', vf)
  vis_tokens = rows * images * patches
  vis_layer = vis_tokens * (c * (4 * w + 6 * w / vtp_h + 2 * vf / vtp_f) + (4 + c) * vh / vtp_h * patches)
  if stage == 3:
    vision, vision_remat = vis_layer, vis_layer
  else:
    vision, vision_remat = v.layers * vis_layer, v.layers * vis_tokens * c * w + vis_layer
  full = t.num_layers * text_layer + loss + vision
  remat = t.num_layers * tokens * c * d + text_layer + loss + vision_remat
  return int(full), int(remat)


def _check_count(name: str, value: int, least: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < least:
    raise ValueError(f'{name} must be an integer >= {least}, got {value!r}')


def make_plan(config: QwenVLConfig, mesh: str | Mapping[str, int], *, stage: int = 2,
              batch: int | None = None, seq: int | None = None, dtype: str = 'bfloat16',
              param_dtype: str | None = None, rules: str | None = None, images: int = 1,
              devices: int | None = None) -> Plan:
  """The memory plan; `batch` (None) defaults to one sample per batch shard, `seq` to the config's
  seq_length, `param_dtype` (storage of params and gradients) to the compute `dtype`. Given values
  must be positive: a 0 is refused, never taken for "the default"."""
  for name, value, least in (('batch', batch, 1), ('seq', seq, 1), ('devices', devices, 1),
                             ('images', images, 0)):
    if value is not None:
      _check_count(name, value, least)
  parsed = sh.parse_mesh(mesh)
  if devices is None:
    if -1 in parsed.values():
      raise ValueError(f'mesh {mesh!r} uses -1; give the number of devices (--devices)')
    devices = math.prod(parsed.values())
  try:
    sizes = sh.mesh_shape(parsed, devices)
  except ValueError as e:
    raise ValueError(f'{e} (plan for another device count with --devices)') from None
  rules = sh.default_rules(sizes) if rules is None else rules
  rule_map = sh.get_rules(rules)
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage}; stages are {sorted(STAGES)}')
  batch = sizes['data'] * sizes['fsdp'] if batch is None else batch
  seq = config.text.seq_length if seq is None else seq
  param_dtype = as_dtype(dtype if param_dtype is None else param_dtype).name
  counts = param_bytes(config, sizes, rule_map, stage, param_dtype)
  acts, acts_remat = activation_bytes(config, sizes, rule_map, stage, batch, seq, dtype, images)
  return Plan(sizes, rules, stage, batch, seq, as_dtype(dtype).name, param_dtype, images,
              config.vision.image_size,
              activations=acts,
              activations_remat=acts_remat, **counts)


def format_plan(plan: Plan) -> str:
  sizes = plan.mesh
  n = math.prod(sizes.values())
  gib = lambda b: f'{b / GiB:8.2f} GiB'
  lines = [
      f'mesh data={sizes["data"]} fsdp={sizes["fsdp"]} tensor={sizes["tensor"]} ({n} devices), '
      f'rules {plan.rules}',
      f'stage {plan.stage}: {STAGES[plan.stage]}',
      f'params {plan.total_params:,} ({plan.trainable_params:,} trainable), {plan.param_dtype} '
      f'(gradients too), {plan.dtype} compute',
      f'global batch {plan.batch} x {plan.seq} tokens, '
      f'{plan.images} image(s) of {plan.image_size}px per sample',
      'optimizer: AdamW, fp32 moments' + ('' if plan.param_dtype == 'float32' else ' and master weights'),
      '',
      f'{"per device":<26}{"no remat":>14}{"full remat":>14}',
  ]
  rows = [('params', plan.params, plan.params), ('gradients', plan.grads, plan.grads),
          ('optimizer state', plan.optimizer, plan.optimizer),
          ('activations (estimate)', plan.activations, plan.activations_remat),
          ('total', plan.total(False), plan.total(True))]
  lines += [f'{label:<26}{gib(a):>14}{gib(b):>14}' for label, a, b in rows]
  lines += ['', f'fits in {USABLE:.0%} of HBM per device']
  for name, hbm in ACCELERATORS.items():
    verdict = lambda b: 'fits' if b <= USABLE * hbm * GiB else 'no'
    label = f'{name} ({hbm} GiB)'
    lines.append(f'{label:<26}{verdict(plan.total(False)):>14}{verdict(plan.total(True)):>14}')
  return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sh.add_arguments(parser)
  parser.add_argument('--devices', type=int, default=None,
                      help='device count to plan for (default: the product of the mesh sizes, or this '
                           "machine's device count when a size is -1, as in the default mesh data=-1)")
  parser.add_argument('--config', default=None,
                      help='config.json or checkpoint directory (default: the released Qwen-VL)')
  parser.add_argument('--stage', type=int, default=2, choices=sorted(STAGES),
                      help='; '.join(f'{k}: {v}' for k, v in STAGES.items()))
  parser.add_argument('--batch', type=int, default=None, help='global batch (default: one per batch shard)')
  parser.add_argument('--seq', type=int, default=None, help='tokens per sample (default: seq_length)')
  parser.add_argument('--dtype', default='bfloat16', help='compute dtype (activations)')
  parser.add_argument('--param-dtype', default=None,
                      help='dtype of stored params and gradients (default: --dtype); AdamW adds an fp32 '
                           'master copy when it is not float32')
  parser.add_argument('--images', type=int, default=1, help='images per sample')
  parser.add_argument('--image-size', type=int, default=None,
                      help="image side in pixels (default: the config's, 448; stage 1 of Qwen-VL used 224)")


def _devices(args: argparse.Namespace) -> int | None:
  """--devices, else this machine's device count when the mesh has a -1 to resolve."""
  if args.devices is not None or -1 not in sh.parse_mesh(args.mesh).values():
    return args.devices
  return jax.device_count()


def run(args: argparse.Namespace) -> int:
  """Prints the plan; a bad value or file prints one line `qwenvl-jax plan: error: ...` and exits 2."""
  try:
    config = QwenVLConfig.from_json(args.config) if args.config is not None else qwen_vl_7b()
    if args.image_size is not None:
      _check_count('--image-size', args.image_size, config.vision.patch_size)
      config = config.replace(vision={'image_size': args.image_size})
    plan = make_plan(config, args.mesh, stage=args.stage, batch=args.batch, seq=args.seq, dtype=args.dtype,
                     param_dtype=args.param_dtype, rules=args.rules, images=args.images,
                     devices=_devices(args))
  except (ValueError, OSError) as e:
    print(f'qwenvl-jax plan: error: {e}', file=sys.stderr)
    return 2
  print(format_plan(plan))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='qwenvl-jax plan', description=__doc__.split('\n')[0])
  add_arguments(parser)
  return run(parser.parse_args(argv))


if __name__ == '__main__':
  sys.exit(main())
