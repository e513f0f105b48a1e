"""The released GPTQ Int4 layout in the converter: dequantized rows for `hf_to_orbax`; the export of a params
tree with packed kernels (`qwenvl_jax.gptq`) back to the Int4 layout, byte for byte (`--to-int4`)."""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Iterator, Mapping

import numpy as np

from convert import hf, source
from convert.direct_io import Rows
from convert.paths import atomic_directory
from qwenvl_jax.checkpoint import FORMAT_VERSION, ReleasedCheckpoint, TensorEntry
from qwenvl_jax.config import QwenVLConfig, as_dtype
from qwenvl_jax.gptq import GptqConfig, read_config
from qwenvl_jax.gptq_checkpoint import (check_int4, dequantized, int4_specs, int4_tensors, packed_config,
                                        quantized_rules, repacked_tensors)
from qwenvl_jax.jsonfile import read_object
from qwenvl_jax.layout import EXPORT_MARKER, Kind, describe_directory, wrong_kind
from qwenvl_jax.params import rules

EXPORT_FORMAT = 'qwenvl-jax/released-int4'
# Dequantized weights are exact in float32 only: a float16 scale times a 4-bit value needs up to 15 bits.
DEQUANTIZED_DTYPE = 'float32'


def dequantized_rows(checkpoint: ReleasedCheckpoint, config: QwenVLConfig, quantized: GptqConfig
                     ) -> tuple[Iterator[tuple[TensorEntry, Rows]], int]:
  """(every float tensor of the Int4 checkpoint, its quantized weights dequantized to float32, as rows
  for the converter's writers; their total bytes). Checks names, shapes and dtypes first."""
  check_int4(checkpoint, config, quantized)
  layers = quantized_rules(config)
  total = sum(math.prod(rule.hf_shape) * 4 if name[:-len('.weight')] in layers else
              checkpoint.entries[name].nbytes for name, rule in rules(config).items())

  def rows() -> Iterator[tuple[TensorEntry, Rows]]:
    for entry, array in dequantized(checkpoint, config, quantized, np.float32):
      yield entry, source.ArrayRows(array)
  return rows(), total


def _config_json(config: QwenVLConfig, quantized: GptqConfig, dtype: np.dtype, saved: Mapping) -> dict:
  merged = {**saved, **config.to_dict(), 'torch_dtype': dtype.name}
  merged.update(bf16=dtype.name == 'bfloat16', fp16=dtype.name == 'float16', fp32=dtype.name == 'float32')
  merged['quantization_config'] = {**(saved.get('quantization_config') or {}), **quantized.to_dict()}
  return merged


def export_int4(params: Mapping, config: QwenVLConfig, dst: str | os.PathLike,
                quantized: GptqConfig = GptqConfig(), dtype='float16',
                shard_size: int = hf.DEFAULT_SHARD_SIZE, src: str | os.PathLike | None = None,
                overwrite: bool = False) -> pathlib.Path:
  """Writes `params` (decoder kernels in the packed form, e.g. `load_pretrained(..., keep_packed=True)`)
  to DST in the released Int4 layout: sharded safetensors plus index, config.json with its
  quantization_config, quantize_config.json. The float tensors are stored in `dtype` (the release's
  float16; exact from a float32 tree loaded from float16). `src`: the checkpoint the params came from, if
  any: its config.json keys are kept, its generation config and vocabulary copied, and DST may not overlap
  it. One layer is packed at a time; DST appears only once complete."""
  dtype = np.dtype(as_dtype(dtype))
  tensors = (array for _, array in int4_tensors(params, config, quantized, dtype))
  return _write_int4(tensors, config, dst, quantized, dtype, shard_size, src, overwrite)


def _write_int4(tensors: Iterator[np.ndarray], config: QwenVLConfig, dst: str | os.PathLike,
                quantized: GptqConfig, dtype: np.dtype, shard_size: int, src: str | os.PathLike | None,
                overwrite: bool) -> pathlib.Path:
  """`export_int4` of `tensors`, every tensor of the layout in `int4_specs` order."""
  dst, src = pathlib.Path(dst), None if src is None else pathlib.Path(src)
  specs = [hf.TensorSpec(name, d, shape) for name, d, shape in int4_specs(config, quantized, dtype)]
  saved = {} if src is None else read_object(src / 'config.json')
  with atomic_directory(src, dst, overwrite) as tmp:
    hf.write_released(tmp, specs, tensors, shard_size)
    merged = _config_json(config, quantized, dtype, saved)
    (tmp / 'config.json').write_text(json.dumps(merged, indent=2) + '\n')
    quantize = {k: v for k, v in merged['quantization_config'].items() if k != 'quant_method'}
    (tmp / 'quantize_config.json').write_text(json.dumps(quantize, indent=2) + '\n')
    if src is not None:
      hf.copy_aux(src, tmp)
    marker = {'format': EXPORT_FORMAT, 'version': FORMAT_VERSION, 'dtype': dtype.name}
    (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + '\n')  # last: the export finished
  return dst


def rewrite_int4(src: str | os.PathLike, dst: str | os.PathLike, dtype=None,
                 shard_size: int = hf.DEFAULT_SHARD_SIZE, overwrite: bool = False) -> pathlib.Path:
  """`qwenvl-convert SRC DST --to-int4`: an Int4 checkpoint read through the packed form (every tensor
  checked) and written again in the Int4 layout, sharded by `shard_size`; float tensors in `dtype`
  (default float16, the release's). Streamed from host to host a layer at a time (no device, never the
  whole model): the bytes `export_int4` writes of the checkpoint's packed load in `dtype`."""
  src = pathlib.Path(src)
  found = describe_directory(src)
  if found.kind not in (Kind.RELEASED, Kind.EXPORTED):
    raise wrong_kind(found, 'a GPTQ Int4 checkpoint in the released layout')
  quantized = read_config(src)
  if quantized is None:
    raise ValueError(f'{src}: --to-int4 rewrites a GPTQ Int4 checkpoint, and config.json has no '
                     'quantization_config (a float checkpoint has no packed weights to write)')
  dtype = np.dtype(as_dtype(dtype or 'float16'))
  # the config a packed load in `dtype` comes with: config.json is written from it
  config = packed_config(QwenVLConfig.from_json(src, param_dtype=dtype.name), quantized)
  checkpoint = ReleasedCheckpoint(src)
  check_int4(checkpoint, config, quantized)
  tensors = (array for _, array in repacked_tensors(checkpoint, config, quantized, dtype))
  return _write_int4(tensors, config, dst, quantized, dtype, shard_size, src, overwrite)
