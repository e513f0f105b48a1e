"""A float kernel seen as its quantized leaves, block by block: how a quantized base is read onto a mesh.

Quantizing the whole float tree and then sharding it holds the float base in one place (at the released
size 9.6B x 4 bytes on one device). Here a kernel tensor (memory-mapped, one layer of a stacked leaf) is
quantized only where a device block asks for it: `q` and `scale` are views whose blocks come from the
float rows of their output channels, with every input. A channel's int8 scale needs its whole reduction
axis, and int4's groups run along it, so a block split along the inputs (FSDP's 'embed' of an MLP's
first kernel, tensor parallelism's 'mlp' of its second) still reads them all; the values are those of
quantizing the whole tensor, bit for bit (each channel's scale and values depend on that channel alone).
Each set of output channels is quantized once, for all the blocks (q's and scale's) that share it, a
block of float rows (`orbax_leaves.BLOCK_BYTES`) at a time.

The quantizer is passed in (`quant.quantize_kernel`): `quant` sits above the checkpoint readers.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from qwenvl_jax import param_layout
from qwenvl_jax.kernel_math import GROUPS_AXIS
from qwenvl_jax.orbax_leaves import BLOCK_BYTES

Path = tuple[str, ...]
# (float kernel, its path) -> (q, scale): `quant.quantize_kernel` bound to a mode and group size
Quantize = Callable[[np.ndarray, Path], tuple[np.ndarray, np.ndarray]]
QUANTIZED_NAMES = {'kernel': 'q', 'kernel_t': 'q_t'}


def quantized_paths(path: Path) -> tuple[Path, Path]:
  """(q's path, scale's path) of the float kernel leaf at `path`."""
  return path[:-1] + (QUANTIZED_NAMES[path[-1]],), path[:-1] + ('scale',)


class QuantizedKernel:
  """One float kernel `source` (in its leaf's layout; `path` names it, per layer for a stacked leaf) seen
  as `.q` and `.scale`: objects whose `[index]` (a tuple of slices, one per dim) is that block of the
  quantized leaf, the float rows cast to `dtype` first (as a float load would have stored them)."""

  def __init__(self, source, path: Path, dtype, quantize: Quantize):
    self.source, self.path, self.dtype, self.quantize = source, path, np.dtype(dtype), quantize
    names = param_layout.leaf_axes(path, np.shape(source))
    scale_names = param_layout.axes_of(quantized_paths(path)[1])
    self.outputs = [i for i, n in enumerate(names) if n in scale_names]  # the dims the scale keeps
    # each scale dim's kernel dim (None: the groups)
    self.scale_dims = [None if n == GROUPS_AXIS else names.index(n) for n in scale_names]
    self._done: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

  # Views made on demand, not kept: a view held here would be a reference cycle, and the quantized blocks
  # cached in `_done` would wait for the garbage collector (a tensor's worth of int8 per kernel read).
  @property
  def q(self) -> '_View':
    return _View(self, 'q')

  @property
  def scale(self) -> '_View':
    return _View(self, 'scale')

  def _of(self, ranges: dict[int, slice]) -> tuple[np.ndarray, np.ndarray]:
    """(q, scale) of the output channels `ranges` (kernel dim -> slice) with every input, quantized
    BLOCK_BYTES of float rows at a time along the first output dim (a 2.5 GB lm_head is never in float
    whole, nor the quantizer's temporaries of it)."""
    key = tuple((ranges[i].start, ranges[i].stop) for i in self.outputs)
    if key in self._done:
      return self._done[key]
    shape = np.shape(self.source)
    index = [ranges.get(i, slice(None)) for i in range(len(shape))]
    extent = [len(range(*s.indices(n))) for s, n in zip(index, shape)]
    first = self.outputs[0]
    start = index[first].indices(shape[first])[0]
    per_row = 4 * int(np.prod(extent)) // max(1, extent[first])  # float32 bytes: the quantizer's precision
    step = max(1, BLOCK_BYTES // per_row)
    at = self.scale_dims.index(first)
    q = scale = None
    for lo in range(0, extent[first], step):
      hi = min(lo + step, extent[first])
      index[first] = slice(start + lo, start + hi)
      w = np.asarray(self.source[tuple(index)]).astype(self.dtype, copy=False)
      q_part, scale_part = (np.asarray(a) for a in self.quantize(w, self.path))
      del w
      if q is None:  # q_part's shape: every input (int4 two per byte along one of them), these rows
        q = np.empty(q_part.shape[:first] + (extent[first],) + q_part.shape[first + 1:], q_part.dtype)
        scale = np.empty(scale_part.shape[:at] + (extent[first],) + scale_part.shape[at + 1:], scale_part.dtype)
      q[(slice(None),) * first + (slice(lo, hi),)] = q_part
      scale[(slice(None),) * at + (slice(lo, hi),)] = scale_part
    self._done[key] = (q, scale)
    return q, scale

  def block(self, leaf: str, index: tuple[slice, ...]) -> np.ndarray:
    if leaf == 'q':
      q, _ = self._of({i: index[i] for i in self.outputs})
      return q[tuple(slice(None) if i in self.outputs else s for i, s in enumerate(index))]
    _, scale = self._of({d: s for d, s in zip(self.scale_dims, index) if d is not None})
    return scale[tuple(s if d is None else slice(None) for d, s in zip(self.scale_dims, index))]


class _View:
  def __init__(self, kernel: QuantizedKernel, leaf: str):
    self.kernel, self.leaf = kernel, leaf

  def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
    return self.kernel.block(self.leaf, index)
