"""The GPTQ Int4 layout of the released Qwen-VL-Chat-Int4 (AutoGPTQ's `cuda-old` QuantLinear), and the one
packed form our quantized layers take.

Stored, per quantized linear P (the decoder's attn.c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj; torch
Linear(in, out)):
- `P.qweight` int32 [in/8, out]: eight 4-bit values per int32, lowest bits first, along the input dim;
- `P.qzeros` int32 [groups, out/8]: each 4-bit value the zero point minus one (AutoGPTQ's v1 format),
  packed along the output dim;
- `P.scales` float16 [groups, out]; `P.g_idx` int32 [in]: the group of each input channel;
- `P.bias` float16 [out]: zeros where the original layer has none (all but c_attn).
The weight of input i, output o is `scales[g_idx[i], o] * (q[i, o] - (z[g_idx[i], o] + 1))`.

Packed form (`unpack`), per kernel: `q`, int8 holding q - zero in [-8, 7], laid out as the float kernel of
our parameter tree ([*in dims, *out dims]), and `scale`, the stored float16 scales as [groups, *out dims],
each group `group_size` consecutive input channels (the in dims flattened): w = scale[i // group_size] * q[i]
(`kernel_math.dequantize`).
In a params tree the two are leaves `q` and `scale` in place of the layer's `kernel`, stacked layers first
(`quant_blocks.quantized_paths`): the parameters of `layers.Einsum` with int4 weights.

Only what that form can hold exactly is accepted; everything else is refused by name
(UnsupportedQuantizationError), never guessed: bits other than 4, a `g_idx` that is not
`arange(in) // group_size` (desc_act's act-order), zero points other than the midpoint 8 (asymmetric),
group sizes that do not divide the input dim, a non-zero bias where the original layer has none.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from qwenvl_jax.jsonfile import ConfigFileError, get, read_object
from qwenvl_jax.released_layout import CheckpointFormatError

BITS = 4
PER_INT32 = 32 // BITS
ZERO = 1 << (BITS - 1)  # the symmetric zero point, stored as ZERO - 1
QUANTIZED = ('attn.c_attn', 'attn.c_proj', 'mlp.w1', 'mlp.w2', 'mlp.c_proj')  # of every transformer.h.N
WITH_BIAS = ('attn.c_attn',)  # the original's quantized layers that have a bias
PARTS = ('qweight', 'qzeros', 'scales', 'g_idx', 'bias')
INT_PARTS = ('qweight', 'qzeros', 'g_idx')
PART_FLOAT = np.dtype(np.float16)  # of the scales and biases
Q, SCALE = 'q', 'scale'


class UnsupportedQuantizationError(CheckpointFormatError):
  """A quantized checkpoint using something the loader cannot represent exactly; the message names it."""


@dataclasses.dataclass(frozen=True)
class GptqConfig:
  """`quantization_config` of config.json (the keys that change how the tensors are read)."""
  bits: int = BITS
  group_size: int = 128
  desc_act: bool = False
  sym: bool = True

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], file: str | os.PathLike) -> GptqConfig:
    """Checked; refuses what the loader does not support, naming the key."""
    p = 'quantization_config.'
    method = get(d, 'quant_method', str, file, 'gptq', prefix=p)
    if method != 'gptq':
      raise UnsupportedQuantizationError(f'{file}: {p}quant_method {method!r} is not supported (only gptq)')
    fmt = get(d, 'checkpoint_format', str, file, 'gptq', prefix=p)
    if fmt != 'gptq':  # gptq_v2 stores the zero points without the -1
      raise UnsupportedQuantizationError(f'{file}: {p}checkpoint_format {fmt!r} is not supported (only gptq, '
                                         'the v1 format of the released Int4)')
    bits = get(d, 'bits', int, file, prefix=p)
    if bits != BITS:
      raise UnsupportedQuantizationError(f'{file}: {p}bits {bits} is not supported (only {BITS}-bit GPTQ)')
    group_size = get(d, 'group_size', int, file, prefix=p)
    if group_size == 0 or group_size < -1:
      raise ConfigFileError(file, f'expected a positive group size or -1 (one group), found {group_size}',
                            p + 'group_size')
    if not get(d, 'sym', bool, file, True, prefix=p):
      raise UnsupportedQuantizationError(f'{file}: {p}sym false (asymmetric zero points) is not supported')
    return cls(bits, group_size, get(d, 'desc_act', bool, file, False, prefix=p), True)

  def to_dict(self) -> dict[str, Any]:
    return {'bits': self.bits, 'group_size': self.group_size, 'desc_act': self.desc_act, 'sym': self.sym,
            'quant_method': 'gptq'}

  def groups(self, in_features: int) -> int:
    return 1 if self.group_size == -1 else -(-in_features // self.group_size)


def read_config(path: str | os.PathLike) -> GptqConfig | None:
  """The GPTQ config of a released-layout directory (or its config.json); None for a float checkpoint."""
  path = pathlib.Path(path)
  file = path / 'config.json' if path.is_dir() else path
  d = read_object(file)
  if 'quantization_config' not in d:
    return None
  return GptqConfig.from_dict(get(d, 'quantization_config', dict, file), file)


def check_dims(name: str, in_features: int, out_features: int, gcfg: GptqConfig) -> None:
  """Refuses a layer whose dims the packing or the groups cannot cover exactly (from the config alone)."""
  if in_features % PER_INT32 or out_features % PER_INT32:
    raise UnsupportedQuantizationError(f'{name}: dims {in_features}x{out_features} are not multiples of '
                                       f'{PER_INT32} (the 4-bit values per int32)')
  if gcfg.group_size != -1 and in_features % gcfg.group_size:
    raise UnsupportedQuantizationError(f'{name}: group_size {gcfg.group_size} does not divide the input dim '
                                       f'{in_features}')


def part_shapes(in_features: int, out_features: int, gcfg: GptqConfig) -> dict[str, tuple[int, ...]]:
  g = gcfg.groups(in_features)
  return {'qweight': (in_features // PER_INT32, out_features), 'qzeros': (g, out_features // PER_INT32),
          'scales': (g, out_features), 'g_idx': (in_features,), 'bias': (out_features,)}


def unpack_nibbles(packed: np.ndarray, axis: int) -> np.ndarray:
  """int32 -> uint8 4-bit values, eight per int32 (lowest bits first) along `axis`, which grows 8x.

  Byte by byte (little-endian: value 2j is byte j's low half): no int32 temporaries, 2 bytes per value.
  """
  shape = tuple(packed.shape)
  octets = np.ascontiguousarray(packed, '<i4').view(np.uint8).reshape(shape + (4,))
  nibbles = np.empty(shape + (4, 2), np.uint8)
  np.bitwise_and(octets, 15, out=nibbles[..., 0])
  np.right_shift(octets, 4, out=nibbles[..., 1])
  grown = shape[:axis] + (shape[axis] * PER_INT32,) + shape[axis + 1:]
  return np.moveaxis(nibbles.reshape(shape + (PER_INT32,)), -1, axis + 1).reshape(grown)


def pack_nibbles(values: np.ndarray, axis: int) -> np.ndarray:
  """The inverse of unpack_nibbles: 4-bit values (0..15) -> int32, eight per int32 along `axis`."""
  shape = list(values.shape)
  shape[axis:axis + 1] = [shape[axis] // PER_INT32, PER_INT32]
  shifts = np.arange(PER_INT32, dtype=np.uint32) * BITS
  words = values.astype(np.uint32).reshape(shape) << shifts.reshape((-1,) + (1,) * (len(shape) - axis - 2))
  return np.bitwise_or.reduce(words, axis=axis + 1).view(np.int32)


def unpack(name: str, parts: Mapping[str, np.ndarray], gcfg: GptqConfig) -> dict[str, np.ndarray]:
  """One stored layer (`parts` by PARTS name, shapes already checked) -> {'q': int8 [in, out],
  'scale': float16 [groups, out]}, after refusing by name whatever that form cannot hold."""
  wrong = [f'{name}.{p} ({parts[p].dtype})' for p in PARTS
           if (parts[p].dtype != np.int32) == (p in INT_PARTS)]
  if wrong:
    raise UnsupportedQuantizationError(f'unexpected dtypes (qweight, qzeros, g_idx int32; scales, bias '
                                       f'float): {", ".join(wrong)}')
  in_features = parts['g_idx'].shape[0]
  size = in_features if gcfg.group_size == -1 else gcfg.group_size
  if not np.array_equal(parts['g_idx'], np.arange(in_features) // size):
    raise UnsupportedQuantizationError(
        f'{name}.g_idx: input channels are not in consecutive groups of {size} (act-order, desc_act '
        f'{str(gcfg.desc_act).lower()}); only the identity order is supported')
  zeros = unpack_nibbles(parts['qzeros'], 1).astype(np.int32) + 1
  if np.any(zeros != ZERO):
    found = sorted(set(np.unique(zeros).tolist()) - {ZERO})
    raise UnsupportedQuantizationError(f'{name}.qzeros: asymmetric zero points {found[:8]} (only the '
                                       f'symmetric {ZERO}, stored as {ZERO - 1}, is supported)')
  if not any(name.endswith(b) for b in WITH_BIAS) and np.any(parts['bias'] != 0):
    raise UnsupportedQuantizationError(f'{name}.bias: non-zero, but the original layer has no bias')
  q = unpack_nibbles(parts['qweight'], 0).view(np.int8)  # a fresh array: shifted in place
  q -= ZERO
  return {Q: q, SCALE: np.asarray(parts['scales'])}


def pack(q: np.ndarray, scale: np.ndarray, bias: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The inverse of unpack: {'q' int8 [in, out], 'scale' [groups, out]} -> the stored parts (bias: zeros
  in the scales' dtype unless given)."""
  in_features, out_features = q.shape
  groups = scale.shape[0]
  if in_features % groups or q.min(initial=0) < -ZERO or q.max(initial=0) >= ZERO:
    raise ValueError(f'not a packed 4-bit kernel: q {q.shape} in [{q.min()}, {q.max()}], scale {scale.shape}')
  zeros = np.full((groups, out_features), ZERO - 1, np.uint8)
  return {'qweight': pack_nibbles((q.astype(np.int16) + ZERO).astype(np.uint8), 0),
          'qzeros': pack_nibbles(zeros, 1), 'scales': scale,
          'g_idx': (np.arange(in_features) // (in_features // groups)).astype(np.int32),
          'bias': np.zeros(out_features, scale.dtype) if bias is None else bias}
