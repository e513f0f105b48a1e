"""The Qwen language model: RMSNorm pre-norm blocks, rotary attention with dynamic NTK and logn scaling."""
from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax import cpu_kernels
from qwenvl_jax.config import QwenVLConfig, TextConfig
from qwenvl_jax.kernel_math import attend
from qwenvl_jax.layers import Einsum, RMSNorm, remat, scanned
from qwenvl_jax.lora import LoraConfig, lora_of
from qwenvl_jax.logical import constrain, rules_active

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  """One layer's keys and values, or every layer's (a leading [layers] axis, for the scanned stack).

  Slots first: [b, slots, heads, head_dim]. slots_last (the CPU decode layout): [b, heads, head_dim,
  slots], the layout in which XLA's CPU dots and `cpu_kernels.attend_one` take them (with slots before
  heads every decode step transposes each layer's whole cache, ~10% of a batch-1 step); a batch of one
  that the kernel will not attend over is stored without its b axis (with it, XLA fuses the cache update
  into the two attention dots and copies the cache to do so). A block reaches the arrays through `write`
  and `attend` only.
  """
  k: Array
  v: Array
  slots_last: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def zeros(cls, text: TextConfig, batch: int, slots: int, dtype, *, layers: int | None = None,
            slots_last: bool = False) -> 'KVCache':
    """An empty cache; `layers`: one stacked cache of that many layers (for `scan_layers`)."""
    if slots_last:
      shape = (batch, text.num_heads, text.head_dim, slots)[batch == 1 and not _kernel_applies(dtype):]
    else:
      shape = (batch, slots, text.num_heads, text.head_dim)
    shape = shape if layers is None else (layers,) + shape
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), slots_last)

  def write(self, keys: Array, values: Array, index: Array) -> 'KVCache':
    """This layer's cache with keys and values [b, t, h, k] stored at slots index..index+t of its first b
    rows (the cache may hold more: a step over the busy rows of a server's cache); index is an int32
    scalar or one slot per row [b] (rows at different lengths)."""
    def put(cache: Array, new: Array) -> Array:
      b, t = new.shape[:2]
      if self.slots_last:
        full, new, axis = cache.reshape((-1,) + cache.shape[-3:]), jnp.einsum('bthk->bhkt', new), 3
      else:
        full, axis = cache, 1
      new = new.astype(cache.dtype)
      if jnp.ndim(index) == 0:
        full = jax.lax.dynamic_update_slice_in_dim(full, new, index, axis=axis)
      elif full.shape[0] > b:  # row by row, in place (a scatter into the whole cache costs with its size)
        for i in range(b):
          at = (i, 0, 0, index[i]) if self.slots_last else (i, index[i], 0, 0)
          full = jax.lax.dynamic_update_slice(full, new[i:i + 1], at)
      else:
        full = jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=axis - 1))(
            full, new, index)
      if self.slots_last:
        return full.reshape(cache.shape)
      return constrain(full, ('batch', 'length', 'act_heads', 'head_dim'))
    return self.replace(k=put(self.k, keys), v=put(self.v, values))

  def put_rows(self, rows: 'KVCache', index: Array | int) -> 'KVCache':
    """This layer's cache with `rows` (a cache of the same layout for as many rows or fewer, with as many
    slots or fewer) written from slot 0 over rows index.. (a scalar), or over rows index[i] (an array [k]:
    one row each; an index past the last row writes nothing): a prompt prefilled on its own, or prompts
    prefilled together, put into their rows of a batch's cache. The rest keeps what it held; the key mask
    decides what is seen."""
    def put(cache: Array, new: Array) -> Array:
      if self.slots_last:  # a batch of one may be stored without its b axis (see the class doc)
        full, new = cache.reshape((-1,) + cache.shape[-3:]), new.reshape((-1,) + new.shape[-3:])
      else:
        full = cache
      new = new.astype(cache.dtype)
      if jnp.ndim(index) == 0:
        full = jax.lax.dynamic_update_slice(full, new, (index, 0, 0, 0))
      elif self.slots_last:
        full = full.at[index, :, :, :new.shape[3]].set(new, mode='drop')
      else:
        full = full.at[index, :new.shape[1]].set(new, mode='drop')
      return full.reshape(cache.shape)
    return self.replace(k=put(self.k, rows.k), v=put(self.v, rows.v))

  def attend(self, q: Array, mask: Array, dtype) -> Array:
    """`kernel_math.attend` of queries q [b, t, h, k] over the first s slots of this layer's first b rows,
    mask [b, t, s]: the cache may hold more rows and slots (a server's step reads its busy rows up to a
    slot bucket covering the longest, not every row's whole length). In the slots-last layout one query
    per row goes to the CPU kernel where it applies (`_kernel_attends`)."""
    b, s = q.shape[0], mask.shape[-1]
    if not self.slots_last:
      return attend(q, self.k[:b, :s], self.v[:b, :s], mask, dtype)
    k, v = (c.reshape((-1,) + c.shape[-3:]) for c in (self.k, self.v))  # [b', h, k, slots]
    if q.shape[1] == 1 and _kernel_attends(dtype):  # reads the rows in place, only their valid slots
      valid = jnp.pad(mask[:, 0], ((0, 0), (0, k.shape[-1] - s)))
      return cpu_kernels.attend_one(q[:, 0], k, v, valid)[:, None]
    k, v = (jnp.einsum('bhks->bshk', c[:b, :, :, :s]) for c in (k, v))
    return attend(q, k, v, mask, dtype)


