"""`--compile`: the plan checked against XLA. Lowers and compiles the trainer's own step
(`layout.jit(make_train_step(...))`, train/state.py) for abstract inputs on the mesh and reads the
compiled program's per-device memory; nothing is allocated.

Simulated CPU devices need `XLA_FLAGS=--xla_force_host_platform_device_count=N` before JAX starts; on a
machine without an accelerator `prepare_cpu` sets it (and the low-precision options, see below) when the
user has not.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from qwenvl_jax import sharding, xla_flags

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def prepare_cpu(devices: int) -> None:
  """Before JAX starts its backend, on a machine without an accelerator: `devices` simulated CPU devices
  unless XLA_FLAGS already says how many, and the options that keep bfloat16 values at their own size
  (qwenvl_jax/xla_flags.py). Without those the CPU program holds a float32 copy of every bfloat16 weight
  and saved activation (XLA's CPU has no bfloat16 arithmetic and hoists the conversions out of the
  scans), which an accelerator never does; with them the compiled program is the one the plan models."""
  if not xla_flags.use_for_low_precision_cpu():
    return
  if DEVICE_COUNT_FLAG not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f'{os.environ["XLA_FLAGS"]} {DEVICE_COUNT_FLAG}={devices}'.strip()


def abstract_batch(setup, layout) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch of train/step.py as ShapeDtypeStructs on the batch sharding; every position a target."""
  cfg, b, t = setup.cfg, setup.cfg.batch_size // setup.cfg.samples_per_row, setup.seq  # rows
  s = cfg.image_size
  shapes = {'input_ids': ((b, t), jnp.int32), 'attention_mask': ((b, t), jnp.int32),
            'targets': ((b, t), jnp.int32), 'target_mask': ((b, t), jnp.float32),
            'pixel_values': ((b, cfg.max_images * cfg.samples_per_row, s, s, 3), jnp.float32)}
  place = lambda shape: sharding.batch_sharding(layout.mesh, layout.rules, shape)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=place(shape))
          for k, (shape, dtype) in shapes.items()}


def mesh_spec(sizes) -> str:
  return ','.join(f'{a}={n}' for a, n in sizes.items())


def compile_step(setup) -> dict[str, Any]:
  """XLA's per-device memory of the trainer's step: arguments, outputs, temporaries, aliasing counted once."""
  from qwenvl_jax.model import QwenVL
  from train.state import base_config, make_layout, run_optimizer
  from train.step import make_train_step
  need, have = math.prod(setup.sizes.values()), jax.device_count()
  if need != have:  # the trainer's mesh spans every device
    raise ValueError(
        f'mesh {mesh_spec(setup.sizes)} needs {need} devices but JAX sees {have} ({jax.default_backend()}); '
        f'on CPU simulate them: XLA_FLAGS={DEVICE_COUNT_FLAG}={need} (set before JAX starts)')
  model = QwenVL(setup.model_config)
  optimizer = run_optimizer(setup.cfg, model)
  layout = make_layout(setup.cfg, model, optimizer, mesh_spec(setup.sizes), setup.rules)
  step = layout.jit(make_train_step(QwenVL(base_config(setup.cfg, model.config)), optimizer, setup.cfg))
  m = step.lower(layout.abstract, abstract_batch(setup, layout)).compile().memory_analysis()
  fields = ('argument', 'output', 'alias', 'temp', 'generated_code')
  out = {f'{k}_bytes': int(getattr(m, f'{k}_size_in_bytes')) for k in fields}
  host = sum(int(getattr(m, f'host_{k}_size_in_bytes')) for k in fields)
  out['host_bytes'] = host
  out['backend'] = jax.default_backend()
  # Donated state: the outputs alias the arguments, so those bytes are counted once.
  out['xla_bytes_per_device'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
                                 + out['temp_bytes'])
  return out
