"""Logical axis names, rule sets mapping them to mesh axes, and `constrain`: what the model layers need.

The mesh always has three axes, in this order:
  data    pure data parallelism: parameters replicated, the batch split.
  fsdp    fully sharded data parallelism: parameters (and optimizer state) split along their 'embed'
          dimension, the batch split too; XLA gathers each weight where a layer uses it.
  tensor  tensor (Megatron) parallelism: attention heads, MLP width and vocabulary split, activations
          split the same way inside a block.

Each parameter's logical names are annotated where the model defines it (`Einsum(kernel_axes=...)`,
`nn.with_logical_partitioning`); a rule set maps logical names to mesh axes. A dimension is split only
when its size divides evenly, otherwise it stays replicated (e.g. the tiny test ViT's MLP width 315), so
any rule set works on any config. Activations are constrained with `constrain(x, names)`, a no-op outside
`with use_rules(mesh, rules):`. This module sits below the model; mesh building, placement and sharded
jit sit above it, in `sharding`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
Rules = Mapping[str, Any]  # logical name -> mesh axis, tuple of mesh axes, or None

PARAM_NAMES = ('vocab', 'embed', 'layers', 'norm', 'qkv', 'heads', 'head_dim', 'mlp', 'patch', 'channel',
               'vit_embed', 'position', 'vit_heads', 'vit_mlp', 'queries', 'quant_groups', 'lora_rank')
# Activation names; the 'act_' ones are kept apart from the parameter names so that FSDP can split a
# weight's 'embed' while the activation's embed stays whole.
ACTIVATION_AXES = ('batch', 'length', 'act_embed', 'act_heads', 'act_mlp', 'act_vocab', 'head_dim')
LOGICAL_NAMES = frozenset(PARAM_NAMES) | set(ACTIVATION_AXES)

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
    bad = [a for a in as_tuple(axes) if a not in MESH_AXES]
    if bad:
      raise ValueError(f'rule {name!r} -> {axes!r} names unknown mesh axes {bad}; mesh axes are {MESH_AXES}')
  return dict(rules)


def as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


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
    axes = [a for a in as_tuple(rules.get(name)) if a not in used and sizes.get(a, 1) > 1]
    while axes and size % math.prod(sizes[a] for a in axes):
      axes.pop()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*out)


def logical_sharding(mesh: Mesh, rules: Rules, names: Sequence[str | None],
                     shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, spec_for(names, shape, dict(mesh.shape), rules))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar('sharding', default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: str | Rules) -> Iterator[None]:
  """Turns on `constrain` for functions traced inside the block.

  jit's trace cache does not see this context: a function traced outside it (or for another mesh) is
  reused as traced. `sharding.sharded_jit` gives each (mesh, rules) its own jit, hence its own cache.
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