def _kernel_applies(dtype) -> bool:
  """Whether `cpu_kernels.attend_one` serves this dtype in this process (float32, the kernel built): what
  the cache's shape depends on."""
  return dtype == jnp.float32 and cpu_kernels.available()


def _kernel_attends(dtype) -> bool:
  """Whether decode steps attend with the kernel: where it applies, and not under sharding rules (XLA's
  partitioner does not see into the kernel)."""
  return _kernel_applies(dtype) and not rules_active()


def ntk_alpha_of(attention_mask: Array, text: TextConfig, train: bool = False) -> Array:
  """The dynamic-NTK factor [b] of each row's real length (valid slots of the mask [b, s]), as the
  original picks at prefill; 1 in training (where the original also uses 1) or without dynamic NTK."""
  if train or not text.use_dynamic_ntk:
    return jnp.ones((attention_mask.shape[0],), jnp.float32)
  return ntk_alpha(attention_mask.sum(axis=1), text.seq_length)


def positions_of(segments: Array, cache_index: Array | int, t: int) -> Array:
  """Rotary positions [b, t] of the queries at slots cache_index.. : 0.. over each row's valid slots.

  segments [b, s]: 0 for an empty slot, else the id of the sample the slot belongs to; a plain 0/1 mask is
  one sample per row. A packed row (several samples, train/rows.py) holds increasing ids, and positions
  restart at 0 where a sample begins: at a valid slot whose id exceeds every id before it (an id equal to
  an earlier one continues that sample across empty slots, as left padding and cache holes need)."""
  valid = segments != 0
  count = jnp.cumsum(valid, axis=1)
  earlier = jnp.pad(jax.lax.cummax(segments, axis=1)[:, :-1], ((0, 0), (1, 0)))
  start = jax.lax.cummax(jnp.where(valid & (segments > earlier), count - 1, 0), axis=1)
  before = jnp.maximum(count - 1 - start, 0)
  slots = jnp.asarray(cache_index, jnp.int32).reshape(-1, 1) + jnp.arange(t)
  return jnp.take_along_axis(before, jnp.broadcast_to(slots, (segments.shape[0], t)), axis=1)


