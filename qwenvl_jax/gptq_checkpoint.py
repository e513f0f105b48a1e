"""Reading the released Int4 checkpoint (`gptq`'s layout) through the float model's name mapping.

The Int4 names follow from the float ones: each quantized `transformer.h.N.P.weight` is replaced by
`P.qweight`, `P.qzeros`, `P.scales`, `P.g_idx` and `P.bias` (c_attn's bias is the float model's own). The
tensors are read in `int4_names` order, a layer's parts one after another wherever the shards keep them
(safetensors stores a shard's tensors by dtype, then name: every int32 part of its layers before the first
float16 scale), each copied out of its memory-mapped shard as it comes (`ReleasedCheckpoint.tensors` lets
the pages go) and unpacked with its layer's last part: the host holds one layer's packed parts at a time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Mapping

import numpy as np

from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.gptq import (INT_PARTS, PART_FLOAT, PARTS, QUANTIZED, Q, SCALE, GptqConfig, check_dims, pack,
                             part_shapes, unpack)
from qwenvl_jax.kernel_math import dequantize, pack_int4, unpack_int4
from qwenvl_jax.params import CheckpointMismatchError, Rule, check_shapes, get_path, rules
from qwenvl_jax.released_layout import ReleasedCheckpoint, TensorEntry, check_float
from qwenvl_jax.quant_blocks import quantized_paths
from qwenvl_jax.released_slices import Named

Path = tuple[str, ...]


def quantized_rules(config: QwenVLConfig) -> dict[str, Rule]:
  """Layer name ('transformer.h.N.attn.c_attn') -> the float rule of its weight."""
  table = rules(config)
  return {name[:-len('.weight')]: rule for name, rule in table.items()
          if name.startswith('transformer.h.') and name.endswith('.weight')
          and name[:-len('.weight')].split('.', 3)[3] in QUANTIZED}


def expected_shapes(config: QwenVLConfig, gcfg: GptqConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor name of the Int4 layout -> shape; refuses dims the packing cannot cover."""
  shapes = {name: rule.hf_shape for name, rule in rules(config).items()}
  for layer, rule in quantized_rules(config).items():
    out_features, in_features = rule.hf_shape
    check_dims(layer, in_features, out_features, gcfg)
    del shapes[layer + '.weight']
    shapes.update((f'{layer}.{p}', s) for p, s in part_shapes(in_features, out_features, gcfg).items())
  return shapes


def check_int4(checkpoint: ReleasedCheckpoint, config: QwenVLConfig, gcfg: GptqConfig) -> None:
  """Names, shapes (CheckpointMismatchError) and dtypes of every tensor, from the shard headers alone."""
  try:
    check_shapes(checkpoint.shapes(), expected_shapes(config, gcfg))
  except CheckpointMismatchError as e:
    e.args = (f'{checkpoint.root}: {e} (config.json, with its quantization_config, and the weights do not '
              'belong together)',)
    raise
  layers = quantized_rules(config)
  check_float(checkpoint, [n for n in checkpoint.entries if _split(n, layers) is None],
              'not a part of a quantized layer')


def _split(name: str, layers: Mapping[str, Rule]) -> tuple[str, str] | None:
  layer, _, part = name.rpartition('.')
  return (layer, part) if layer in layers and part in PARTS else None


def _layers(checkpoint: ReleasedCheckpoint, config: QwenVLConfig, gcfg: GptqConfig,
            ) -> Iterator[tuple[TensorEntry, np.ndarray] | tuple[TensorEntry, Rule, dict[str, np.ndarray]]]:
  """The checkpoint's float tensors as they come (entry, array), and each quantized layer once complete,
  as (the entry of its last part, its weight's float rule, `unpack`ed {'q', 'scale'} [in, out]); read in
  `int4_names` order."""
  layers, float_names = quantized_rules(config), rules(config)
  pending: dict[str, dict[str, np.ndarray]] = {}
  for entry, array in checkpoint.tensors(int4_names(config)):
    split = _split(entry.name, layers)
    if split is None:
      yield entry, array
      continue
    layer, part = split
    parts = pending.setdefault(layer, {})
    # A copy: the memory-mapped pages go as the next tensor is read; touched again at unpack they would stay.
    parts[part] = np.array(array)
    if part == 'bias' and layer + '.bias' in float_names:  # c_attn's bias is also the float model's
      yield entry, array
    if len(parts) == len(PARTS):
      yield entry, layers[layer], unpack(layer, pending.pop(layer), gcfg)
  if pending:  # names were checked: unreachable
    raise ValueError(f'quantized layers left incomplete: {sorted(pending)}')


