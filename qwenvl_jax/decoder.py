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
  """Per-layer keys and values, [layers, batch, slots, heads, head_dim]; slot s holds token s of the row."""
  k: Array
  v: Array

  @classmethod
  def zeros(cls, text: TextConfig, batch: int, slots: int, dtype) -> 'KVCache':
    shape = (text.num_layers, batch, slots, text.num_heads, text.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


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

  @nn.compact
  def __call__(self, x, cache, rope, q_scale, mask, cache_index):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, h, k = self.text.hidden_size, self.text.num_heads, self.text.head_dim
    qkv = Einsum((d, 3, h, k), (3, h, k), name='c_attn', **kw)('btd,dchk->btchk', x)
    q, key, v = (qkv[:, :, i] for i in range(3))
    q = apply_rotary(q, *rope) * q_scale[:, :, None, None].astype(self.dtype)
    key = apply_rotary(key, *rope)
    if cache is not None:  # write this step's keys at their slots, attend over every slot
      key = jax.lax.dynamic_update_slice_in_dim(cache.k, key.astype(cache.k.dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache_index, axis=1)
      cache = KVCache(*(constrain(c, ('batch', 'length', 'act_heads', 'head_dim')) for c in (key, v)))
    y = constrain(attend(q, key, v, mask, self.dtype), ('batch', 'length', 'act_heads', 'head_dim'))
    return Einsum((h, k, d), name='c_proj', **kw)('bthk,hkd->btd', y), cache


class MLP(nn.Module):
  """SwiGLU as the original writes it: c_proj(w1(x) * silu(w2(x)))."""
  text: TextConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, f = self.text.hidden_size, self.text.mlp_width
    up = Einsum((d, f), name='w1', **kw)('btd,df->btf', x)
    gate = Einsum((d, f), name='w2', **kw)('btd,df->btf', x)
    hidden = constrain(up * nn.silu(gate), ('batch', 'length', 'act_mlp'))
    return Einsum((f, d), name='c_proj', **kw)('btf,fd->btd', hidden)


class DecoderBlock(nn.Module):
  text: TextConfig
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  collect_hidden: bool = False

  @nn.compact
  def __call__(self, x: Array, cache: KVCache | None, rope: tuple[Array, Array], q_scale: Array,
               mask: Array, cache_index: Array):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.text.layer_norm_eps
    x = x_in = constrain(x, ('batch', 'length', 'act_embed'))
    y, cache = Attention(self.text, name='attn', **kw)(
        RMSNorm(eps, name='ln_1', **kw)(x), cache, rope, q_scale, mask, cache_index)
    x = x + y
    x = x + MLP(self.text, name='mlp', **kw)(RMSNorm(eps, name='ln_2', **kw)(x))
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