def causal_mask(segments: Array, t: int, cache_index: Array | int = 0) -> Array:
  """[b, t, s] mask: query i (at slot cache_index + i; one index or one per row) sees the valid key slots
  (segments [b, s] nonzero, see `positions_of`) up to its own, of its own sample: block-diagonal causal in
  a packed row. A query at an empty slot keeps seeing every valid key before it, as without samples."""
  b, s = segments.shape
  slots = jnp.arange(s)
  query_slots = jnp.asarray(cache_index, jnp.int32).reshape(-1, 1) + jnp.arange(t)  # [1 or b, t]
  q_seg = jnp.take_along_axis(segments, jnp.clip(jnp.broadcast_to(query_slots, (b, t)), 0, s - 1), axis=1)
  k_seg = segments[:, None, :]
  same = (k_seg == q_seg[:, :, None]) | (q_seg[:, :, None] == 0)
  return (k_seg != 0) & (slots[None, None, :] <= query_slots[:, :, None]) & same


def ntk_alpha(length: Array | int, seq_length: int) -> Array:
  """Dynamic-NTK factor the original picks from the prompt length: 2**ceil(log2(len/seq)+1) - 1, at least 1."""
  length = jnp.maximum(jnp.asarray(length, jnp.float32), 1.0)
  alpha = 2.0 ** jnp.ceil(jnp.log2(length / seq_length) + 1.0) - 1.0
  return jnp.maximum(alpha, 1.0)


def rotary_tables(positions: Array, alpha: Array, text: TextConfig) -> tuple[Array, Array]:
  """cos and sin [b, t, rotary_dim] for integer positions [b, t] and a per-row NTK factor alpha [b]."""
  dim = text.rotary_dim
  base = text.rotary_emb_base * jnp.asarray(alpha, jnp.float32) ** (dim / (dim - 2))  # [b]
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  inv_freq = 1.0 / base[:, None] ** exponents[None]  # [b, dim/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq[:, None, :]  # [b, t, dim/2]
  freqs = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(freqs), jnp.sin(freqs)


def logn_scale(positions: Array, seq_length: int) -> Array:
  """Query scale log(p+1)/log(seq_length) for 0-based positions p past the training length, else 1."""
  p1 = positions.astype(jnp.float32) + 1.0
  return jnp.where(p1 > seq_length, jnp.log(p1) / np.log(seq_length), 1.0)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """GPT-NeoX rotation of the first rotary_dim channels of x [b, t, h, k] (rotate-half convention)."""
  rot = cos.shape[-1]
  xr, xpass = x[..., :rot].astype(jnp.float32), x[..., rot:]
  x1, x2 = jnp.split(xr, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = xr * cos[:, :, None] + rotated * sin[:, :, None]
  return jnp.concatenate([out.astype(x.dtype), xpass], axis=-1)


class Attention(nn.Module):
  text: TextConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  weight_major: bool = False  # see Einsum
  weights: str = 'float'
  group_size: int = 128
  lora: LoraConfig | None = None  # see Einsum

  @nn.compact
  def __call__(self, x, cache, rope, q_scale, mask, cache_index):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, weight_major=self.weight_major,
              weights=self.weights, group_size=self.group_size)
    d, h, k = self.text.hidden_size, self.text.num_heads, self.text.head_dim
    qkv = Einsum((d, 3, h, k), (3, h, k), kernel_axes=('embed', 'qkv', 'heads', 'head_dim'),
                 bias_axes=('qkv', 'heads', 'head_dim'), name='c_attn', lora=lora_of(self.lora, 'c_attn'),
                 **kw)('btd,dchk->btchk', x)
    q, key, v = (qkv[:, :, i] for i in range(3))
    q = apply_rotary(q, *rope) * q_scale[:, :, None, None].astype(self.dtype)
    key = apply_rotary(key, *rope)
    if cache is None:
      y = attend(q, key, v, mask, self.dtype)
    else:  # write this step's keys at their slots, attend over every slot
      cache = cache.write(key, v, cache_index)
      y = cache.attend(q, mask, self.dtype)
    y = constrain(y, ('batch', 'length', 'act_heads', 'head_dim'))
    out = Einsum((h, k, d), kernel_axes=('heads', 'head_dim', 'embed'), name='c_proj',
                 lora=lora_of(self.lora, 'attn.c_proj'), **kw)('bthk,hkd->btd', y)
    return out, cache


