"""Sharding on a device mesh, above the model: mesh builder, parameter specs, sharded init, placement, jit.

Logical names, rule sets and `constrain` live below the model, in `logical` (re-exported here). Each
parameter's logical names are read from the model's own annotations (`param_layout.leaf_axes`).
"""
from __future__ import annotations

import argparse
import functools
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qwenvl_jax import param_layout
from qwenvl_jax.logical import (ACTIVATION_AXES, LOGICAL_NAMES, MESH_AXES, RULE_SETS, Rules,  # noqa: F401
                                as_tuple, constrain, get_rules, logical_sharding, rules_active, spec_for,
                                use_rules)
from qwenvl_jax.model import init_params, param_shapes

Path = tuple[str, ...]


def default_rules(mesh_shape: Mapping[str, int]) -> str:
  """The rule set that uses every axis of the mesh: tensor parallelism only when the mesh has it."""
  if mesh_shape.get('tensor', 1) > 1:
    return 'fsdp_tp' if mesh_shape.get('fsdp', 1) > 1 else 'tp'
  return 'fsdp'


# ---------------------------------------------------------------------------------------------- mesh

def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
  """'data=2,fsdp=2,tensor=2', or sizes in the order data x fsdp x tensor: '2x4', '2x2x2', '8'.

  Absent axes are 1; at most one size may be -1 ("the rest of the devices").
  """
  if not isinstance(spec, str):
    sizes = dict(spec)
  elif '=' in spec:
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(','))):
      name, _, value = part.partition('=')
      if name.strip() in sizes:
        raise ValueError(f'mesh {spec!r}: axis {name.strip()!r} given twice')
      sizes[name.strip()] = _mesh_int(value, spec)
  elif re.fullmatch(r'\s*-?\d+(\s*x\s*-?\d+){0,2}\s*', spec):
    sizes = {MESH_AXES[i]: _mesh_int(v, spec) for i, v in enumerate(spec.split('x'))}
  else:
    raise ValueError(f'mesh {spec!r}: expected e.g. "data=2,fsdp=4,tensor=1" or "2x4" (data x fsdp) '
                     'or "2x2x2" (data x fsdp x tensor)')
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'mesh {spec!r}: unknown axes {sorted(unknown)}; mesh axes are {MESH_AXES}')
  sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
  if any(s == 0 or s < -1 for s in sizes.values()) or list(sizes.values()).count(-1) > 1:
    raise ValueError(f'mesh {spec!r}: sizes must be positive, with at most one -1 (the rest)')
  return sizes


def _mesh_int(value: str, spec: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'mesh {spec!r}: size {value!r} is not an integer') from None


