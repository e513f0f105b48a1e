"""Sharding on a device mesh: mesh builder, logical axis names, rule sets, sharded init and batches.

The mesh always has three axes, in this order:
  data    pure data parallelism: parameters replicated, the batch split.
  fsdp    fully sharded data parallelism: parameters (and optimizer state) split along their 'embed'
          dimension, the batch split too; XLA gathers each weight where a layer uses it.
  tensor  tensor (Megatron) parallelism: attention heads, MLP width and vocabulary split, activations
          split the same way inside a block.

Every parameter leaf has logical axis names (`PARAM_AXES`, keyed by its Flax path); a rule set maps logical
names to mesh axes. A dimension is split only when its size divides evenly, otherwise it stays replicated
(e.g. the tiny test ViT's MLP width 315), so any rule set works on any config. Activations are constrained
with `constrain(x, names)`, a no-op outside `with use_rules(mesh, rules):`.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import math
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
Path = tuple[str, ...]
Rules = Mapping[str, Any]  # logical name -> mesh axis, tuple of mesh axes, or None

_D = ('decoder', 'layers')
_V = ('visual', 'blocks')
_P = ('visual', 'attn_pool')

# Logical names of every parameter leaf of `QwenVL(cfg).init`, by Flax path (without the 'params' key).
PARAM_AXES: dict[Path, tuple[str, ...]] = {
    ('wte', 'embedding'): ('vocab', 'embed'),
    _D + ('ln_1', 'scale'): ('layers', 'norm'),
    _D + ('ln_2', 'scale'): ('layers', 'norm'),
    _D + ('attn', 'c_attn', 'kernel'): ('layers', 'embed', 'qkv', 'heads', 'head_dim'),
    _D + ('attn', 'c_attn', 'bias'): ('layers', 'qkv', 'heads', 'head_dim'),
    _D + ('attn', 'c_proj', 'kernel'): ('layers', 'heads', 'head_dim', 'embed'),
    _D + ('mlp', 'w1', 'kernel'): ('layers', 'embed', 'mlp'),
    _D + ('mlp', 'w2', 'kernel'): ('layers', 'embed', 'mlp'),
    _D + ('mlp', 'c_proj', 'kernel'): ('layers', 'mlp', 'embed'),
    ('decoder', 'ln_f', 'scale'): ('norm',),
    ('lm_head', 'kernel'): ('embed', 'vocab'),
    ('visual', 'conv1', 'kernel'): ('patch', 'patch', 'channel', 'vit_embed'),
    ('visual', 'positional_embedding'): ('position', 'vit_embed'),
    ('visual', 'ln_pre', 'scale'): ('norm',),
    ('visual', 'ln_pre', 'bias'): ('norm',),
    _V + ('ln_1', 'scale'): ('layers', 'norm'),
    _V + ('ln_1', 'bias'): ('layers', 'norm'),
    _V + ('ln_2', 'scale'): ('layers', 'norm'),
    _V + ('ln_2', 'bias'): ('layers', 'norm'),
    _V + ('in_proj', 'kernel'): ('layers', 'vit_embed', 'qkv', 'vit_heads', 'head_dim'),
    _V + ('in_proj', 'bias'): ('layers', 'qkv', 'vit_heads', 'head_dim'),
    _V + ('out_proj', 'kernel'): ('layers', 'vit_heads', 'head_dim', 'vit_embed'),
    _V + ('out_proj', 'bias'): ('layers', 'vit_embed'),
    _V + ('c_fc', 'kernel'): ('layers', 'vit_embed', 'vit_mlp'),
    _V + ('c_fc', 'bias'): ('layers', 'vit_mlp'),
    _V + ('c_proj', 'kernel'): ('layers', 'vit_mlp', 'vit_embed'),
    _V + ('c_proj', 'bias'): ('layers', 'vit_embed'),
    _P + ('kv_proj', 'kernel'): ('vit_embed', 'embed'),
    _P + ('pos_embed',): ('queries', 'embed'),
    _P + ('query',): ('queries', 'embed'),
    _P + ('ln_q', 'scale'): ('norm',),
    _P + ('ln_q', 'bias'): ('norm',),
    _P + ('ln_kv', 'scale'): ('norm',),
    _P + ('ln_kv', 'bias'): ('norm',),
    _P + ('in_proj', 'kernel'): ('embed', 'qkv', 'heads', 'head_dim'),
    _P + ('in_proj', 'bias'): ('qkv', 'heads', 'head_dim'),
    _P + ('out_proj', 'kernel'): ('heads', 'head_dim', 'embed'),
    _P + ('out_proj', 'bias'): ('embed',),
    ('visual', 'ln_post', 'scale'): ('norm',),
    ('visual', 'ln_post', 'bias'): ('norm',),
    ('visual', 'proj'): ('embed', 'embed'),
}

# Activation names; the 'act_' ones are kept apart from the parameter names so that FSDP can split a
# weight's 'embed' while the activation's embed stays whole.
ACTIVATION_AXES = ('batch', 'length', 'act_embed', 'act_heads', 'act_mlp', 'act_vocab', 'head_dim')
LOGICAL_NAMES = frozenset(n for names in PARAM_AXES.values() for n in names) | set(ACTIVATION_AXES)

_BATCH = {'batch': ('data', 'fsdp')}
_FSDP = {'embed': 'fsdp', 'vit_embed': 'fsdp'}
_TP = {name: 'tensor' for name in (
    'heads', 'vit_heads', 'mlp', 'vit_mlp', 'vocab', 'act_heads', 'act_mlp', 'act_vocab')}
RULE_SETS: dict[str, dict[str, Any]] = {
    'fsdp': {**_BATCH, **_FSDP},
    'tp': {**_BATCH, **_TP},
    'fsdp_tp': {**_BATCH, **_FSDP, **_TP},
}


def get_rules(rules: str | Rules) -> dict[str, Any]:
  """A rule set by name ('fsdp', 'tp', 'fsdp_tp') or a validated custom mapping."""
  if isinstance(rules, str):
    if rules not in RULE_SETS:
      raise ValueError(f'unknown sharding rules {rules!r}; expected one of {sorted(RULE_SETS)}')
    return dict(RULE_SETS[rules])
  unknown = set(rules) - LOGICAL_NAMES
  if unknown:
    raise ValueError(f'rules name unknown logical axes {sorted(unknown)}; known: {sorted(LOGICAL_NAMES)}')
  for name, axes in rules.items():
    bad = [a for a in _as_tuple(axes) if a not in MESH_AXES]
    if bad:
      raise ValueError(f'rule {name!r} -> {axes!r} names unknown mesh axes {bad}; mesh axes are {MESH_AXES}')
  return dict(rules)


def default_rules(mesh_shape: Mapping[str, int]) -> str:
  """The rule set that uses every axis of the mesh: tensor parallelism only when the mesh has it."""
  if mesh_shape.get('tensor', 1) > 1:
    return 'fsdp_tp' if mesh_shape.get('fsdp', 1) > 1 else 'tp'
  return 'fsdp'


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


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

def spec_for(names: Sequence[str | None], shape: Sequence[int], sizes: Mapping[str, int],
             rules: Rules) -> PartitionSpec:
  """PartitionSpec for one array. A mesh axis is used once (first dimension wins); a dimension that
  does not divide evenly drops trailing mesh axes of its rule until it does, down to replicated."""
  if len(names) != len(shape):
    raise ValueError(f'logical axes {tuple(names)} do not match an array of rank {len(shape)} {tuple(shape)}')
  used: set[str] = set()
  out = []
  for name, size in zip(names, shape):
    if name is not None and name not in LOGICAL_NAMES:
      raise ValueError(f'unknown logical axis {name!r}; known: {sorted(LOGICAL_NAMES)}')
    axes = [a for a in _as_tuple(rules.get(name)) if a not in used and sizes.get(a, 1) > 1]
    while axes and size % math.prod(sizes[a] for a in axes):
      axes.pop()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*out)


def shard_shape(shape: Sequence[int], spec: PartitionSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
  """The per-device block of an array of `shape` under `spec`, from mesh sizes alone."""
  return tuple(d // math.prod(sizes[a] for a in _as_tuple(axes)) for d, axes in zip(shape, spec))


def logical_sharding(mesh: Mesh, rules: Rules, names: Sequence[str | None],
                     shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, spec_for(names, shape, dict(mesh.shape), rules))


def _dict_keys(path) -> Path:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _param_path(path) -> Path:
  keys = _dict_keys(path)
  return keys[1:] if keys[:1] == ('params',) else keys


def _names(path, leaf) -> tuple[str, ...]:
  key = _param_path(path)
  if key not in PARAM_AXES:
    raise KeyError(f'no logical axes for parameter {"/".join(key)}; add it to sharding.PARAM_AXES')
  if len(PARAM_AXES[key]) != np.ndim(leaf):
    raise ValueError(f'parameter {"/".join(key)} has shape {np.shape(leaf)} but logical axes '
                     f'{PARAM_AXES[key]}')
  return PARAM_AXES[key]


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
  """NamedShardings for a params tree (arrays or ShapeDtypeStructs); every leaf must be in PARAM_AXES."""
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
      names = PARAM_AXES.get(keys[i:])
      if names is not None and len(names) == np.ndim(leaf):
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
  from qwenvl_jax.model import param_shapes  # the model imports this module for `constrain`
  shapes = param_shapes(model)
  return with_shardings(shapes, param_shardings(mesh, shapes, rules))


def shard_init(model, mesh: Mesh, rules: str | Rules, rng: jax.Array) -> Any:
  """`init_params` compiled with sharded outputs: each device creates only its own slices.

  With JAX's partitionable threefry (the default) the values equal a single-device init with the same rng.
  """
  from qwenvl_jax.model import init_params
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


# ----------------------------------------------------------------------- activation constraints

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar('sharding', default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: str | Rules) -> Iterator[None]:
  """Turns on `constrain` for functions traced inside the block.

  jit's trace cache does not see this context: a function traced outside it (or for another mesh) is
  reused as traced. `sharded_jit` gives each (mesh, rules) its own jit, hence its own cache.
  """
  token = _ACTIVE.set((mesh, get_rules(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def rules_active() -> bool:
  """Whether functions traced now are traced inside `use_rules`."""
  return _ACTIVE.get() is not None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names when `use_rules` is active, else x unchanged."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, rules, names, x.shape))


def sharded_jit(fn, mesh: Mesh, rules: str | Rules, **jit_kwargs):
  """`jax.jit(fn, **jit_kwargs)` (in_shardings, out_shardings, donate_argnums...) whose trace runs under
  `use_rules(mesh, rules)`, so the model's activation constraints apply; one compiled cache per call."""
  rules = get_rules(rules)

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with use_rules(mesh, rules):
      return fn(*args, **kwargs)
  return jax.jit(traced, **jit_kwargs)
