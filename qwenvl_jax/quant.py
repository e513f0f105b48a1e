"""Weight-only quantization of a params tree: int8 per output channel, int4 in groups along the inputs.

The kernels under `config.quantized_roots` (the decoder's and lm_head's unless told) become `q` (`q_t`
weight-major: int8 values shaped as the kernel; int4 ones in [-8, 7] two per uint8 byte along the kernel's
last input dim, low nibble first, `kernel_math.pack_int4`) and `scale` [groups,
*output dims] (stacked layers first), with w = scale * q: the layout GPTQ's Int4 checkpoints import into
(`layers.Einsum`; the released Int4 keeps lm_head float). The vision tower and the embedding table stay
float. Post-training, any checkpoint:

  params = quantize(params, config, 'int8'); model = QwenVL(config.replace(weights='int8'))

Our quantizer is symmetric round-to-nearest on each group's largest magnitude (absmax), deterministic;
scales are float32.
"""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax import param_layout, sharding
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.kernel_math import GROUPS_AXIS, PACKED, dequantize, pack_int4, quant_groups, unpack_int4
from qwenvl_jax.params import set_path
from qwenvl_jax.quant_blocks import QUANTIZED_NAMES

Path = tuple[str, ...]
MODES = ('int8', 'int4')
Q_MAX = {'int8': 127, 'int4': 7}  # symmetric: int4 leaves -8 unused, as absmax rounding never reaches it


def quantized_config(config: QwenVLConfig, mode: str) -> QwenVLConfig:
  """The config a tree quantized to `mode` is applied with ('float': as it is)."""
  if mode != 'float':
    check_mode(mode)
  return config.replace(weights=mode)


def check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'unknown quantization {mode!r}; expected one of {", ".join(MODES)}')


def _layout(path: Path, names: tuple[str, ...]):
  """(the kernel's dims in the scale's order with the groups in place of the inputs, where the groups
  go, how many input dims) for a kernel leaf with logical `names`."""
  scale_names = param_layout.axes_of(path[:-1] + ('scale',))
  at = scale_names.index(GROUPS_AXIS)
  kept = [names.index(n) for n in scale_names if n != GROUPS_AXIS]
  inputs = [i for i, n in enumerate(names) if n not in scale_names]
  return kept[:at] + inputs + kept[at:], at, len(inputs)


def packed_axis(path: Path, shape: tuple[int, ...]) -> int:
  """The dim of the kernel leaf at `path` (float, or its q of any form) along which int4 values pair up in
  a byte: its last input dim (`layers.Einsum` declares q so)."""
  names = param_layout.leaf_axes(path, shape)
  scale_names = param_layout.axes_of(path[:-1] + ('scale',))
  return max(i for i, n in enumerate(names) if n not in scale_names)


def pack(q, path: Path):
  """int4 values (int8, shaped as the kernel at `path`) -> the stored form: uint8, two per byte."""
  return pack_int4(q, packed_axis(path, np.shape(q)))


def unpack(q, path: Path):
  """A quantized leaf's values as int8 shaped as the kernel: packed int4 unpacked, int8 as it is."""
  return unpack_int4(q, packed_axis(path, np.shape(q))) if q.dtype == PACKED else q


def kernel_shape(q, path: Path) -> tuple[int, ...]:
  """The float kernel's shape of a quantized leaf `q` at `path` (packed int4: twice its last input dim)."""
  shape = list(np.shape(q))
  if q.dtype == PACKED:
    shape[packed_axis(path, tuple(shape))] *= 2
  return tuple(shape)