def mesh_shape(spec: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Axis sizes for `num_devices` devices, -1 resolved; needs no devices (used by `plan`)."""
  sizes = parse_mesh(spec)
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    if num_devices % known:
      raise ValueError(f'mesh {spec!r}: {num_devices} devices do not divide by the fixed axes ({known})')
    sizes = {a: num_devices // known if s == -1 else s for a, s in sizes.items()}
  elif known != num_devices:
    raise ValueError(f'mesh {spec!r} needs {known} devices but {num_devices} are given; '
                     'use -1 for "the rest" or pass the devices to use')
  return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, *, data: int = -1, fsdp: int = 1,
              tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(spec if spec is not None else dict(data=data, fsdp=fsdp, tensor=tensor), len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  # Auto axes: the pjit model (in/out shardings plus constraints), not explicit sharding in types.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """--mesh and --rules, shared by the CLIs."""
  parser.add_argument('--mesh', default='data=-1',
                      help='mesh axis sizes: "data=2,fsdp=4,tensor=1" or "2x4" (data x fsdp) or "2x2x2" '
                           '(data x fsdp x tensor); -1 = the rest of the devices (default: data=-1)')
  parser.add_argument('--rules', default=None, choices=sorted(RULE_SETS),
                      help='parameter sharding rules (default: fsdp, or fsdp_tp / tp when tensor > 1)')


# ------------------------------------------------------------------------------------- specs

def shard_shape(shape: Sequence[int], spec: PartitionSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
  """The per-device block of an array of `shape` under `spec`, from mesh sizes alone; dimensions past the
  end of a shorter spec (e.g. `PartitionSpec()` of a replicated leaf) stay whole."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  return tuple(d // math.prod(sizes[a] for a in as_tuple(axes)) for d, axes in zip(shape, spec))


def _dict_keys(path) -> Path:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _param_path(path) -> Path:
  keys = _dict_keys(path)
  return keys[1:] if keys[:1] == ('params',) else keys


def _names(path, leaf) -> tuple[str, ...]:
  return param_layout.leaf_axes(_param_path(path), np.shape(leaf))


def logical_axes(params: Any) -> dict[Path, tuple[str, ...]]:
  """Flax path -> logical names for every leaf of a params tree (with or without the top 'params' key)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {_param_path(path): _names(path, leaf) for path, leaf in flat}


def param_specs(params: Any, sizes: Mapping[str, int], rules: str | Rules) -> Any:
  """PartitionSpecs of a params tree for a mesh shape; needs no devices (used by `plan`)."""
  rules = get_rules(rules)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: spec_for(_names(path, leaf), np.shape(leaf), sizes, rules), params)


def param_shardings(mesh: Mesh, params: Any, rules: str | Rules) -> Any:
  """NamedShardings for a params tree (arrays or ShapeDtypeStructs) of any form (`param_layout`)."""
  rules = get_rules(rules)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: logical_sharding(mesh, rules, _names(path, leaf), np.shape(leaf)), params)


def state_specs(state: Any, sizes: Mapping[str, int], rules: str | Rules) -> Any:
  """PartitionSpecs for any tree holding params-shaped subtrees (train state, optimizer moments).

  A leaf whose dict path ends with a parameter path and has that parameter's rank is split like it;
  everything else (step counters, scalars, factored statistics) is replicated.
  """
  rules = get_rules(rules)

  def one(path, leaf):
    keys = _dict_keys(path)
    for i in range(len(keys)):
      try:
        names = param_layout.leaf_axes(keys[i:], np.shape(leaf))
      except (KeyError, ValueError):
        continue
      return spec_for(names, np.shape(leaf), sizes, rules)
    return PartitionSpec()
  return jax.tree_util.tree_map_with_path(one, state)


def state_shardings(mesh: Mesh, state: Any, rules: str | Rules) -> Any:
  """NamedShardings of `state_specs` on a mesh."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, dict(mesh.shape), rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: restore targets for Orbax, abstract inputs for lowering."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


# ---------------------------------------------------------------------------------- placement

def abstract_params(model, mesh: Mesh, rules: str | Rules) -> Any:
  """The params as ShapeDtypeStructs carrying their target shardings; nothing is allocated.

  This is the restore target for Orbax (`StandardCheckpointer().restore(path, target)`): each process then
  reads only the slices of its own devices.
  """
  shapes = param_shapes(model)
  return with_shardings(shapes, param_shardings(mesh, shapes, rules))


def shard_init(model, mesh: Mesh, rules: str | Rules, rng: jax.Array) -> Any:
  """`init_params` compiled with sharded outputs: each device creates only its own slices.

  With JAX's partitionable threefry (the default) the values equal a single-device init with the same rng.
  """
  shardings = jax.tree.map(lambda x: x.sharding, abstract_params(model, mesh, rules))
  return jax.jit(functools.partial(init_params, model), out_shardings=shardings)(rng)


def put(tree: Any, shardings: Any) -> Any:
  """Arrays onto shardings. Host arrays (numpy, memory-mapped): each process reads only the slices its
  devices hold, so this works across hosts without any host holding more than its share on device.
  jax.Arrays move device to device, never through the host."""
  def one(x, s):
    if isinstance(x, jax.Array):
      return jax.device_put(x, s)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x[idx]))
  return jax.tree.map(one, tree, shardings)


def shard_params(mesh: Mesh, params: Any, rules: str | Rules) -> Any:
  """A host params tree (e.g. from `params_from_hf`) placed on its target shardings."""
  return put(params, param_shardings(mesh, params, rules))


def batch_sharding(mesh: Mesh, rules: str | Rules, shape: Sequence[int]) -> NamedSharding:
  """Leading dimension on the batch axes ('data' and 'fsdp'), the rest replicated."""
  return logical_sharding(mesh, get_rules(rules), ('batch',) + (None,) * (len(shape) - 1), shape)


def shard_batch(mesh: Mesh, rules: str | Rules, batch: Any) -> Any:
  """A tree of global host arrays split along their leading (batch or image) dimension.

  Every process passes the same global arrays; for per-process loading see `distributed.host_to_global`.
  """
  return put(batch, jax.tree.map(lambda x: batch_sharding(mesh, rules, np.shape(x)), batch))


# ---------------------------------------------------------------------------------------- jit

def sharded_jit(fn, mesh: Mesh, rules: str | Rules, **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)` (in_shardings, out_shardings, donate_argnums...) whose trace runs under
  `use_rules(mesh, rules)`, so the model's activation constraints apply; one compiled cache per call."""
  rules = get_rules(rules)

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with use_rules(mesh, rules):
      return fn(*args, **kwargs)
  return jax.jit(traced, **jit_kwargs)
