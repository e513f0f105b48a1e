"""LoRA inside the model: `y = x @ W + (alpha / r) * (dropout(x) @ A) @ B`, added where each weight is used.

A target `Einsum` (`LoraConfig.targets`, the decoder's c_attn, attn.c_proj, w1, w2 as PEFT names them)
reads its factors from the variable collection 'lora', beside its own 'kernel' (or quantized 'q' and
'scale'): A [*in, r] over the kernel's contracted dims, B [r, *out] over the dims it keeps, stacked over
the layers by the decoder's scan like the params. The weight itself is never changed, so a quantized base
is dequantized one layer at a time where it is used and no float copy of it or of `W + A @ B` is formed;
dropout acts on each token's input to A, as PEFT's `B(A(dropout(x)))`. The merged kernel (export) is
`train/lora.py: merge_lora`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

TARGETS = ('c_attn', 'attn.c_proj', 'w1', 'w2')  # PEFT's names; PEFT matches them only in the LLM
RANK_AXIS = 'lora_rank'  # the logical name of the rank dim: no rule splits it


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which decoder weights carry LoRA factors and how they apply (the official finetune.py's values)."""
  targets: tuple[str, ...] = TARGETS
  rank: int = 64
  alpha: float = 16.0
  dropout: float = 0.05

  def __post_init__(self):
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not isinstance(self.targets, tuple):
      raise ValueError(f'unknown LoRA target(s) {unknown or self.targets!r}; supported: {list(TARGETS)}')
    if self.rank < 1:
      raise ValueError(f'LoRA rank must be at least 1, got {self.rank}')
    if not 0 <= self.dropout < 1:
      raise ValueError(f'LoRA dropout must lie in [0, 1), got {self.dropout}')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def lora_of(config: LoraConfig | None, target: str) -> LoraConfig | None:
  """`config` where it puts LoRA on `target`, else None (the Einsum of that weight has no factors)."""
  return config if config is not None and target in config.targets else None


def init_a(key: jax.Array, shape: tuple[int, ...], n_in: int, dtype=jnp.float32) -> jax.Array:
  """PEFT's A, kaiming-uniform with a=sqrt(5): U(+-1/sqrt(fan_in)), fan_in the product of the n_in dims
  before the rank (shape: [*leading, *in, r])."""
  bound = 1.0 / math.sqrt(math.prod(shape[-1 - n_in:-1]))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def init_b(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """PEFT's B: zero, so a model with fresh factors computes exactly the base model."""
  del key
  return jnp.zeros(shape, dtype)


def dims(eqn: str) -> tuple[str, str, str]:
  """(contracted dims, kept dims, a free letter for the rank) of an Einsum equation 'x,w->out'."""
  x_dims, rest = eqn.split(',')
  w_dims, out = rest.split('->')
  rank = next(c for c in 'rzyxwvu' if c not in eqn)
  return ''.join(c for c in w_dims if c not in out), ''.join(c for c in w_dims if c in out), rank


def update(eqn: str, x: jax.Array, a: jax.Array, b: jax.Array, scale: float, dropout: float,
           rng: jax.Array | None) -> jax.Array:
  """(alpha / r) * (dropout(x) @ A) @ B in the layout of the equation's output (dropout when rng is given)."""
  x_dims, rest = eqn.split(',')
  out = rest.split('->')[1]
  contracted, kept, r = dims(eqn)
  if rng is not None and dropout > 0:
    keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
    x = jnp.where(keep, x / jnp.asarray(1.0 - dropout, x.dtype), jnp.zeros((), x.dtype))
  low = ''.join(c for c in x_dims if c not in contracted) + r
  u = jnp.einsum(f'{x_dims},{contracted}{r}->{low}', x, a.astype(x.dtype))
  return jnp.einsum(f'{low},{r}{kept}->{out}', u, b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)
