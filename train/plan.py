"""`qwenvl-jax plan`: per-device memory of one training step on a mesh, computed from shapes alone.

The plan describes what the trainer allocates (train/state.py): float32 master weights of the trainable
parameters, the frozen kernels and tables in the compute dtype (train/frozen.py), a quantized base as it is
held (int4 two values per byte), float32 gradients and AdamW's two float32 moments for the trainable leaves
(with LoRA only the LoRA leaves train), compute in the run's dtype. The state's bytes are exact: `jax.eval_shape` of the trainer's own init
and the trainer's shardings (`sharding.state_specs`), no devices needed. The step's transient memory
(gradients, the compute-dtype weight copies and activations that the backward pass keeps) is a model of
the compiled program, `transient_bytes`. `--compile` compiles the real step for abstract inputs on the mesh
and prints XLA's figure beside the plan's (train/plan_xla.py).

  python -m train.plan --mesh fsdp=16 --stage 2 --batch 32 --seq 2048 --remat full
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m train.plan --mesh fsdp=8 --batch 8 \
      --seq 1024 --compile --json
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

from qwenvl_jax import sharding as sh
from qwenvl_jax.config import QwenVLConfig, as_dtype, qwen_vl_7b
from qwenvl_jax.kernel_math import PACKED
from qwenvl_jax.layers import REMAT_POLICIES
from train.config import TrainConfig, stage_config
from train.stages import STAGES

GiB = 1024 ** 3
# HBM per JAX device. A v4 chip (two TensorCores in megacore mode) and a v5p chip are one device each.
ACCELERATORS = {'TPU v5e': 16, 'RTX 4090 / L4 24GB': 24, 'TPU v4': 32, 'H100 80GB': 80, 'TPU v5p': 95, 'H200': 141}
USABLE = 0.9  # XLA needs the rest for collectives' buffers and fragmentation
REMATS = ('none', *REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class Setup:
  """One planned run: the training config, the model config it trains and the mesh."""
  cfg: TrainConfig
  model_config: QwenVLConfig
  sizes: Mapping[str, int]
  rules: str
  seq: int
  weights: str = 'float'  # int8 / int4: Q-LoRA's frozen base, weight-only quantized (qwenvl_jax.quant)

  @property
  def devices(self) -> int:
    return math.prod(self.sizes.values())


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes per device: the train state (exact), then the step's transients (modelled)."""
  setup: Setup
  total_params: int
  trainable_params: int
  state: Mapping[str, int]  # params, lora, optimizer
  phase: str  # where the step's memory peaks
  transient: Mapping[str, int]  # at that phase: gradients, weight copies, gathered tables, activations, loss

  @property
  def total(self) -> int:
    return sum(self.state.values()) + sum(self.transient.values())

  def to_json(self) -> dict[str, Any]:
    s = self.setup
    return {'mesh': dict(s.sizes), 'rules': s.rules, 'stage': s.cfg.stage, 'batch': s.cfg.batch_size,
            'seq': s.seq, 'grad_accum': s.cfg.grad_accum, 'dtype': s.cfg.dtype, 'remat': s.cfg.remat,
            'lora': s.cfg.lora, 'weights': s.weights, 'images': s.cfg.max_images, 'image_size': s.cfg.image_size,
            'samples_per_row': s.cfg.samples_per_row,
            'total_params': self.total_params, 'trainable_params': self.trainable_params,
            'peak_phase': self.phase, 'plan': {**self.state, **self.transient},
            'plan_bytes_per_device': self.total}


