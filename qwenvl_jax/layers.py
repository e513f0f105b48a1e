"""Building blocks shared by the vision tower, the resampler and the decoder."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# initializer_range of the released config; used when training from scratch.
default_kernel_init = nn.initializers.normal(0.02)


def weight_major_einsum(eqn: str, x: Array, w: Array) -> Array:
  """jnp.einsum(eqn, x, w), computed as a product whose output has w's own dims first.

  For a few rows of x (batched decoding) XLA's CPU dot reads w at 13-16 GB/s in the x-major form and at
  24-27 GB/s in this one, when w's contracted dims are its minor ones (bench dims, batch 8). The barrier
  keeps XLA from folding the final transpose back into the dot, which would undo the gain.
  """
  x_dims, rest = eqn.split(',')
  w_dims, out = rest.split('->')
  first = ''.join(c for c in w_dims if c in out) + ''.join(c for c in out if c not in w_dims)
  y = jax.lax.optimization_barrier(jnp.einsum(f'{w_dims},{x_dims}->{first}', w, x))
  return jnp.einsum(f'{first}->{out}', y)


class Einsum(nn.Module):
  """A weight of a given shape applied with an einsum equation, optionally plus a bias.

  Keeping heads as their own axis (`[d, 3, h, k]` rather than `[d, 3*h*k]`) lets sharding rules split them.
  weight_major computes it with `weight_major_einsum` (generation's layout).
  """
  shape: Sequence[int]
  bias_shape: Sequence[int] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init
  weight_major: bool = False

  @nn.compact
  def __call__(self, eqn: str, x: Array) -> Array:
    w = self.param('kernel', self.kernel_init, tuple(self.shape), self.param_dtype)
    y = (weight_major_einsum if self.weight_major else jnp.einsum)(
        eqn, x.astype(self.dtype), w.astype(self.dtype))
    if self.bias_shape is not None:
      b = self.param('bias', nn.initializers.zeros, tuple(self.bias_shape), self.param_dtype)
      y = y + b.astype(self.dtype)
    return y


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm (biased variance), computed in float32."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (d,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nn.Module):
  """Qwen's RMSNorm: normalised in float32, cast back, then scaled (the original's order)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


def attend(q: Array, k: Array, v: Array, mask: Array | None, dtype: Dtype) -> Array:
  """Softmax attention with logits and softmax in float32. q [b,t,h,k], k/v [b,s,h,k], mask [b,t,s]."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = jnp.einsum('bthk,bshk->bhts', q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum('bhts,bshk->bthk', probs, v.astype(dtype))


REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scanned(block: type[nn.Module], remat: str, length: int, n_broadcast: int, n_scanned: int = 0):
  """`block` stacked `length` times with nn.scan over one set of stacked parameters.

  The block is called as `block(carry, *scanned_args, *broadcast_args)` and returns `(carry, ys)`. Only one
  block is traced and compiled, whatever the depth.
  """
  if remat != 'none':
    if remat not in REMAT_POLICIES:
      raise ValueError(f'unknown remat policy {remat!r}; expected none or one of {sorted(REMAT_POLICIES)}')
    block = nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return nn.scan(
      block, variable_axes={'params': 0}, split_rngs={'params': True}, length=length,
      in_axes=(0,) * n_scanned + (nn.broadcast,) * n_broadcast)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix equal to torch's bicubic interpolation (A=-0.75, align_corners=False, no antialias).

  Applied with einsum it is exact, differentiable and cheap; `jax.image.resize` uses a different kernel.
  """
  a = -0.75
  scale = in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  t = src - base

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  m = np.zeros((out_size, in_size), np.float64)
  for tap in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
    np.add.at(m, (np.arange(out_size), idx), weights[:, tap])
  return m.astype(np.float32)


def resize_table(table: Array, grid: int) -> Array:
  """A [side*side, c] position table resized to [grid*grid, c], as the original `get_abs_pos`."""
  side = int(round(np.sqrt(table.shape[0])))
  if side == grid:
    return table
  m = jnp.asarray(bicubic_matrix(side, grid))
  t = table.astype(jnp.float32).reshape(side, side, -1)
  return jnp.einsum('ih,jw,hwc->ijc', m, m, t).reshape(grid * grid, -1).astype(table.dtype)


def sincos_2d(dim: int, side: int) -> np.ndarray:
  """MAE-style 2D sin-cos table [side*side, dim]: first half encodes the column, second half the row."""
  def one_axis(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  cols, rows = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
  return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1).astype(np.float32)