def dequantized(checkpoint: ReleasedCheckpoint, config: QwenVLConfig, gcfg: GptqConfig,
                dtype=np.float32) -> Iterator[tuple[TensorEntry, np.ndarray]]:
  """The float model's (entry, array) pairs of the checkpoint (names checked), each quantized weight
  dequantized into `dtype` as torch stores it ([out, in]; its entry names the weight and has no `start`),
  for `released_slices.read_onto` or the converter."""
  for item in _layers(checkpoint, config, gcfg):
    if len(item) == 2:
      yield item
      continue
    entry, rule, packed = item
    weight = dequantize(packed[Q], packed[SCALE], 'io', 'o', dtype).T
    yield (dataclasses.replace(entry, name=rule.hf_name, dtype=weight.dtype, shape=weight.shape, start=None),
           weight)


def out_shape(rule: Rule) -> tuple[int, ...]:
  """The kernel's output dims: its trailing dims that make up the torch weight's rows."""
  shape = rule.slice_shape
  for s in range(len(shape)):
    if math.prod(shape[s:]) == rule.hf_shape[0]:
      return shape[s:]
  raise ValueError(f'{rule.hf_name}: no output dims in {shape}')


def _last_input(rule: Rule) -> int:
  """The kernel's last input dim (its dims: the inputs, then `out_shape`): where int4 values pair up."""
  return len(rule.slice_shape) - len(out_shape(rule)) - 1