def _check_count(name: str, value: Any, least: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < least:
    raise ValueError(f'{name} must be an integer >= {least}, got {value!r}')


def make_setup(config: QwenVLConfig, mesh: str | Mapping[str, int], *, stage: int = 2,
               batch: int | None = None, seq: int | None = None, grad_accum: int = 1, dtype: str = 'bfloat16',
               remat: str = 'none', lora: bool = False, rules: str | None = None, images: int | None = None,
               image_size: int | None = None, devices: int | None = None, weights: str = 'float',
               samples_per_row: int = 1) -> Setup:
  """The run to plan. The stage's packaged config (train/configs) gives the defaults the trainer uses (image
  size: 224 in stage 1, else 448; images per sample); `batch` (None) is one row per batch shard and
  micro-batch, `seq` the model's seq_length (a row's length), `samples_per_row` the samples packed into a
  row (the trainer's sequence packing: batch / samples_per_row rows, samples_per_row x images image slots
  each). Given values must be positive: a 0 is refused, never taken for a default."""
  for name, value, least in (('batch', batch, 1), ('seq', seq, 1), ('devices', devices, 1),
                             ('images', images, 0), ('grad_accum', grad_accum, 1),
                             ('samples_per_row', samples_per_row, 1)):
    if value is not None:
      _check_count(name, value, least)
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage}; stages are {sorted(STAGES)}')
  if remat not in REMATS:
    raise ValueError(f'unknown remat {remat!r}; expected one of {list(REMATS)}')
  if weights != 'float':
    from qwenvl_jax.quant import check_mode
    check_mode(weights)
    if not lora:
      raise ValueError(f'--weights {weights} is a frozen quantized base, which trains LoRA alone (Q-LoRA): '
                       'add --lora')
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
  sh.get_rules(rules)
  batch = sizes['data'] * sizes['fsdp'] * grad_accum * samples_per_row if batch is None else batch
  seq = config.text.seq_length if seq is None else seq
  overrides = dict(batch_size=batch, grad_accum=grad_accum, dtype=as_dtype(dtype).name, remat=remat,
                   lora=lora, seq_buckets=[seq], target_step=1, weights=weights,
                   samples_per_row=samples_per_row)
  if images is not None:
    overrides['max_images'] = images
  if image_size is not None:
    _check_count('image_size', image_size, config.vision.patch_size)
    overrides['image_size'] = image_size
  cfg = stage_config(stage, **overrides)
  from train.trainer import run_model_config  # the trainer's numerics, remat and image size
  model_config = run_model_config(cfg, config)
  return Setup(cfg, model_config, sizes, rules, seq, weights)


def abstract_state(setup: Setup) -> tuple[Any, Any]:
  """(TrainState of ShapeDtypeStructs, trainable mask of the optimiser's tree) as the trainer builds them."""
  # Batch, sequence, packing and remat shape the step, not the state: plans that differ only there share one.
  return _abstract_state(setup.cfg.replace(batch_size=1, grad_accum=1, seq_buckets=(2,), remat='none',
                                           samples_per_row=1),
                         setup.model_config.replace(remat='none'))


@functools.lru_cache(maxsize=8)
def _abstract_state(cfg: TrainConfig, model_config: QwenVLConfig) -> tuple[Any, Any]:
  from qwenvl_jax.model import QwenVL
  from train.optim import trainable_mask, trainables
  from train.state import from_random, run_optimizer
  model = QwenVL(model_config)
  optimizer = run_optimizer(cfg, model)
  state = jax.eval_shape(from_random(cfg, model, optimizer))  # cfg.weights: the base as Q-LoRA holds it
  return state, trainable_mask(cfg, trainables(state.params, state.lora))


def _local(leaf, spec, sizes) -> int:
  """Elements of one leaf on one device."""
  return math.prod(sh.shard_shape(leaf.shape, spec, sizes))