class MLP(nn.Module):
  """SwiGLU as the original writes it: c_proj(w1(x) * silu(w2(x)))."""
  text: TextConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  weight_major: bool = False  # see Einsum
  weights: str = 'float'
  group_size: int = 128
  lora: LoraConfig | None = None  # see Einsum

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, weight_major=self.weight_major,
              weights=self.weights, group_size=self.group_size)
    d, f = self.text.hidden_size, self.text.mlp_width
    up = Einsum((d, f), kernel_axes=('embed', 'mlp'), name='w1', lora=lora_of(self.lora, 'w1'),
                **kw)('btd,df->btf', x)
    gate = Einsum((d, f), kernel_axes=('embed', 'mlp'), name='w2', lora=lora_of(self.lora, 'w2'),
                  **kw)('btd,df->btf', x)
    hidden = constrain(up * nn.silu(gate), ('batch', 'length', 'act_mlp'))
    return Einsum((f, d), kernel_axes=('mlp', 'embed'), name='c_proj', **kw)('btf,fd->btd', hidden)


class DecoderBlock(nn.Module):
  text: TextConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  collect_hidden: bool = False
  weight_major: bool = False
  weights: str = 'float'
  group_size: int = 128
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x: Array, cache: KVCache | None, rope: tuple[Array, Array], q_scale: Array,
               mask: Array, cache_index: Array):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qw = dict(weight_major=self.weight_major, weights=self.weights, group_size=self.group_size,
              lora=self.lora)
    eps = self.text.layer_norm_eps
    x = x_in = constrain(x, ('batch', 'length', 'act_embed'))
    y, cache = Attention(self.text, name='attn', **qw, **kw)(
        RMSNorm(eps, name='ln_1', **kw)(x), cache, rope, q_scale, mask, cache_index)
    x = x + y
    mlp = MLP(self.text, name='mlp', **qw, **kw)
    x = x + mlp(RMSNorm(eps, name='ln_2', **kw)(x))
    return x, (cache, x_in if self.collect_hidden else None)


class Decoder(nn.Module):
  """The block stack plus ln_f. Returns (normed output, per-block inputs or None, updated cache or None).

  config.scan_layers: one `nn.scan` over stacked parameters 'layers' (one block compiled, any depth;
  the cache is one KVCache with a leading layers axis), else one module per layer 'layers_0'.. (the
  cache a tuple of per-layer KVCaches): decoding reads each weight once per step that way, where the
  scan would copy every layer's slice out of the stack first. `param_layout.convert` moves a params tree
  between the two.
  """
  config: QwenVLConfig

  @nn.compact
  def __call__(self, x: Array, *, positions: Array, alpha: Array, use_logn: bool, mask: Array,
               cache=None, cache_index: Array | int = 0, collect_hidden: bool = False):
    c, t = self.config, self.config.text
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, weight_major=c.weight_major,
              weights=c.weights_of('decoder'), group_size=c.group_size, lora=c.lora,
              collect_hidden=collect_hidden)
    rope = rotary_tables(positions, alpha, t)
    q_scale = logn_scale(positions, t.seq_length) if use_logn else jnp.ones(positions.shape, jnp.float32)
    cache_index = jnp.asarray(cache_index, jnp.int32)
    if c.scan_layers:
      blocks = scanned(DecoderBlock, c.remat, t.num_layers, n_broadcast=4, n_scanned=1)
      x, (cache, hidden) = blocks(t, name='layers', **kw)(x, cache, rope, q_scale, mask, cache_index)
    else:
      block, caches, hidden = remat(DecoderBlock, c.remat), [], []
      for i in range(t.num_layers):
        x, (layer_cache, h) = block(t, name=f'layers_{i}', **kw)(
            x, None if cache is None else cache[i], rope, q_scale, mask, cache_index)
        caches.append(layer_cache)
        hidden.append(h)
      cache = None if cache is None else tuple(caches)
      hidden = jnp.stack(hidden) if collect_hidden else None
    x = RMSNorm(t.layer_norm_eps, name='ln_f', dtype=c.dtype, param_dtype=c.param_dtype)(x)
    return x, hidden, cache
