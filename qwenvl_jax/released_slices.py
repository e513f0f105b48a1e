"""The released layout read straight onto a mesh: each process copies only the slices its devices hold.

`load_pretrained` on one device keeps its own path (every tensor cast once into the whole leaf). Over
several devices, or several hosts, a host would otherwise read every tensor into whole leaves and then
split them: the full model in host memory, on every host. Here each source tensor (memory-mapped, in the
order of its file) is changed into the leaf's layout by its `params.Rule` (a view: reshape and transpose,
no copy) and only the blocks of this process's devices are copied out of it, cast on the way, into one
buffer per device. A leaf goes onto its devices once its last tensor is read (a stacked leaf after its
last layer), so the host holds at most its devices' share of the parameters plus the pages of one
tensor; on the CPU the devices adopt those buffers without a copy.

With `config.weights` int8 or int4 the decoder's kernels are quantized on the way (`quant_blocks`): each
kernel leaf becomes its `q` and `scale`, their blocks quantized from the float tensor's rows on the devices
that hold them and assembled there, so the host holds one float tensor's rows, never the float base. A
block that several of this process's devices hold is read once and copied to each.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple

import jax
import numpy as np

from qwenvl_jax import param_layout
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.kernel_math import PACKED
from qwenvl_jax.orbax_leaves import aligned_empty, to_device
from qwenvl_jax.params import Path, Rule, rules, set_path
from qwenvl_jax.quant_blocks import (QUANTIZED_NAMES, Quantize, QuantizedKernel, QuantizedView, put_along,
                                     quantized_paths)


class _Leaf:
  """The per-device blocks of one leaf being filled, and how many source tensors are still to come. Host
  sources are copied into one host buffer per device; quantized ones (`QuantizedView`) arrive as blocks
  already on their devices and are assembled there."""

  def __init__(self, shape: tuple[int, ...], sharding: jax.sharding.Sharding, dtype, pending: int,
               on_devices: bool = False):
    self.shape, self.sharding, self.pending, self.dtype = shape, sharding, pending, np.dtype(dtype)
    self.blocks = [(device, _key(index, shape)) for device, index in
                   sharding.addressable_devices_indices_map(shape).items()]
    # The devices that hold each distinct block (replicas): a block is read once, however many hold it.
    self.holders: dict[tuple, list[int]] = {}
    for i, (_, key) in enumerate(self.blocks):
      self.holders.setdefault(key, []).append(i)
    # One buffer per device, even for replicated blocks: a device array adopts its buffer, and a donated
    # one may be overwritten in place, so two devices must never share one.
    self.buffers = ([None] * len(self.blocks) if on_devices else
                    [aligned_empty(tuple(b - a for a, b in key), dtype) for _, key in self.blocks])

  def fill(self, rule: Rule, source) -> None:
    """Copies the parts of `source` (one released tensor, already in the leaf's layout) that the blocks
    hold: the whole leaf, or layer `rule.layer` of a stacked one."""
    for key, holders in self.holders.items():
      if rule.layer is None:
        index, layer = key, None
      elif key[0][0] <= rule.layer < key[0][1]:
        index, layer = key[1:], rule.layer - key[0][0]
      else:
        continue
      index = tuple(slice(a, b) for a, b in index)
      if isinstance(source, QuantizedView):
        for i, block in zip(holders, source.blocks(index, [self.blocks[i][0] for i in holders])):
          self._on_device(i, key, layer, block)
        continue
      block = source[index]
      for i in holders:
        self.buffers[i][... if layer is None else layer] = block
    self.pending -= 1

  def _on_device(self, i: int, key: tuple, layer: int | None, block: jax.Array) -> None:
    if layer is None:
      self.buffers[i] = block
      return
    if self.buffers[i] is None:
      self.buffers[i] = jax.numpy.zeros(tuple(b - a for a, b in key), self.dtype, device=self.blocks[i][0])
    self.buffers[i] = put_along(self.buffers[i], block[None], 0, layer)

  def to_devices(self) -> jax.Array:
    arrays = [b if isinstance(b, jax.Array) else to_device(b, jax.sharding.SingleDeviceSharding(device))
              for (device, _), b in zip(self.blocks, self.buffers)]
    self.buffers.clear()
    return jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays)


def _key(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """A device's index (slices, possibly open) -> ((start, stop) per axis)."""
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f'strided shard index {index} of a leaf of shape {shape}')
    out.append((start, stop))
  return tuple(out)