def _specs(tree: Any) -> list[PartitionSpec]:
  return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_bytes(setup: Setup, state: Any, mask: Any) -> tuple[dict[str, int], dict[str, int]]:
  """Per-device bytes of the state's parts, plus counts and the local bytes the transients scale with."""
  from train.optim import path_keys, trainables
  specs = sh.state_specs(state, setup.sizes, setup.rules)
  nbytes = lambda tree, spec_tree: sum(
      _local(x, s, setup.sizes) * x.dtype.itemsize
      for x, s in zip(jax.tree.leaves(tree), _specs(spec_tree), strict=True))
  parts = {'params': nbytes(state.params, specs.params), 'lora': nbytes(state.lora, specs.lora),
           'optimizer': nbytes(state.opt_state, specs.opt_state)}
  tree = trainables(state.params, state.lora)
  tree_specs = trainables(specs.params, specs.lora)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  counts = dict(total_params=0, trainable_params=0, trainable_local=0, decoder_local=0, decoder_held_local=0,
                vit_local=0)
  compute = as_dtype(setup.cfg.dtype)
  for (path, x), spec, train in zip(flat, _specs(tree_specs), jax.tree.leaves(mask), strict=True):
    keys = path_keys(path)
    per = 2 if x.dtype == PACKED else 1  # values per element: int4 two per byte
    local = per * _local(x, spec, setup.sizes)
    if keys[0] == 'params':
      counts['total_params'] += per * x.size
    if train:
      counts['trainable_params'] += x.size
      counts['trainable_local'] += local
    if keys[:3] == ('params', 'decoder', 'layers'):  # the base's; LoRA's factors mirror its paths
      counts['decoder_local'] += local
      if x.dtype == compute:  # a frozen weight held in the compute dtype (train/frozen.py): never cast
        counts['decoder_held_local'] += local
    if keys[:3] == ('params', 'visual', 'blocks'):
      counts['vit_local'] += local
  return parts, counts


def make_plan(config: QwenVLConfig, mesh: str | Mapping[str, int], **kwargs: Any) -> Plan:
  """The memory plan of a run; keyword arguments as `make_setup`."""
  from train.plan_model import transient_bytes
  setup = make_setup(config, mesh, **kwargs)
  state, mask = abstract_state(setup)
  parts, counts = state_bytes(setup, state, mask)
  return Plan(setup, counts['total_params'], counts['trainable_params'], parts,
              *transient_bytes(setup, counts))


def format_plan(plan: Plan, xla: Mapping[str, Any] | None = None) -> str:
  s, cfg = plan.setup, plan.setup.cfg
  gib = lambda b: f'{b / GiB:9.2f} GiB'
  lines = [
      f'mesh data={s.sizes["data"]} fsdp={s.sizes["fsdp"]} tensor={s.sizes["tensor"]} ({s.devices} devices), '
      f'rules {s.rules}',
      f'stage {cfg.stage}: {STAGES[cfg.stage]}' + (' (LoRA: only the LoRA leaves train)' if cfg.lora else ''),
      f'params {plan.total_params:,} ({plan.trainable_params:,} trainable); '
      + ('' if s.weights == 'float' else f'{s.weights} frozen base (decoder and lm_head), ') + 'float32 master weights, '
      f'gradients and AdamW moments, {cfg.dtype} compute (frozen kernels and tables held in it), remat {cfg.remat}',
      'global batch ' + (f'{cfg.batch_size} x {s.seq} tokens' if cfg.samples_per_row == 1 else
                         f'{cfg.batch_size} samples packed into {cfg.batch_size // cfg.samples_per_row} rows '
                         f'of {s.seq} tokens') + f' in {cfg.grad_accum} micro-batch(es), '
      f'{cfg.max_images} image(s) of {cfg.image_size}px per sample',
      f'transients at the peak of the step: the {plan.phase} phase (train/plan_model.py)',
      '',
      f'{"per device":<28}{"plan":>14}',
  ]
  lines += [f'{k:<28}{gib(b):>14}' for k, b in {**plan.state, **plan.transient}.items()]
  lines.append(f'{"total":<28}{gib(plan.total):>14}')
  figures = {'plan': plan.total}
  if xla is not None:
    figures['XLA'] = xla['xla_bytes_per_device']
    size = lambda k: gib(xla[f'{k}_bytes']).strip()
    lines += ['', f'XLA ({xla["backend"]}, compiled): arguments {size("argument")}, outputs '
              f'{size("output")} of which {size("alias")} alias the donated arguments, temporaries '
              f'{size("temp")}',
              f'{"XLA total":<28}{gib(xla["xla_bytes_per_device"]):>14}   '
              f'(plan / XLA = {plan.total / xla["xla_bytes_per_device"]:.3f})']
  lines += ['', f'{f"fits in {USABLE:.0%} of one device":<28}' + ''.join(f'{k:>14}' for k in figures)]
  for name, hbm in ACCELERATORS.items():
    verdict = ''.join(f'{"fits" if b <= USABLE * hbm * GiB else "no":>14}' for b in figures.values())
    lines.append(f'{f"{name} ({hbm} GiB)":<28}{verdict}')
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
  parser.add_argument('--batch', type=int, default=None,
                      help='global batch in samples (default: one row per batch shard and micro-batch)')
  parser.add_argument('--seq', type=int, default=None, help='tokens per row (default: seq_length)')
  parser.add_argument('--samples-per-row', type=int, default=1,
                      help="samples packed into each row (the trainer's samples_per_row): batch / this "
                           'rows of --seq tokens, this many times --images image slots each')
  parser.add_argument('--grad-accum', type=int, default=1,
                      help='micro-batches per step (the trainer\'s grad_accum); activations are one\'s')
  parser.add_argument('--dtype', default='bfloat16', help='compute dtype (the trainer\'s dtype)')
  parser.add_argument('--remat', default='none', choices=REMATS, help='the trainer\'s remat policy')
  parser.add_argument('--lora', action='store_true', help='train LoRA leaves only (the trainer\'s lora=true)')
  parser.add_argument('--weights', default='float', choices=['float', 'int8', 'int4'],
                      help='with --lora: the frozen base weight-only quantized (Q-LoRA); its bytes in the plan')
  parser.add_argument('--images', type=int, default=None,
                      help="image slots per sample (default: the stage's max_images)")
  parser.add_argument('--image-size', type=int, default=None,
                      help="image side in pixels (default: the stage's, 224 in stage 1, else 448)")
  parser.add_argument('--compile', action='store_true',
                      help='also compile the real train step for abstract inputs on the mesh and print '
                           "XLA's per-device memory (CPU: simulated devices, see train/plan_xla.py)")
  parser.add_argument('--json', action='store_true', help='print one JSON object')


