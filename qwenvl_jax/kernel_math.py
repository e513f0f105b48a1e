"""The math the model's layers and the CPU kernels share: attention, and the weight-only quantized kernel.

Below both `layers` (which picks a CPU kernel where one runs) and `cpu_kernels` (which falls back to this
math elsewhere), so neither imports the other's caller.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any


def attend(q: Array, k: Array, v: Array, mask: Array | None, dtype: Dtype) -> Array:
  """Softmax attention with logits and softmax in float32. q [b,t,h,k], k/v [b,s,h,k], mask [b,t,s]."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = jnp.einsum('bthk,bshk->bhts', q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum('bhts,bshk->bthk', probs, v.astype(dtype))


WEIGHTS = ('float', 'int8', 'int4')  # an Einsum's kernel: as it is, or weight-only quantized (`quant`)
GROUPS_AXIS = 'quant_groups'  # a quantized kernel's scale: its groups along the contracted dims


def quant_groups(contracted: int, weights: str, group_size: int) -> int:
  """Scale groups along a kernel's `contracted` inputs: int8 one (per output channel), int4 one per
  `group_size` inputs (GPTQ's layout; -1: one group, as GPTQ writes it)."""
  if weights not in WEIGHTS:
    raise ValueError(f'unknown weights {weights!r}; expected one of {WEIGHTS}')
  if weights != 'int4' or group_size == -1:
    return 1
  if group_size < 1 or contracted % group_size:
    raise ValueError(f'int4 group size {group_size} does not divide a kernel\'s {contracted} inputs')
  return contracted // group_size


PACKED = np.dtype(np.uint8)  # a quantized kernel of this dtype holds two int4 values per byte (`pack_int4`)


def pack_int4(q, axis: int):
  """int4 values in [-8, 7] (int8) -> uint8 holding two per byte along `axis`, which halves: elements 2i
  (low nibble) and 2i + 1 (high nibble). Neighbours share a byte, so a block of whole pairs along `axis` (a
  shard of an even count of values) is a block of whole bytes. numpy in, numpy out; jax arrays too."""
  xp = np if isinstance(q, np.ndarray) else jnp
  n = q.shape[axis]
  if n % 2:
    raise ValueError(f'int4 values pack two per byte along an axis of even size; axis {axis} of {q.shape} '
                     f'has {n}')
  pairs = q.reshape(q.shape[:axis] + (n // 2, 2) + q.shape[axis + 1:]).astype(xp.uint8)
  low, high = (xp.take(pairs, i, axis=axis + 1) for i in (0, 1))
  return (low & 15) | (high << 4)


def unpack_int4(packed, axis: int):
  """The inverse of pack_int4: uint8 -> int8 values in [-8, 7], `axis` doubled."""
  xp = np if isinstance(packed, np.ndarray) else jnp
  signed = packed.view(np.int8) if xp is np else jax.lax.bitcast_convert_type(packed, jnp.int8)
  low = (signed << 4) >> 4  # arithmetic shifts of int8: the nibble's sign extended
  high = signed >> 4
  both = xp.stack([low, high], axis=axis + 1)
  return both.reshape(packed.shape[:axis] + (2 * packed.shape[axis],) + packed.shape[axis + 1:])


def dequantize(q: Array, scale: Array, q_dims: str, kept: str, dtype: Dtype) -> Array:
  """w = scale * q for a quantized kernel q (dims named by q_dims) and scale [groups, *kept] (kept: the
  dims q keeps in the output, in q_dims' order; the groups split q's other dims, flattened, evenly).
  A uint8 q holds int4 values two per byte along its last input dim (`pack_int4`), unpacked first.
  The product runs in float32 (exact for a float16 scale times a 4-bit value), then is cast to `dtype`.
  q's input dims lie next to each other in both of Einsum's layouts, so q is only reshaped (a transpose
  of q would be one more copy of the kernel in XLA); the small scale is moved instead. numpy in, numpy
  out (one float32 temporary: what reading a GPTQ checkpoint dequantized holds per layer); jax arrays,
  under jit too, give jax arrays."""
  xp = np if isinstance(q, np.ndarray) and isinstance(scale, np.ndarray) else jnp
  first = min(q_dims.index(c) for c in q_dims if c not in kept)
  n_inputs = len(q_dims) - len(kept)
  before, after = q_dims[:first], q_dims[first + n_inputs:]
  if before + after != kept:
    raise ValueError(f'dequantize wants the input dims of {q_dims} next to each other (kept {kept})')
  if q.dtype == PACKED:
    q = unpack_int4(q, first + n_inputs - 1)
  groups = scale.shape[0]
  lead, tail = q.shape[:first], q.shape[first + n_inputs:]
  n_in = int(np.prod(q.shape[first:first + n_inputs]))
  w = q.reshape(lead + (groups, n_in // groups) + tail).astype(xp.float32)
  s = xp.expand_dims(xp.einsum(f'G{kept}->{before}G{after}', scale.astype(xp.float32)), first + 1)
  w = np.multiply(w, s, out=w) if xp is np else w * s
  w = w.reshape(q.shape)
  return w if w.dtype == np.dtype(dtype) else w.astype(dtype)
