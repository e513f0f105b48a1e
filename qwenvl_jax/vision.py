"""The vision tower: ViT-bigG-style encoder, then the resampler, ln_post and the output projection."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.kernel_math import attend
from qwenvl_jax.layers import Einsum, LayerNorm, resize_table, scanned
from qwenvl_jax.layers import with_axes as _axes
from qwenvl_jax.resampler import Resampler
from qwenvl_jax.logical import constrain

Array = jax.Array


class VisionBlock(nn.Module):
  """Pre-norm transformer block; qkv is one packed projection whose output is laid out [head, q/k/v, k]
  in the released weights (the converter reorders it to [q/k/v, head, k])."""
  width: int
  heads: int
  mlp_width: int
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array, _=None) -> tuple[Array, None]:  # x: [n, p, w]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    w, h = self.width, self.heads
    k = w // h
    x = constrain(x, ('batch', 'length', 'act_embed'))
    y = LayerNorm(self.eps, name='ln_1', **kw)(x)
    qkv = Einsum((w, 3, h, k), (3, h, k), kernel_axes=('vit_embed', 'qkv', 'vit_heads', 'head_dim'),
                 bias_axes=('qkv', 'vit_heads', 'head_dim'), name='in_proj', **kw)('bpw,wchk->bpchk', y)
    q, key, v = (qkv[:, :, i] for i in range(3))
    y = attend(q, key, v, None, self.dtype)
    x = x + Einsum((h, k, w), (w,), kernel_axes=('vit_heads', 'head_dim', 'vit_embed'), bias_axes=('vit_embed',),
                   name='out_proj', **kw)('bphk,hkw->bpw', y)
    y = LayerNorm(self.eps, name='ln_2', **kw)(x)
    y = Einsum((w, self.mlp_width), (self.mlp_width,), kernel_axes=('vit_embed', 'vit_mlp'),
               bias_axes=('vit_mlp',), name='c_fc', **kw)('bpw,wf->bpf', y)
    y = nn.gelu(y, approximate=False)  # the original's nn.GELU is the exact erf form.
    x = x + Einsum((self.mlp_width, w), (w,), kernel_axes=('vit_mlp', 'vit_embed'), bias_axes=('vit_embed',),
                   name='c_proj', **kw)('bpf,fw->bpw', y)
    return x, None


class VisionTransformer(nn.Module):
  """pixel_values [n, H, W, 3] (CLIP-normalised, any multiple of the patch size) -> [n, n_queries, hidden]."""
  config: QwenVLConfig

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    v = self.config.vision
    kw = dict(dtype=self.config.dtype, param_dtype=self.config.param_dtype)
    n, height, width, _ = pixel_values.shape
    p = v.patch_size
    gh, gw = height // p, width // p
    if gh != gw or gh * p != height or gw * p != width:
      raise ValueError(f'images must be square multiples of the {p}px patch, got {height}x{width}')

    patches = pixel_values.reshape(n, gh, p, gw, p, 3)
    x = Einsum((p, p, 3, v.width), kernel_axes=('patch', 'patch', 'channel', 'vit_embed'), name='conv1',
               **kw)('nipjqc,pqcw->nijw', patches)
    x = x.reshape(n, gh * gw, v.width)  # [n, patches, width]
    table = self.param('positional_embedding', _axes(nn.initializers.normal(v.width ** -0.5), 'position',
                                                     'vit_embed'), (v.pos_table_rows, v.width), kw['param_dtype'])
    x = x + resize_table(table, gh).astype(x.dtype)[None]
    x = LayerNorm(v.layer_norm_eps, name='ln_pre', **kw)(x)

    blocks = scanned(VisionBlock, self.config.remat, v.layers, n_broadcast=1)
    x, _ = blocks(v.width, v.heads, v.mlp_width, v.layer_norm_eps, name='blocks', **kw)(x, None)

    x = Resampler(v.n_queries, v.output_dim, v.resampler_heads, v.layer_norm_eps, name='attn_pool', **kw)(x)
    x = LayerNorm(v.layer_norm_eps, name='ln_post', **kw)(x)
    proj = self.param('proj', _axes(nn.initializers.normal(v.output_dim ** -0.5), 'embed', 'embed'),
                      (v.output_dim, v.output_dim), kw['param_dtype'])
    return jnp.einsum('nqd,de->nqe', x, proj.astype(x.dtype))