def quantize_kernel(w, path: Path, mode: str, group_size: int) -> tuple[jax.Array, jax.Array]:
  """(q, scale float32 [.., groups, *output dims]) of one kernel leaf at `path`: q int8 shaped as w, or
  for int4 uint8 with two values per byte along the last input dim (`pack`)."""
  check_mode(mode)
  order, at, n_inputs = _layout(path, param_layout.leaf_axes(path, np.shape(w)))
  wt = jnp.transpose(jnp.asarray(w, jnp.float32), order)
  in_shape = wt.shape[at:at + n_inputs]
  n_in = int(np.prod(in_shape))
  groups = quant_groups(n_in, mode, group_size)
  wt = wt.reshape(wt.shape[:at] + (groups, n_in // groups) + wt.shape[at + n_inputs:])
  absmax = jnp.max(jnp.abs(wt), axis=at + 1, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / Q_MAX[mode], 1.0)  # an all-zero group: q = 0 whatever the scale
  q = jnp.clip(jnp.round(wt / scale), -Q_MAX[mode], Q_MAX[mode]).astype(jnp.int8)
  q = jnp.transpose(q.reshape(wt.shape[:at] + in_shape + wt.shape[at + 2:]), np.argsort(order))
  return (pack(q, path) if mode == 'int4' else q), jnp.squeeze(scale, at + 1)


def dequantize_kernel(q, scale, path: Path, dtype=jnp.float32) -> jax.Array:
  """The float kernel w = scale * q of a quantized leaf at `path` (`q` or `q_t`), in `dtype`: what
  `kernel_math.dequantize` computes inside the model, here for a leaf of any form (stacked layers too)."""
  names = param_layout.leaf_axes(path, np.shape(q))
  scale_names = param_layout.axes_of(path[:-1] + ('scale',))
  letters = dict(zip(names, 'abcdefghijklmnopqrstuvwxyz'))
  kept = [n for n in names if n in scale_names]  # in q's order; the scale has them in its own
  to_q_order = [scale_names.index(GROUPS_AXIS)] + [scale_names.index(n) for n in kept]
  return dequantize(q, jnp.transpose(jnp.asarray(scale), to_q_order), ''.join(letters[n] for n in names),
                    ''.join(letters[n] for n in kept), dtype)


def quantize(params: dict, config: QwenVLConfig, mode: str) -> dict:
  """A float params tree (any form) with the kernels under `config.quantized_roots` quantized to `mode`, for
  `QwenVL(quantized_config(config, mode))`. Other leaves are the same arrays. (A checkpoint is quantized
  as it is read instead, never whole: `load`.)"""
  check_mode(mode)
  if config.weights != 'float':
    raise ValueError(f'the params are {config.weights} already; quantize a float tree')
  out: dict = {}
  for path, leaf in param_layout.flatten(params).items():
    if path[0] in config.quantized_roots and path[-1] in QUANTIZED_NAMES:
      q, scale = quantize_kernel(leaf, path, mode, config.group_size)
      set_path(out, path[:-1] + (QUANTIZED_NAMES[path[-1]],), q)
      set_path(out, path[:-1] + ('scale',), scale)
    elif path[-1] in QUANTIZED_NAMES.values():
      raise ValueError(f'{"/".join(path)} is quantized already; quantize a float tree')
    else:
      set_path(out, path, leaf)
  return out


def dequantize_params(params: dict, dtype=jnp.float32) -> dict:
  """A quantized tree back to float kernels w = scale * q in `dtype` (what a merged export writes); other
  leaves as they are."""
  flat = param_layout.flatten(params)
  out: dict = {}
  for path, leaf in flat.items():
    if path[-1] in QUANTIZED_NAMES.values():
      scale_path = path[:-1] + ('scale',)
      kernel = {v: k for k, v in QUANTIZED_NAMES.items()}[path[-1]]
      set_path(out, path[:-1] + (kernel,), dequantize_kernel(leaf, flat[scale_path], path, dtype))
    elif path[-1] == 'scale' and (path[:-1] + ('q',) in flat or path[:-1] + ('q_t',) in flat):
      continue
    else:
      set_path(out, path, leaf)
  return out


def _packed(path, mode: str):
  """The GPTQ config of `path` when `--weights mode` reads it packed as released (mode int4 over a
  released Int4 checkpoint), else None."""
  from qwenvl_jax.gptq import read_config
  if mode == 'int4' and (pathlib.Path(path) / 'config.json').is_file():
    return read_config(path)
  return None


def load(path, mode: str, dtype, **kw) -> tuple[dict, QwenVLConfig]:
  """(params, config) of a checkpoint directory for `--weights mode` (chat, serve, qwenvl-eval): a
  released GPTQ Int4 checkpoint with 'int4' read packed as it is (its groups, lm_head float: the released
  values, nothing quantized again); else the float weights (`kw` to load_pretrained, e.g. `shardings`),
  quantized kernel by kernel as they are read (onto `shardings`): the float base is never held whole.
  A quantized tree comes with its layers stacked (`split_layers` applies to float weights only)."""
  from qwenvl_jax.checkpoint import load_pretrained
  if _packed(path, mode) is not None:
    kw.pop('split_layers', None)
    model, params = load_pretrained(path, dtype=dtype, keep_packed=True, **kw)
    return params, model.config.replace(dtype=dtype)
  if mode != 'float':
    check_mode(mode)
    kw.pop('split_layers', None)
    kw.update(weights=mode, quantize=quantize_kernel)
  model, params = load_pretrained(path, dtype=dtype, **kw)
  return params, model.config.replace(dtype=dtype)


def load_onto(path, mode: str, dtype, mesh: jax.sharding.Mesh, rules) -> tuple[dict, QwenVLConfig]:
  """`load` straight onto `mesh`, each leaf on its logical axes' sharding under `rules`: each host reads
  (and quantizes) only its devices' blocks, so no device holds the whole model, float or quantized."""
  from qwenvl_jax.gptq_checkpoint import packed_config
  from qwenvl_jax.model import QwenVL, param_shapes
  if not (pathlib.Path(path) / 'config.json').is_file():
    return load(path, mode, dtype)  # not a checkpoint: its error, naming what the directory is
  config, gptq_config = QwenVLConfig.from_json(path), _packed(path, mode)
  config = quantized_config(config, mode) if gptq_config is None else packed_config(config, gptq_config)
  shardings = sharding.param_shardings(mesh, param_shapes(QwenVL(config)), rules)
  return load(path, mode, dtype, shardings=shardings)


def is_quantized(params: dict) -> bool:
  return any(p[-1] in QUANTIZED_NAMES.values() for p in param_layout.flatten(params))
