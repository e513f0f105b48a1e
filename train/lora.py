"""LoRA as the official finetune.py configures it: rank 64, alpha 16, dropout 0.05 on the decoder's
c_attn, attn.c_proj, w1 and w2 (PEFT matches these names only in the LLM).

The model applies LoRA where each weight is used (`qwenvl_jax.lora`): `y = x @ W + (alpha / r) *
(dropout(x) @ A) @ B`, per layer under the decoder's scan, dropout drawn per token and feature as PEFT's
`B(A(dropout(x)))`. The LoRA tree is the model's variable collection 'lora', shaped like the modules:
`{'decoder': {'layers': {'attn': {'c_attn': {'a': [L, d, r], 'b': [L, r, 3, h, k]}, 'c_proj': {'a': [L, h,
k, r], 'b': [L, r, d]}}, 'mlp': {'w1': .., 'w2': ..}}}}`: A over the kernel's input dims, B over its output
dims. The train step differentiates it alone (`train/optim.py: partition`).

Q-LoRA: over a weight-only quantized base (`qwenvl_jax.quant`: 'q' and 'scale' in place of 'kernel'), the
base stays int8/int4 in the state, frozen, and the model runs on it as it is: each layer's kernel is
dequantized where it is used (in the backward pass again), so neither the float base nor a merged kernel
is ever formed. The merge exports float kernels.

Earlier versions merged `base + (alpha / r) * A @ B` for every layer before the model ran (with one dropout
mask per input feature shared by all tokens) and stored the factors as {target: {'a': [L, in, r], 'b':
[L, r, out]}}; `check_layout` names that layout where a checkpoint holds it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from qwenvl_jax.lora import TARGETS as TARGET_NAMES, LoraConfig, init_a, init_b
from qwenvl_jax.params import get_path, set_path
from qwenvl_jax.quant import dequantize_kernel, dequantize_params, is_quantized, kernel_shape

Path = tuple[str, ...]
# target name -> (kernel path, number of input axes after the stacked layer axis); the factors live at the
# kernel's module path.
TARGETS: dict[str, tuple[Path, int]] = {
    'c_attn': (('decoder', 'layers', 'attn', 'c_attn', 'kernel'), 1),  # [L, d, 3, h, k]
    'attn.c_proj': (('decoder', 'layers', 'attn', 'c_proj', 'kernel'), 2),  # [L, h, k, d]
    'w1': (('decoder', 'layers', 'mlp', 'w1', 'kernel'), 1),  # [L, d, f]
    'w2': (('decoder', 'layers', 'mlp', 'w2', 'kernel'), 1),  # [L, d, f]
}
assert tuple(TARGETS) == TARGET_NAMES


def lora_config(cfg: Any) -> LoraConfig:
  """The model's LoRA settings of a TrainConfig (lora_targets, lora_rank, lora_alpha, lora_dropout)."""
  return LoraConfig(tuple(cfg.lora_targets), cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)


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
  """The float kernel's shape at `path` (a quantized base: its values', int4 two per byte unpacked)."""
  parent = get_path(params, path[:-1])
  if 'q' in parent:
    return kernel_shape(parent['q'], path[:-1] + ('q',))
  return tuple(parent[path[-1]].shape)


def init_lora(params: Mapping, targets: tuple[str, ...], rank: int, rng: jax.Array) -> dict:
  """The 'lora' collection of the model (see the module doc), float32, for the stacked params `params`
  (float or quantized); A as PEFT (kaiming-uniform, a=sqrt(5), i.e. U(+-1/sqrt(in))), B zero, so training
  starts from the base model exactly."""
  lora: dict = {}
  for name, key in zip(targets, jax.random.split(rng, len(targets))):
    path, n_in = _target(name)
    shape = _shape(params, path)
    layers, ins, outs = shape[0], shape[1:1 + n_in], shape[1 + n_in:]
    a = init_a(key, (layers, math.prod(ins), rank), 1).reshape((layers,) + ins + (rank,))
    set_path(lora, path[:-1], {'a': a, 'b': init_b(key, (layers, rank) + outs)})
  return lora


def check_layout(lora: Any, where: str) -> None:
  """Refuses a LoRA tree (or its checkpoint metadata) in the layout of earlier versions, by name."""
  if isinstance(lora, Mapping) and set(lora) & set(TARGETS):
    raise ValueError(
        f'{where} holds LoRA factors in the layout of an earlier version ({{target: {{a, b}}}} merged into '
        'the kernels before the model ran); LoRA now applies inside the model and stores its factors as '
        "the model's 'lora' collection ({'decoder': {'layers': ...}}). That run cannot be resumed: start "
        'a new run (its base weights and data are unchanged)')


def merge_lora(params: Mapping, lora: Mapping, alpha: float) -> dict:
  """The base params with the LoRA updates folded in, for export: every target kernel becomes
  base + (alpha / r) * A @ B in float32 (no dropout). A quantized base comes back float32 throughout."""
  check_layout(lora, 'the LoRA tree')
  out = jax.tree.map(lambda x: x, dict(params))
  for name, (path, n_in) in TARGETS.items():
    parent = get_path(out, path[:-1])  # out's own dicts: the base tree keeps its leaves
    try:
      factors = get_path(lora, path[:-1])
    except KeyError:
      continue
    base = _base(params, path)
    if 'q' in parent:
      del parent['q'], parent['scale']
    a, b = factors['a'], factors['b']  # [L, *in, r], [L, r, *out]
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    b = b.reshape(b.shape[:2] + (-1,))
    delta = jnp.einsum('lir,lro->lio', a, b) * (alpha / a.shape[-1])
    set_path(out, path, (base.astype(jnp.float32) + delta.reshape(base.shape)).astype(base.dtype))
  return dequantize_params(out) if is_quantized(out) else out