def to_kernel(rule: Rule, packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{'q' [in, out], 'scale' [groups, out]} -> the packed form laid out as the rule's float kernel, the
  int4 values two per byte along its last input dim (`kernel_math.pack_int4`, as `layers.Einsum` holds them)."""
  scale = packed[SCALE]
  q = pack_int4(rule.to_flax(packed[Q].T), _last_input(rule))
  return {Q: q, SCALE: scale.reshape(scale.shape[:1] + out_shape(rule))}


def from_kernel(rule: Rule, kernel: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The inverse of to_kernel."""
  scale = np.asarray(kernel[SCALE])
  q = unpack_int4(np.asarray(kernel[Q]), _last_input(rule))
  return {Q: rule.to_hf(q).T, SCALE: scale.reshape(scale.shape[0], -1)}


def packed_config(config: QwenVLConfig, gcfg: GptqConfig) -> QwenVLConfig:
  """The config the packed tree is applied with: the decoder's kernels int4 in the checkpoint's groups,
  lm_head float (the release keeps it float)."""
  return config.replace(weights='int4', group_size=gcfg.group_size, quantized_roots=('decoder',))


def packed_tensors(checkpoint: ReleasedCheckpoint, config: QwenVLConfig, gcfg: GptqConfig
                   ) -> Iterator[tuple[TensorEntry | Named, np.ndarray | dict[str, np.ndarray]]]:
  """The checkpoint's tensors (names checked) for `released_slices.read_onto`: the float ones as they come,
  each quantized layer once complete as (an entry named as its float weight, {'q', 'scale'} of one layer
  in the kernel's layout)."""
  for item in _layers(checkpoint, config, gcfg):
    if len(item) == 2:
      yield item
      continue
    _, rule, packed = item
    yield Named(rule.hf_name), to_kernel(rule, packed)


def int4_names(config: QwenVLConfig) -> Iterator[str]:
  """The Int4 names in `rules` order, a quantized layer's parts (PARTS order) where its weight is: the
  order the layout is read (`ReleasedCheckpoint.tensors(int4_names(config))`) and written in."""
  layers = quantized_rules(config)
  for name in rules(config):
    layer, _, last = name.rpartition('.')
    if layer not in layers:
      yield name
    elif last == 'weight':
      yield from (f'{layer}.{p}' for p in PARTS)


def int4_specs(config: QwenVLConfig, gcfg: GptqConfig, dtype=np.float16) -> list[tuple[str, np.dtype, tuple]]:
  """(name, dtype, shape) of every Int4 tensor, in the order `int4_tensors` yields them: the packed parts
  int32, scales and biases float16 (as AutoGPTQ's QuantLinear keeps them), the float tensors in `dtype`."""
  shapes, layers = expected_shapes(config, gcfg), quantized_rules(config)

  def kind(name: str) -> np.dtype:
    part = (_split(name, layers) or ('', ''))[1]
    return np.dtype(np.int32 if part in INT_PARTS else PART_FLOAT if part else dtype)
  return [(n, kind(n), shapes[n]) for n in int4_names(config)]


def int4_tensors(params: Mapping, config: QwenVLConfig, gcfg: GptqConfig, dtype=np.float16
                 ) -> Iterator[tuple[str, np.ndarray]]:
  """A params tree with packed kernels -> every tensor of the Int4 layout, in `int4_specs` order, one layer
  at a time; the float tensors cast to `dtype` (exact for a float32 tree loaded from float16), scales and
  biases to float16 as the layout stores them."""
  table, layers = rules(config), quantized_rules(config)

  def leaf(path: Path, what: str):
    try:
      return get_path(params, path)
    except (KeyError, TypeError):
      raise CheckpointMismatchError([f'{"/".join(path)} ({what})'], where='the params tree',
                                    against='the Int4 layout') from None

  def hf(rule: Rule) -> np.ndarray:
    a = leaf(rule.path, 'a float leaf')
    return rule.to_hf(np.asarray(a if rule.layer is None else a[rule.layer])).astype(dtype, copy=False)

  parts: dict[str, np.ndarray] = {}
  for name in int4_names(config):
    split = _split(name, layers)
    if split is None:
      yield name, hf(table[name])
      continue
    layer, part = split
    if part == PARTS[0]:
      rule = layers[layer]
      kernel = {k: np.asarray(leaf(p, 'packed')[rule.layer])
                for k, p in zip((Q, SCALE), quantized_paths(rule.path))}
      bias = hf(table[layer + '.bias']).astype(PART_FLOAT) if layer + '.bias' in table else None
      parts = _pack(from_kernel(rule, kernel), bias)
    yield name, parts[part]


def _pack(unpacked: Mapping[str, np.ndarray], bias: np.ndarray | None) -> dict[str, np.ndarray]:
  """A layer's stored parts: scales and bias float16 as the layout keeps them."""
  return pack(unpacked[Q], unpacked[SCALE].astype(PART_FLOAT, copy=False), bias)


def repacked_tensors(checkpoint: ReleasedCheckpoint, config: QwenVLConfig, gcfg: GptqConfig, dtype=np.float16
                     ) -> Iterator[tuple[str, np.ndarray]]:
  """The checkpoint's tensors (checked) as `int4_tensors` writes them from its packed load in `dtype`
  (`load_pretrained(..., dtype, keep_packed=True)`): the same values, read and written on the host a layer
  at a time, never a whole tree. Float tensors cast to `dtype`; each layer unpacked (every part checked)
  and packed again; c_attn's bias through `dtype` (as the load holds it) into float16."""
  layers = quantized_rules(config)
  bias = None
  for item in _layers(checkpoint, config, gcfg):
    if len(item) == 3:
      _, rule, unpacked = item
      layer = rule.hf_name[:-len('.weight')]
      packed = _pack(unpacked, bias)
      yield from ((f'{layer}.{p}', packed[p]) for p in PARTS)
      bias = None
    elif _split(item[0].name, layers) is not None:  # c_attn's bias, a float tensor and a part of its layer
      bias = item[1].astype(dtype).astype(PART_FLOAT)
    else:
      yield item[0].name, item[1].astype(dtype)
