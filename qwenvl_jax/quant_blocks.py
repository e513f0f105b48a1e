"""A float kernel seen as its quantized leaves, block by block: how a quantized base is read onto a mesh.

Quantizing the whole float tree and then sharding it holds the float base in one place (at the released
size 9.6B x 4 bytes on one device). Here a kernel tensor (memory-mapped, one layer of a stacked leaf) is
quantized only where a device block asks for it: `q` and `scale` are views whose blocks come from the
float rows of their output channels, with every input. A channel's int8 scale needs its whole reduction
axis, and int4's groups run along it, so a block split along the inputs (FSDP's 'embed' of an MLP's
first kernel, tensor parallelism's 'mlp' of its second) still reads them all; the values are those of
quantizing the whole tensor, bit for bit (each channel's scale and values depend on that channel alone).
Each set of output channels is quantized once, for all the blocks (q's and scale's) that share it, a
block of float rows (`orbax_leaves.BLOCK_BYTES`) at a time: the rows are read once on the host, put on each
device that holds those channels, and quantized there by one compiled function per block shape (the ops
of `quant.quantize_kernel`, so the bits of quantizing the tree on that kind of device); the results stay
on their device, assembled there, never brought back through the host or another device.

The quantizer is passed in (`quant.quantize_kernel`, jitted): `quant` sits above the checkpoint readers.
"""
from __future__ import annotations

from typing import Callable

import functools

import jax
import numpy as np

from qwenvl_jax import param_layout
from qwenvl_jax.kernel_math import GROUPS_AXIS
from qwenvl_jax.orbax_leaves import BLOCK_BYTES, release_freed_memory

Path = tuple[str, ...]
# (float kernel, its path) -> (q, scale): `quant.quantize_kernel` bound to a mode and group size, jitted
# (the path static)
Quantize = Callable[[np.ndarray, Path], tuple[np.ndarray, np.ndarray]]
QUANTIZED_NAMES = {'kernel': 'q', 'kernel_t': 'q_t'}


def quantized_paths(path: Path) -> tuple[Path, Path]:
  """(q's path, scale's path) of the float kernel leaf at `path`."""
  return path[:-1] + (QUANTIZED_NAMES[path[-1]],), path[:-1] + ('scale',)


class QuantizedKernel:
  """One float kernel `source` (in its leaf's layout; `path` names its layout) seen as `.q` and `.scale`:
  views whose `blocks(index, devices)` (a tuple of slices, one per dim) is that block of the quantized
  leaf on each of `devices`, the float rows cast to `dtype` first (as a float load would have stored them)."""

  def __init__(self, source, path: Path, dtype, quantize: Quantize):
    self.source, self.path, self.dtype, self.quantize = source, path, np.dtype(dtype), quantize
    names = param_layout.leaf_axes(path, np.shape(source))
    scale_names = param_layout.axes_of(quantized_paths(path)[1])
    self.outputs = [i for i, n in enumerate(names) if n in scale_names]  # the dims the scale keeps
    # each scale dim's kernel dim (None: the groups)
    self.scale_dims = [None if n == GROUPS_AXIS else names.index(n) for n in scale_names]
    self._done: dict[tuple, dict[jax.Device, tuple[jax.Array, jax.Array]]] = {}

  # Views made on demand, not kept: a view held here would be a reference cycle, and the quantized blocks
  # cached in `_done` would wait for the garbage collector (a tensor's worth of int8 per kernel read).
  @property
  def q(self) -> 'QuantizedView':
    return QuantizedView(self, 'q')

  @property
  def scale(self) -> 'QuantizedView':
    return QuantizedView(self, 'scale')

  def _of(self, ranges: dict[int, slice], devices: list) -> list[tuple[jax.Array, jax.Array]]:
    """(q, scale) on each of `devices` of the output channels `ranges` (kernel dim -> slice) with every
    input, quantized BLOCK_BYTES of float rows at a time along the first output dim (a 2.5 GB lm_head is
    never in float whole, nor the quantizer's temporaries of it); each block of rows read once."""
    key = tuple((ranges[i].start, ranges[i].stop) for i in self.outputs)
    done = self._done.setdefault(key, {})
    todo = [d for d in dict.fromkeys(devices) if d not in done]
    if todo:
      shape = np.shape(self.source)
      index = [ranges.get(i, slice(None)) for i in range(len(shape))]
      extent = [len(range(*s.indices(n))) for s, n in zip(index, shape)]
      first = self.outputs[0]
      start = index[first].indices(shape[first])[0]
      per_row = 4 * int(np.prod(extent)) // max(1, extent[first])  # float32 bytes: the quantizer's precision
      step = max(1, BLOCK_BYTES // per_row)
      at = self.scale_dims.index(first)
      for lo in range(0, extent[first], step):
        hi = min(lo + step, extent[first])
        index[first] = slice(start + lo, start + hi)
        w = np.asarray(self.source[tuple(index)]).astype(self.dtype, copy=False)
        for d in todo:
          q, scale = self.quantize(jax.device_put(w, d), self.path)
          if hi - lo < extent[first]:  # one of several blocks of rows: into the whole on its device
            if lo == 0:
              whole_scale = scale.shape[:at] + (extent[first],) + scale.shape[at + 1:]
              whole_q = q.shape[:first] + (extent[first],) + q.shape[first + 1:]  # int4: two per byte
              done[d] = (jax.numpy.zeros(whole_q, q.dtype, device=d),
                         jax.numpy.zeros(whole_scale, scale.dtype, device=d))
            q = put_along(done[d][0], q, first, lo)
            scale = put_along(done[d][1], scale, at, lo)
          done[d] = (q, scale)
        del w
        release_freed_memory()  # the quantizer's temporaries, freed by XLA's threads into their own heaps
    return [done[d] for d in devices]

  def blocks(self, leaf: str, index: tuple[slice, ...], devices: list) -> list[jax.Array]:
    """Block `index` of `leaf` ('q' or 'scale') on each of `devices`."""
    if leaf == 'q':
      parts = [q for q, _ in self._of({i: index[i] for i in self.outputs}, devices)]
      cut = tuple(slice(None) if i in self.outputs else s for i, s in enumerate(index))
    else:
      ranges = {d: s for d, s in zip(self.scale_dims, index) if d is not None}
      parts = [s for _, s in self._of(ranges, devices)]
      cut = tuple(s if d is None else slice(None) for d, s in zip(self.scale_dims, index))
    whole = all(c == slice(None) or c.indices(n) == (0, n, 1) for c, n in zip(cut, parts[0].shape))
    return parts if whole else [p[cut] for p in parts]


class QuantizedView:
  """`q` or `scale` of a QuantizedKernel: its blocks on given devices."""

  def __init__(self, kernel: QuantizedKernel, leaf: str):
    self.kernel, self.leaf = kernel, leaf

  def blocks(self, index: tuple[slice, ...], devices: list) -> list[jax.Array]:
    return self.kernel.blocks(self.leaf, index, devices)


@functools.partial(jax.jit, static_argnums=2, donate_argnums=0)
def put_along(whole: jax.Array, part: jax.Array, axis: int, offset) -> jax.Array:
  """`part` written into `whole` at `offset` along `axis`, in place (`whole` donated)."""
  return jax.lax.dynamic_update_slice_in_dim(whole, part, offset, axis)
