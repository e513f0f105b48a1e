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


def with_axes(init: Callable, *names: str) -> Callable:
  """`init` whose parameter carries its logical axis names (the one description sharding reads)."""
  return nn.with_logical_partitioning(init, names)


def weight_major_order(w_dims: str, out: str) -> str:
  """A kernel's dims reordered weight-major: the dims it keeps in the output first, contracted ones last."""
  return ''.join(c for c in w_dims if c in out) + ''.join(c for c in w_dims if c not in out)


def weight_major_einsum(eqn: str, x: Array, w: Array) -> Array:
  """jnp.einsum(eqn, x, w), computed as a product whose output has w's own dims first.

  For a few rows of x (decoding) XLA's CPU dot reads w at 13-16 GB/s in the x-major form and at
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
  `kernel_axes` (and `bias_axes`) name each dim's logical axis: the one description of the parameter that
  sharding and layout conversion read (`param_layout`).

  weight_major (the CPU decode layout): the kernel is stored with the dims the equation keeps first and
  the contracted ones last (torch's [out, in]), as `kernel_t`, and applied with `weight_major_einsum`; the
  other name keeps a tree of one layout from ever being read as the other. out_chunks > 1 (weight_major
  only) computes the product over that many slices of the kernel's first stored dim, each converted to
  `dtype` on its own: XLA's CPU backend has no bfloat16 dot and would otherwise convert a whole 152k-row
  lm_head to float32 at once (2.5 GB for the released model).
  """
  shape: Sequence[int]
  bias_shape: Sequence[int] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init
  kernel_axes: Sequence[str] | None = None
  bias_axes: Sequence[str] | None = None
  weight_major: bool = False
  out_chunks: int = 1

  @nn.compact
  def __call__(self, eqn: str, x: Array) -> Array:
    x_dims, rest = eqn.split(',')
    w_dims, out = rest.split('->')
    order = weight_major_order(w_dims, out) if self.weight_major else w_dims
    perm = [w_dims.index(c) for c in order]
    shape = tuple(self.shape[i] for i in perm)
    init = self.kernel_init
    if self.kernel_axes is not None:
      init = with_axes(init, *(self.kernel_axes[i] for i in perm))
    w = self.param('kernel_t' if self.weight_major else 'kernel', init, shape, self.param_dtype)
    x = x.astype(self.dtype)
    if not self.weight_major:
      y = jnp.einsum(eqn, x, w.astype(self.dtype))
    elif self.out_chunks == 1:
      y = weight_major_einsum(f'{x_dims},{order}->{out}', x, w.astype(self.dtype))
    else:
      n = self.out_chunks
      parts = jax.lax.map(lambda k: weight_major_einsum(f'{x_dims},{order}->{out}', x, k.astype(self.dtype)),
                          w.reshape((n, shape[0] // n) + shape[1:]))
      at = out.index(order[0])  # the chunked dim's place in the output
      y = jnp.moveaxis(parts, 0, at)
      y = y.reshape(y.shape[:at] + (-1,) + y.shape[at + 2:])
    if self.bias_shape is not None:
      init = nn.initializers.zeros
      if self.bias_axes is not None:
        init = with_axes(init, *self.bias_axes)
      b = self.param('bias', init, tuple(self.bias_shape), self.param_dtype)
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
    scale = self.param('scale', with_axes(nn.initializers.ones, 'norm'), (d,),
                       self.param_dtype)
    bias = self.param('bias', with_axes(nn.initializers.zeros, 'norm'), (d,),
                      self.param_dtype)
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
    scale = self.param('scale', with_axes(nn.initializers.ones, 'norm'),
                       (x.shape[-1],), self.param_dtype)
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


def remat(block: type[nn.Module], policy: str) -> type[nn.Module]:
  """`block` under `jax.checkpoint` with the named policy ('none': as it is)."""
  if policy == 'none':
    return block
  if policy not in REMAT_POLICIES:
    raise ValueError(f'unknown remat policy {policy!r}; expected none or one of {sorted(REMAT_POLICIES)}')
  return nn.remat(block, policy=REMAT_POLICIES[policy], prevent_cse=False)


def scanned(block: type[nn.Module], policy: str, length: int, n_broadcast: int, n_scanned: int = 0):
  """`block` stacked `length` times with nn.scan over one set of stacked parameters (leading axis
  'layers').

  The block is called as `block(carry, *scanned_args, *broadcast_args)` and returns `(carry, ys)`. Only one
  block is traced and compiled, whatever the depth.
  """
  return nn.scan(
      remat(block, policy), variable_axes={'params': 0}, split_rngs={'params': True}, length=length,
      in_axes=(0,) * n_scanned + (nn.broadcast,) * n_broadcast,
      metadata_params={nn.PARTITION_NAME: 'layers'})


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
