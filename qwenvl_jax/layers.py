"""Building blocks shared by the vision tower, the resampler and the decoder."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax import cpu_kernels, lora as lora_math
from qwenvl_jax.kernel_math import GROUPS_AXIS, PACKED, dequantize, quant_groups

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

  weights 'int8' / 'int4' (weight-only quantization, see `quant`): the kernel is `q` (`q_t` weight-major),
  int8 values shaped as the kernel (int4: uint8, two values per byte along the last input dim, which is
  half as long: `kernel_math.pack_int4`), and `scale` [groups, *kept dims] (`quant_groups`); w = scale * q.
  Decode steps on the CPU multiply by q directly (`cpu_kernels.qmatmul`: a quarter of fp32's bytes read);
  elsewhere the kernel is dequantized where it is used, and a differentiated product keeps q and scale
  for the backward pass, which dequantizes again: never the float kernel (Q-LoRA's memory).

  lora (the training layout only): factors A, B of collection 'lora' add (alpha / r) * (dropout(x) @ A) @ B
  to the output (`qwenvl_jax.lora`); dropout when the call has a 'dropout' rng.
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
  weights: str = 'float'
  group_size: int = 128
  lora: lora_math.LoraConfig | None = None

  @nn.compact
  def __call__(self, eqn: str, x: Array) -> Array:
    if self.lora is not None and self.weight_major:
      raise ValueError('LoRA applies in the training layout only (weight_major=False)')
    x_dims, rest = eqn.split(',')
    w_dims, out = rest.split('->')
    order = weight_major_order(w_dims, out) if self.weight_major else w_dims
    perm = [w_dims.index(c) for c in order]
    shape = tuple(self.shape[i] for i in perm)
    axes = None if self.kernel_axes is None else tuple(self.kernel_axes[i] for i in perm)
    x = x.astype(self.dtype)

    def add_bias(y: Array) -> Array:
      if self.bias_shape is None:
        return y
      init = nn.initializers.zeros if self.bias_axes is None else with_axes(nn.initializers.zeros,
                                                                             *self.bias_axes)
      return y + self.param('bias', init, tuple(self.bias_shape), self.param_dtype).astype(self.dtype)

    if self.weights == 'float':
      init = self.kernel_init if axes is None else with_axes(self.kernel_init, *axes)
      parts = (self.param('kernel_t' if self.weight_major else 'kernel', init, shape, self.param_dtype),)
      load = lambda w: w.astype(self.dtype)
    else:
      kept = ''.join(c for c in order if c in out)
      n_in = int(np.prod([n for c, n in zip(order, shape) if c not in out]))
      groups = quant_groups(n_in, self.weights, self.group_size)
      q_init, s_init = nn.initializers.zeros, nn.initializers.ones
      if axes is not None:
        q_init = with_axes(q_init, *axes)
        s_init = with_axes(s_init, GROUPS_AXIS, *(a for c, a in zip(order, axes) if c in out))
      q_shape, q_dtype = shape, jnp.int8
      if self.weights == 'int4':  # two values per byte along the last input dim (kernel_math.pack_int4)
        at = max(i for i, c in enumerate(order) if c not in out)
        if shape[at] % 2:
          raise ValueError(f'an int4 kernel packs two values per byte along its last input dim; kernel '
                           f'{shape} ({order} -> {out}) has {shape[at]} there')
        q_shape, q_dtype = shape[:at] + (shape[at] // 2,) + shape[at + 1:], PACKED
      q = self.param('q_t' if self.weight_major else 'q', q_init, q_shape, q_dtype)
      scale = self.param('scale', s_init, (groups,) + tuple(n for c, n in zip(order, shape) if c in out),
                         self.param_dtype)
      parts = (q, scale)
      load = lambda q, s: dequantize(q, s, order, kept, self.dtype)
      if self.weight_major:
        y = cpu_kernels.qmatmul_einsum(f'{x_dims},{order}->{out}', x, q, scale)
        if y is not None:
          return add_bias(y.astype(self.dtype))
    if not self.weight_major:
      product = lambda x, *parts: jnp.einsum(eqn, x, load(*parts))
      if self.weights != 'float':  # see the class doc: the backward pass dequantizes again
        product = jax.checkpoint(product, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
      y = product(x, *parts)
      if self.lora is not None:
        return add_bias(y) + self._lora_update(eqn, x, w_dims, axes)
    elif self.out_chunks == 1:
      y = weight_major_einsum(f'{x_dims},{order}->{out}', x, load(*parts))
    else:
      n = self.out_chunks
      # each part's first kept dim is the one chunked: a kernel's first stored dim, a scale's second
      chunked = tuple(p.reshape(p.shape[:i] + (n, p.shape[i] // n) + p.shape[i + 1:])
                      for p, i in zip(parts, (0, 1)))
      chunked = tuple(jnp.moveaxis(p, i, 0) for p, i in zip(chunked, (0, 1)))
      parts = jax.lax.map(lambda ps: weight_major_einsum(f'{x_dims},{order}->{out}', x, load(*ps)), chunked)
      at = out.index(order[0])  # the chunked dim's place in the output
      y = jnp.moveaxis(parts, 0, at)
      y = y.reshape(y.shape[:at] + (-1,) + y.shape[at + 2:])
    return add_bias(y)

  def _lora_update(self, eqn: str, x: Array, w_dims: str, axes: Sequence[str] | None) -> Array:
    """(alpha / r) * (dropout(x) @ A) @ B, the factors declared here with their logical axes."""
    c = self.lora
    contracted, kept, _ = lora_math.dims(eqn)

    def declare(name: str, own: str, rank_at: int, init: Callable) -> Array:
      shape = [self.shape[w_dims.index(ch)] for ch in own]
      shape.insert(rank_at, c.rank)
      make = lambda: init(self.make_rng('params'), tuple(shape))
      if axes is not None:
        names = [axes[w_dims.index(ch)] for ch in own]
        names.insert(rank_at, lora_math.RANK_AXIS)
        make = with_axes(make, *names)
      return self.variable('lora', name, make).value

    a = declare('a', contracted, len(contracted), lambda k, s: lora_math.init_a(k, s, len(contracted)))
    b = declare('b', kept, 0, lora_math.init_b)
    rng = self.make_rng('dropout') if c.dropout > 0 and self.has_rng('dropout') else None
    return lora_math.update(eqn, x, a, b, c.scale, c.dropout, rng)


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
  'layers'), LoRA factors (collection 'lora') stacked the same way.

  The block is called as `block(carry, *scanned_args, *broadcast_args)` and returns `(carry, ys)`. Only one
  block is traced and compiled, whatever the depth.
  """
  return nn.scan(
      remat(block, policy), variable_axes={'params': 0, 'lora': 0}, length=length,
      split_rngs={'params': True, 'dropout': True},  # LoRA's dropout: masks of their own in each layer
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
