"""Loading checkpoints: the released Hugging Face layout (safetensors, single or sharded with an index)."""
from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np

from qwenvl_jax.config import QwenVLConfig, as_dtype
from qwenvl_jax.model import QwenVL
from qwenvl_jax.params import params_from_hf

SAFETENSORS_INDEX = 'model.safetensors.index.json'


def safetensors_files(path: str | os.PathLike) -> list[pathlib.Path]:
  """The safetensors shards of a released-layout directory, from its index when there is one."""
  root = pathlib.Path(path)
  index = root / SAFETENSORS_INDEX
  if index.exists():
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    files = [root / name for name in dict.fromkeys(weight_map.values())]
  elif (root / 'model.safetensors').exists():
    files = [root / 'model.safetensors']
  else:
    raise FileNotFoundError(f'{root}: no {SAFETENSORS_INDEX} or model.safetensors found')
  missing = [str(f) for f in files if not f.exists()]
  if missing:
    raise FileNotFoundError(f'{root}: shards listed in the index are missing: {", ".join(missing)}')
  return files


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a released-layout directory, by name."""
  from safetensors.numpy import load_file
  tensors: dict[str, np.ndarray] = {}
  for file in safetensors_files(path):
    try:
      tensors.update(load_file(str(file)))
    except Exception as e:  # safetensors raises its own types for truncated or corrupt files
      raise ValueError(f'{file}: not a readable safetensors file ({e})') from e
  return tensors


def load_pretrained(path: str | os.PathLike, dtype=None, **config_overrides) -> tuple[QwenVL, dict]:
  """(model, params) from a checkpoint directory; params in `dtype` (default: float32).

  `config_overrides` go to QwenVLConfig, e.g. `dtype='bfloat16'` for bf16 compute.
  """
  root = pathlib.Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f'checkpoint directory not found: {root}')
  dtype = as_dtype(dtype or config_overrides.get('param_dtype', 'float32'))
  config = QwenVLConfig.from_json(root, param_dtype=dtype.name, **{
      k: v for k, v in config_overrides.items() if k != 'param_dtype'})
  params = params_from_hf(read_safetensors(root), config, dtype=dtype)
  return QwenVL(config), jax.tree.map(jax.numpy.asarray, params)
