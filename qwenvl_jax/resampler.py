"""Position-aware vision-language adapter: one cross-attention layer with learned queries."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.layers import Einsum, LayerNorm, attend, resize_table, sincos_2d

Array = jax.Array


class Resampler(nn.Module):
  """Compresses the ViT's patch sequence into `n_queries` tokens of the LLM's width.

  2D sin-cos positions are added to the queries (as stored) and to the keys (resized to the patch grid).
  """
  n_queries: int
  embed_dim: int
  num_heads: int
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # x: [n, patches, kv_dim]
    d, h = self.embed_dim, self.num_heads
    k = d // h
    side = int(round(np.sqrt(self.n_queries)))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # A parameter (so checkpoints round-trip bit for bit) that is never trained, as in the original.
    pos_embed = jax.lax.stop_gradient(
        self.param('pos_embed', lambda _: jnp.asarray(sincos_2d(d, side), self.param_dtype)))
    query = self.param('query', nn.initializers.truncated_normal(0.02), (self.n_queries, d),
                       self.param_dtype)

    if x.shape[-1] != d:
      x = Einsum((x.shape[-1], d), name='kv_proj', **kw)('bpw,wd->bpd', x)
    x = LayerNorm(self.eps, name='ln_kv', **kw)(x)
    q = LayerNorm(self.eps, name='ln_q', **kw)(query)

    grid = int(round(np.sqrt(x.shape[1])))
    q_in = (q + pos_embed.astype(self.dtype))[None]  # [1, q, d]
    k_in = x + resize_table(pos_embed, grid).astype(self.dtype)[None]  # [n, p, d]
    queries, keys, values = InProjection(h, k, name='in_proj', **kw)(q_in, k_in, x)
    queries = jnp.broadcast_to(queries, (x.shape[0],) + queries.shape[1:])
    out = attend(queries, keys, values, None, self.dtype)  # [n, q, h, k]
    return Einsum((h, k, d), (d,), name='out_proj', **kw)('bqhk,hkd->bqd', out)


class InProjection(nn.Module):
  """torch.nn.MultiheadAttention's packed q/k/v projection, applied to three different inputs."""
  num_heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, *inputs: Array) -> tuple[Array, ...]:
    h, k = self.num_heads, self.head_dim
    # xavier-uniform over the packed [3d, d] matrix, as torch initialises it: with normal(0.02) every
    # query starts attending almost uniformly, so all image tokens begin as the same patch average.
    init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2, 3))
    w = self.param('kernel', init, (inputs[0].shape[-1], 3, h, k), self.param_dtype)
    b = self.param('bias', nn.initializers.zeros, (3, h, k), self.param_dtype)
    return tuple(jnp.einsum('bpd,dhk->bphk', t, w[:, i].astype(self.dtype)) + b[i].astype(self.dtype)
                 for i, t in enumerate(inputs))