class Named(NamedTuple):
  """An entry as `read_onto` needs it: the released name of its tensor."""
  name: str


def read_onto(tensors, config: QwenVLConfig, shardings: Mapping[Path, jax.sharding.Sharding], dtype,
              quantize: Callable | None = None, table: Mapping[str, Rule] | None = None) -> dict:
  """The params tree in `dtype` on `shardings` (Flax path -> Sharding, every leaf), from `tensors`:
  (entry with `.name`, array) pairs as `ReleasedCheckpoint.tensors()` yields them, names already checked
  against `table` (default: the released layout's `params.rules`). Only this process's blocks are
  copied; every process passes the same shardings. With `config.weights` int8|int4, the kernels under
  `config.quantized_roots` come quantized by `quantize` (`quant.quantize_kernel`) to its mode and group
  size, `q` int8 (int4: uint8, two values per byte) and `scale` float32, as `quant.quantize` would make
  them of the `dtype` tree."""
  table = rules(config) if table is None else table
  counts: dict[Path, int] = {}
  for rule in table.values():
    counts[rule.path] = counts.get(rule.path, 0) + 1
  quantized = config.weights != 'float'
  q_dtype = PACKED if config.weights == 'int4' else np.int8
  shapes = param_layout.leaf_shapes(config) if quantized else {}
  # one compiled quantizer per block shape (and layout), run on the devices that hold the block
  bound: Quantize | None = None
  if quantized and quantize is not None:
    bound = jax.jit(functools.partial(quantize, mode=config.weights, group_size=config.group_size),
                    static_argnums=1)
  leaves: dict[Path, _Leaf] = {}
  params: dict = {}
  for entry, array in tensors:
    rule = table[entry.name]
    if isinstance(array, Mapping):
      parts = [(path, array[k], array[k].dtype) for path, k in zip(quantized_paths(rule.path), ('q', 'scale'))]
    elif quantized and rule.path[0] in config.quantized_roots and rule.path[-1] in QUANTIZED_NAMES:
      if bound is None:
        raise ValueError(f'weights={config.weights} needs the quantizer (quant.quantize_kernel)')
      kernel = QuantizedKernel(rule.to_flax(array), _one_layer(rule), dtype, bound)
      parts = zip(quantized_paths(rule.path), (kernel.q, kernel.scale), (q_dtype, np.float32))
    else:
      parts = [(rule.path, rule.to_flax(array), dtype)]
    for path, part, part_dtype in parts:
      leaf = leaves.get(path)
      if leaf is None:
        shape = shapes[path] if quantized else rule.leaf_shape
        leaf = leaves[path] = _Leaf(shape, shardings[path], part_dtype, counts[rule.path],
                                    isinstance(part, QuantizedView))
      leaf.fill(rule, part)
      if not leaf.pending:
        set_path(params, path, leaves.pop(path).to_devices())
  if leaves:  # names were checked against the config: unreachable unless a tensor is listed twice
    raise ValueError(f'leaves left incomplete: {sorted("/".join(p) for p in leaves)}')
  return params


def _one_layer(rule: Rule) -> Path:
  """The path of a slice's layout (`param_layout`): one layer of a stacked leaf as 'layers_0', whichever
  layer it is (every layer's layout is the same: one compiled quantizer serves them all)."""
  if rule.layer is None:
    return rule.path
  at = rule.path.index('layers')
  return rule.path[:at] + ('layers_0',) + rule.path[at + 1:]