def _devices(args: argparse.Namespace) -> int | None:
  """--devices, else this machine's device count when the mesh has a -1 to resolve."""
  if args.devices is not None or -1 not in sh.parse_mesh(args.mesh).values():
    return args.devices
  return jax.device_count()


def run(args: argparse.Namespace) -> int:
  """Prints the plan; a bad value or file prints one line `qwenvl-jax plan: error: ...` and exits 2."""
  try:
    if args.compile:  # before JAX starts its backend
      from train.plan_xla import prepare_cpu
      sizes = sh.parse_mesh(args.mesh)
      prepare_cpu(args.devices or (math.prod(sizes.values()) if -1 not in sizes.values() else 1))
    config = QwenVLConfig.from_json(args.config) if args.config is not None else qwen_vl_7b()
    if args.image_size is not None:
      _check_count('--image-size', args.image_size, config.vision.patch_size)
    plan = make_plan(config, args.mesh, stage=args.stage, batch=args.batch, seq=args.seq,
                     grad_accum=args.grad_accum, dtype=args.dtype, remat=args.remat, lora=args.lora,
                     rules=args.rules, images=args.images, image_size=args.image_size,
                     devices=_devices(args), weights=args.weights, samples_per_row=args.samples_per_row)
    xla = None
    if args.compile:
      from train.plan_xla import compile_step
      xla = compile_step(plan.setup)
  except (ValueError, OSError) as e:
    print(f'qwenvl-jax plan: error: {e}', file=sys.stderr)
    return 2
  if args.json:
    out = plan.to_json()
    if xla is not None:
      out.update(xla=xla, xla_bytes_per_device=xla['xla_bytes_per_device'],
                 plan_over_xla=plan.total / xla['xla_bytes_per_device'])
    print(json.dumps(out))
  else:
    print(format_plan(plan, xla))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='qwenvl-jax plan', description=__doc__.split('\n')[0])
  add_arguments(parser)
  return run(parser.parse_args(argv))


if __name__ == '__main__':
  sys.exit(main())
