"""The Qwen language model: RMSNorm pre-norm blocks, rotary attention with dynamic NTK and logn scaling."""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.config import QwenVLConfig, TextConfig
from qwenvl_jax.layers import Einsum, RMSNorm, attend, scanned
from qwenvl_jax.sharding import constrain

Array = jax.Array


class KVCache(NamedTuple):
  """Per-layer keys and values, [layers, batch, slots, heads, head_dim]; slot s holds token s of the row.

  A block reaches one layer's arrays through `write`, `read` and `attend` only, so a subclass may store
  them in another layout and attend its own way (generation does: `generate.SlotsLastCache`).
  """
  k: Array
  v: Array

  @classmethod
  def zeros(cls, text: TextConfig, batch: int, slots: int, dtype) -> 'KVCache':
    shape = (text.num_layers, batch, slots, text.num_heads, text.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def write(self, keys: Array, values: Array, index: Array) -> 'KVCache':
    """One layer's cache with keys and values [b, t, h, k] stored at slots index..index+t."""
    def put(cache: Array, new: Array) -> Array:
      new = jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), index, axis=1)
      return constrain(new, ('batch', 'length', 'act_heads', 'head_dim'))
    return type(self)(put(self.k, keys), put(self.v, values))

  def read(self) -> tuple[Array, Array]:
    """One layer's keys and values, [b, slots, h, k]."""
    return self.k, self.v

  def attend(self, q: Array, mask: Array, dtype) -> Array:
    """`layers.attend` of queries q [b, t, h, k] over this layer's slots."""
    return attend(q, *self.read(), mask, dtype)


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
  """decode_layout reads generation's weight layout (`generate.decode_params`): c_attn as [3, h, k, d]
  and c_proj as [d, h, k], applied weight-major (`layers.weight_major_einsum`)."""
  text: TextConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  decode_layout: bool = False

  @nn.compact
  def __call__(self, x, cache, rope, q_scale, mask, cache_index):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, h, k = self.text.hidden_size, self.text.num_heads, self.text.head_dim
    if self.decode_layout:
      kw['weight_major'] = True
      qkv = Einsum((3, h, k, d), (3, h, k), name='c_attn', **kw)('btd,chkd->btchk', x)
    else:
      qkv = Einsum((d, 3, h, k), (3, h, k), name='c_attn', **kw)('btd,dchk->btchk', x)
    q, key, v = (qkv[:, :, i] for i in range(3))
    q = apply_rotary(q, *rope) * q_scale[:, :, None, None].astype(self.dtype)
    key = apply_rotary(key, *rope)
    if cache is None:
      y = attend(q, key, v, mask, self.dtype)
    else:  # write this step's keys at their slots, attend over every slot
      cache = cache.write(key, v, cache_index)
      y = cache.attend(q, mask, self.dtype)
    y = constrain(y, ('batch', 'length', 'act_heads', 'head_dim'))
    if self.decode_layout:
      return Einsum((d, h, k), name='c_proj', **kw)('bthk,dhk->btd', y), cache
    return Einsum((h, k, d), name='c_proj', **kw)('bthk,hkd->btd', y), cache


class MLP(nn.Module):
  """SwiGLU as the original writes it: c_proj(w1(x) * silu(w2(x))).

  decode_layout reads generation's weight layout (`generate.decode_params`): w1 and w2 as one kernel w12
  [2, f, d] and c_proj as [d, f], applied weight-major (`layers.weight_major_einsum`).
  """
  text: TextConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  decode_layout: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, f = self.text.hidden_size, self.text.mlp_width
    if self.decode_layout:
      kw['weight_major'] = True
      up, gate = jnp.unstack(Einsum((2, f, d), name='w12', **kw)('btd,cfd->btcf', x), axis=2)
    else:
      up = Einsum((d, f), name='w1', **kw)('btd,df->btf', x)
      gate = Einsum((d, f), name='w2', **kw)('btd,df->btf', x)
    hidden = constrain(up * nn.silu(gate), ('batch', 'length', 'act_mlp'))
    if self.decode_layout:
      return Einsum((d, f), name='c_proj', **kw)('btf,df->btd', hidden)
    return Einsum((f, d), name='c_proj', **kw)('btf,fd->btd', hidden)


class DecoderBlock(nn.Module):
  text: TextConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  collect_hidden: bool = False
  decode_layout: bool = False  # see Attention and MLP

  @nn.compact
  def __call__(self, x: Array, cache: KVCache | None, rope: tuple[Array, Array], q_scale: Array,
               mask: Array, cache_index: Array):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.text.layer_norm_eps
    x = x_in = constrain(x, ('batch', 'length', 'act_embed'))
    y, cache = Attention(self.text, decode_layout=self.decode_layout, name='attn', **kw)(
        RMSNorm(eps, name='ln_1', **kw)(x), cache, rope, q_scale, mask, cache_index)
    x = x + y
    mlp = MLP(self.text, decode_layout=self.decode_layout, name='mlp', **kw)
    x = x + mlp(RMSNorm(eps, name='ln_2', **kw)(x))
    return x, (cache, x_in if self.collect_hidden else None)


class Decoder(nn.Module):
  """The block stack plus ln_f. Returns (normed output, per-block inputs or None, updated cache or None)."""
  config: QwenVLConfig

  @nn.compact
  def __call__(self, x: Array, *, positions: Array, alpha: Array, use_logn: bool, mask: Array,
               cache: KVCache | None = None, cache_index: Array | int = 0, collect_hidden: bool = False):
    t = self.config.text
    kw = dict(dtype=self.config.compute_dtype, param_dtype=self.config.weights_dtype)
    rope = rotary_tables(positions, alpha, t)
    q_scale = logn_scale(positions, t.seq_length) if use_logn else jnp.ones(positions.shape, jnp.float32)
    blocks = scanned(DecoderBlock, self.config.remat, t.num_layers, n_broadcast=4, n_scanned=1)
    x, (cache, hidden) = blocks(t, collect_hidden=collect_hidden, name='layers', **kw)(
        x, cache, rope, q_scale, mask, jnp.asarray(cache_index, jnp.int32))
    x = RMSNorm(t.layer_norm_eps, name='ln_f', **kw)(x)
    return x, hidden, cache
