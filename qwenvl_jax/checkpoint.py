"""Loading checkpoints: the released Hugging Face layout and the Orbax layout written by `qwenvl-convert`.

The released layout is read by `released_layout` (whose names are re-exported here).

Converted layout (`qwenvl-convert SRC DST`): `params/` (an Orbax PyTree checkpoint of the Flax params),
`config.json`, optional `generation_config.json` and `qwen.tiktoken`, and `qwenvl_checkpoint.json`,
written last: a directory without it is an interrupted conversion and never loads.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import jax

from qwenvl_jax.config import QwenVLConfig, as_dtype
from qwenvl_jax.jsonfile import ConfigFileError, get, read_object
from qwenvl_jax.layout import (MARKER, PARAMS_DIR, SAFETENSORS_INDEX, IncompleteCheckpointError,  # noqa: F401
                               Kind, describe_directory, leftover_note, wrong_kind)
from qwenvl_jax import gptq, gptq_checkpoint, orbax_leaves, param_layout, released_slices
from qwenvl_jax.model import QwenVL
from qwenvl_jax.params import Rule, check_shapes, params_from_hf, set_path
from qwenvl_jax.params import rules as params_rules
from qwenvl_jax.released_layout import (ST_DTYPES, CheckpointFormatError, ReleasedCheckpoint,  # noqa: F401
                                        TensorEntry, check_released, read_released, released_files,
                                        safetensors_header)
from qwenvl_jax.sharding import put

FORMAT = 'qwenvl-jax/orbax'
FORMAT_VERSION = 1

Path = tuple[str, ...]


# ----------------------------------------------------------------------------- converted layout

def read_marker(path: str | os.PathLike) -> dict[str, Any]:
  """The completion marker of a converted directory, checked; any other kind of directory raises the
  error that says what it is (IncompleteCheckpointError for an unfinished conversion)."""
  root = pathlib.Path(path)
  found = describe_directory(root)
  if found.kind is not Kind.CONVERTED:
    raise wrong_kind(found, 'a converted Orbax checkpoint')
  marker = root / MARKER
  info = read_object(marker)
  fmt, version = get(info, 'format', str, marker), get(info, 'version', int, marker)
  if (fmt, version) != (FORMAT, FORMAT_VERSION):
    raise CheckpointFormatError(f'{marker}: unknown format {fmt!r} version {version} (expected {FORMAT!r} '
                                f'version {FORMAT_VERSION}; written by a newer qwenvl-jax?)')
  dtype = get(info, 'dtype', str, marker)
  try:
    as_dtype(dtype)
  except ValueError as e:
    raise ConfigFileError(marker, str(e), 'dtype') from None
  if not (root / PARAMS_DIR / '_METADATA').exists():
    raise IncompleteCheckpointError(f'{root}: {PARAMS_DIR}/ is missing or incomplete although {MARKER} '
                                    'says the conversion finished (a partial copy?); convert again')
  return info


def check_leaves(found: Mapping[Path, tuple[int, ...]], config: QwenVLConfig, where: str) -> None:
  """Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped leaf."""
  expected = {'/'.join(p): s for p, s in param_layout.leaf_shapes(config).items()}
  check_shapes({'/'.join(p): s for p, s in found.items()}, expected, where, 'config.json')


def _sharding_tree(shardings, paths: list[Path]) -> dict[Path, jax.sharding.Sharding]:
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own device
  if isinstance(shardings, jax.sharding.Sharding):
    return {p: shardings for p in paths}
  flat = jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
  given = {tuple(str(k.key) for k in keys): s for keys, s in flat}
  if given.keys() != set(paths):
    missing = sorted('/'.join(p) for p in set(paths) - given.keys())
    extra = sorted('/'.join(p) for p in given.keys() - set(paths))
    raise ValueError(f'shardings do not match the params tree: missing {missing}, unexpected {extra}')
  return given


def restore_params(path: str | os.PathLike, config: QwenVLConfig, dtype=None, shardings=None,
                   split_layers: bool = False) -> dict:
  """The params of a converted directory as jax.Arrays in `dtype` (default: as stored).

  `shardings`: one Sharding for every leaf, or a tree of them matching params (default: this process's
  first device). On one device each leaf is read block by block into its final host buffer and moved there
  (on the CPU the device array adopts that buffer), so the host's peak is the parameters plus one block,
  where Orbax's restore peaks at twice the parameters. Over several devices each host reads only the
  slices its devices hold, each once however many of its devices hold it (`_read_converted`), so no host
  materialises the full model nor reads a replicated block once per device.
  `split_layers` (one device only): the decoder's layers come one subtree per layer ('layers_0'..), each
  read on its own from the stacked leaves (the form of `config.scan_layers=False`; see `param_layout`).
  """
  root = pathlib.Path(path)
  info = read_marker(root)
  reader = orbax_leaves.LeafReader(root / PARAMS_DIR)
  meta = reader.metadata
  check_leaves({p: m.shape for p, m in meta.items()}, config, f'{root / PARAMS_DIR}')
  target_dtype = as_dtype(dtype or info['dtype'])
  placement = _sharding_tree(shardings, list(meta))
  params: dict = {}
  if all(len(s.device_set) == 1 for s in placement.values()):
    def read(p: Path, index: tuple = ()) -> jax.Array:
      return orbax_leaves.to_device(orbax_leaves.read_leaf(reader, p, target_dtype, index), placement[p])
    stacked = [p for p in meta if split_layers and p[:2] == ('decoder', 'layers')]
    for i in range(config.text.num_layers if stacked else 0):
      for p in stacked:
        set_path(params, ('decoder', f'layers_{i}') + p[2:], read(p, (i,)))
    for p in meta:
      if p not in stacked:
        set_path(params, p, read(p))
    return params
  if split_layers:
    raise ValueError('split_layers needs every leaf on one device')
  return _read_converted(reader, config, target_dtype, placement)


def load_pretrained(path: str | os.PathLike, dtype=None, shardings=None, split_layers: bool = False,
                    keep_packed: bool = False, quantize=None, **config_overrides) -> tuple[QwenVL, dict]:
  """(model, params) from a released-layout or converted directory; params in `dtype` (default float32).

  `shardings`: a Sharding for every leaf or a tree of them matching params. The params are read straight
  onto them: each host reads only the slices its devices hold (Orbax for a converted directory,
  `released_slices` for the released layout).
  `split_layers`: from a converted directory onto one device, the decoder's layers come one subtree per
  layer, read one layer at a time (`restore_params`), ready for `decode.decode_params` without a second
  copy of any stacked leaf. `keep_packed` (a GPTQ Int4 checkpoint): the decoder's quantized kernels stay
  4-bit, `q` and `scale` in place of each `kernel`, and the model comes with weights='int4', the
  checkpoint's group size and a float lm_head (`gptq_checkpoint.packed_config`): it applies the tree as
  it is. `weights='int8'|'int4'` (a config override) with `quantize` (`quant.quantize_kernel`, passed in:
  `quant` sits above this module): the float weights are quantized as they are read onto `shardings`, each
  kernel tensor on its own (`released_slices`, `quant_blocks`), so no host or device holds the float base;
  the params equal `quant.quantize` of the float tree in `dtype`, bit for bit. (`quant.load` does this.)
  `config_overrides` go to QwenVLConfig (e.g. `remat='full'`);
  for bf16 compute, `QwenVL(model.config.replace(dtype='bfloat16'))`.
  """
  root = pathlib.Path(path)
  found = describe_directory(root)
  if found.kind is Kind.MISSING:
    raise FileNotFoundError(f'checkpoint directory not found: {root}{leftover_note(root)}')
  if found.kind not in (Kind.RELEASED, Kind.EXPORTED, Kind.CONVERTED):
    raise wrong_kind(found, 'a checkpoint (the released layout, or a directory converted by qwenvl-convert)')
  dtype = as_dtype(dtype or config_overrides.pop('param_dtype', 'float32'))
  converted = found.kind is Kind.CONVERTED
  if converted:
    read_marker(root)
    if keep_packed:
      raise ValueError(f'{root}: keep_packed reads the released Int4 layout; a converted checkpoint holds '
                       'float weights')
  config = QwenVLConfig.from_json(root, param_dtype=dtype.name, **config_overrides)
  quantized_at_load = config.weights != 'float'
  if quantized_at_load and (keep_packed or split_layers):
    raise ValueError(f'weights={config.weights} quantizes float weights at load: not with keep_packed or '
                     'split_layers')
  if converted and quantized_at_load:
    return QwenVL(config), _restore_quantized(root, config, dtype, shardings, quantize)
  if converted:
    return QwenVL(config), restore_params(root, config, dtype, shardings, split_layers)
  quantized = gptq.read_config(root)
  if keep_packed and quantized is None:
    raise ValueError(f'{root}: keep_packed needs a quantized checkpoint (config.json has no '
                     'quantization_config)')
  checkpoint = ReleasedCheckpoint(root)
  if quantized is None:
    check_released(checkpoint, config)
  if keep_packed:
    config = gptq_checkpoint.packed_config(config, quantized)
  placement = _sharding_tree(shardings, list(param_layout.leaf_shapes(config)))
  if quantized is not None:
    return QwenVL(config), _read_int4(checkpoint, config, quantized, dtype, placement, keep_packed, quantize)
  if quantized_at_load or any(len(s.device_set) > 1 for s in placement.values()):
    # each host copies (quantizes) only its devices' blocks
    return QwenVL(config), released_slices.read_onto(checkpoint.tensors(), config, placement, dtype, quantize)
  # Memory-mapped tensors: params_from_hf's copies are the only ones in anonymous memory.
  tensors = {e.name: a for e, a in checkpoint.tensors()}
  params = params_from_hf(tensors, config, dtype=dtype)
  targets: dict = {}
  for p, s in placement.items():
    set_path(targets, p, s)
  return QwenVL(config), put(params, targets)


def _read_int4(checkpoint: ReleasedCheckpoint, config: QwenVLConfig, quantized: gptq.GptqConfig, dtype,
               placement: dict[Path, jax.sharding.Sharding], keep_packed: bool, quantize) -> dict:
  """The params of a GPTQ checkpoint read layer by layer onto `placement` (`released_slices`), its
  quantized kernels dequantized into `dtype` or kept packed (`config` the packed one)."""
  gptq_checkpoint.check_int4(checkpoint, config, quantized)
  if keep_packed:
    tensors = gptq_checkpoint.packed_tensors(checkpoint, config, quantized)
  else:
    tensors = gptq_checkpoint.dequantized(checkpoint, config, quantized)
  return released_slices.read_onto(tensors, config, placement, dtype, quantize)


def _restore_quantized(root: pathlib.Path, config: QwenVLConfig, dtype, shardings, quantize) -> dict:
  """A converted directory's float params quantized to `config.weights` as they are read onto
  `shardings` (`_read_converted`)."""
  reader = orbax_leaves.LeafReader(root / PARAMS_DIR)
  check_leaves({p: m.shape for p, m in reader.metadata.items()}, config.replace(weights='float'),
               f'{root / PARAMS_DIR}')
  placement = _sharding_tree(shardings, list(param_layout.leaf_shapes(config)))
  return _read_converted(reader, config, dtype, placement, quantize)


def _read_converted(reader: orbax_leaves.LeafReader, config: QwenVLConfig, dtype,
                    placement: dict[Path, jax.sharding.Sharding], quantize=None) -> dict:
  """The leaves of a converted directory (checked) onto `placement` (`released_slices.read_onto` over
  them, a stacked leaf one layer at a time, its kernels quantized if `config.weights` says so): each
  process reads only the rows its devices' blocks need, a block held by several of them once."""
  layers = {r.path: r.num_layers for r in params_rules(config).values() if r.layer is not None}
  table, tensors = {}, []
  for p, m in reader.metadata.items():
    shape = tuple(m.shape)
    for i in range(layers[p]) if p in layers else [None]:
      name = '/'.join(p) if i is None else f'{"/".join(p)}[{i}]'
      index = () if i is None else (i,)
      kw = {} if i is None else dict(layer=i, num_layers=layers[p])
      table[name] = Rule(name, p, shape[len(index):], **kw)
      tensors.append((released_slices.Named(name), orbax_leaves.LazyLeaf(reader, p, index)))
  return released_slices.read_onto(tensors, config, placement, dtype, quantize, table)
