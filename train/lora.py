"""LoRA as the official finetune.py configures it: rank 64, alpha 16, dropout 0.05 on the decoder's
c_attn, attn.c_proj, w1 and w2 (PEFT matches these names only in the LLM).

The model is not changed: LoRA weights live in their own tree, stacked per layer like the base leaves,
and the effective kernel `base + (alpha / r) * A @ B` is formed inside the loss. Because of that, dropout
cannot act on each token's LoRA input as in PEFT (`B(A(dropout(x)))`): here one dropout mask over the
input features of A is drawn per step and layer and shared by all tokens of the batch, which is what a
merged weight can express. Exact PEFT dropout needs a hook in the model's Einsum.

Q-LoRA: over a weight-only quantized base (`qwenvl_jax.quant`: 'q' and 'scale' in place of 'kernel'),
the base stays int8/int4 in the state, frozen; each step dequantizes it in the loss (w = scale * q), adds
the LoRA updates to the targets and runs the float model, so the model is applied with weights='float'.
The merge exports float kernels.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp

from qwenvl_jax.params import get_path, set_path
from qwenvl_jax.quant import dequantize_kernel, dequantize_params, is_quantized

Path = tuple[str, ...]
# target name -> (kernel path, number of input axes after the stacked layer axis)
TARGETS: dict[str, tuple[Path, int]] = {
    'c_attn': (('decoder', 'layers', 'attn', 'c_attn', 'kernel'), 1),  # [L, d, 3, h, k]
    'attn.c_proj': (('decoder', 'layers', 'attn', 'c_proj', 'kernel'), 2),  # [L, h, k, d]
    'w1': (('decoder', 'layers', 'mlp', 'w1', 'kernel'), 1),  # [L, d, f]
    'w2': (('decoder', 'layers', 'mlp', 'w2', 'kernel'), 1),  # [L, d, f]
}


def _target(name: str) -> tuple[Path, int]:
  if name not in TARGETS:
    raise ValueError(f'unknown LoRA target {name!r}; supported: {sorted(TARGETS)}')
  return TARGETS[name]


def _base(params: Mapping, path: Path) -> jax.Array:
  """The float32 kernel at `path`: the leaf itself, or w = scale * q of a quantized base."""
  parent = get_path(params, path[:-1])
  if 'q' in parent:
    return dequantize_kernel(parent['q'], parent['scale'], path[:-1] + ('q',), jnp.float32)
  return get_path(params, path)


def _shape(params: Mapping, path: Path) -> tuple[int, ...]:
  parent = get_path(params, path[:-1])
  return tuple(parent['q' if 'q' in parent else path[-1]].shape)


def _fan(shape: tuple[int, ...], n_in: int) -> tuple[int, int]:
  return math.prod(shape[1:1 + n_in]), math.prod(shape[1 + n_in:])


def init_lora(params: Mapping, targets: tuple[str, ...], rank: int, rng: jax.Array) -> dict:
  """{target: {'a': [L, in, r], 'b': [L, r, out]}}, float32; A as PEFT (kaiming-uniform, a=sqrt(5),
  i.e. U(+-1/sqrt(in))), B zero, so training starts from the base model exactly."""
  lora = {}
  for name, key in zip(targets, jax.random.split(rng, len(targets))):
    path, n_in = _target(name)
    shape = _shape(params, path)
    fan_in, fan_out = _fan(shape, n_in)
    bound = 1.0 / math.sqrt(fan_in)
    lora[name] = {'a': jax.random.uniform(key, (shape[0], fan_in, rank), jnp.float32, -bound, bound),
                  'b': jnp.zeros((shape[0], rank, fan_out), jnp.float32)}
  return lora


def apply_lora(params: Mapping, lora: Mapping, alpha: float, dropout: float = 0.0,
               rng: jax.Array | None = None) -> dict:
  """params with every LoRA target replaced by base + (alpha / r) * A @ B (dropout on A's input rows when
  rng is given). The base tree is not modified. A quantized base comes back float32 throughout."""
  out = jax.tree.map(lambda x: x, dict(params))
  for i, (name, ab) in enumerate(sorted(lora.items())):
    path, n_in = _target(name)
    base = _base(params, path)
    parent = get_path(out, path[:-1])  # out's own dicts: the base tree keeps its leaves
    if 'q' in parent:
      del parent['q'], parent['scale']
    a, b = ab['a'], ab['b']  # [L, in, r], [L, r, out]
    if rng is not None and dropout > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - dropout, a.shape[:2])
      a = a * (keep[..., None] / (1.0 - dropout)).astype(a.dtype)
    delta = jnp.einsum('lir,lro->lio', a, b) * (alpha / a.shape[-1])
    set_path(out, path, (base.astype(jnp.float32) + delta.reshape(base.shape)).astype(base.dtype))
  return dequantize_params(out) if is_quantized(out) else out


def merge_lora(params: Mapping, lora: Mapping, alpha: float) -> dict:
  """The base params with the LoRA updates folded in, for export (no dropout)."""
  return apply_lora(params, lora, alpha)
