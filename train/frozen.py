"""Frozen weights held in the compute dtype, and their float values put back from the run's source.

A leaf that trains keeps a float32 master (train/state.py). A frozen one (no gradient, no optimizer state:
`optim.partition`) that the model reads only through a cast to the compute dtype is held in that dtype:
the kernels (`layers.Einsum` casts them where it uses them), the token table (`nn.Embed` promotes it) and
the ViT's `proj`. The forward then computes the same values bit for bit, and the frozen ViT, embeddings
and float lm_head of a LoRA run take half the memory (released size: 10.5 GB -> 5.3 GB). Norm scales,
biases and position tables (read in float32 by LayerNorm and the table resize) and a quantized base's
scales stay float32.

The rounded copies never reach the user: before the LoRA merge and the export (`trainer`), and when a
later stage starts from the run's out_dir (`run_dir.run_weights`), `restore` puts back the source's own
float values (init_from read again, the params the run was given, or the seed's init), after checking
that they are the ones the run started from (rounded to the compute dtype, equal to what the state holds).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax import param_layout
from qwenvl_jax.config import as_dtype
from qwenvl_jax.params import set_path
from train.errors import TrainError
from train.optim import path_keys, trainable_mask, trainables

Path = tuple[str, ...]
MASTER_DTYPE = jnp.float32  # master weights, gradients and AdamW moments; compute runs in cfg.dtype
CAST_AT_USE = ('kernel', 'kernel_t', 'embedding', 'proj')  # leaf names the model reads cast (see above)
# (path -> float32 array) of the leaves `held_paths` names, as the run's source holds them
Source = Callable[[], Mapping[Path, Any]]


def held_paths(cfg: Any, params: Any) -> set[Path]:
  """Paths of the params (float masters or their shapes) that a run of `cfg` holds in its compute dtype."""
  if as_dtype(cfg.dtype) == MASTER_DTYPE:
    return set()
  mask = jax.tree.leaves(trainable_mask(cfg, trainables(params))['params'])
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_keys(path) for (path, leaf), train in zip(flat, mask, strict=True)
          if not train and path_keys(path)[-1] in CAST_AT_USE and jnp.issubdtype(leaf.dtype, jnp.floating)}


def hold(cfg: Any, params: Any) -> Any:
  """params (float32 masters) with the `held_paths` leaves cast to the compute dtype."""
  held, dtype = held_paths(cfg, params), as_dtype(cfg.dtype)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(dtype) if path_keys(path) in held else x, params)


def cast_each(params: Any, paths: set[Path], dtype) -> Any:
  """params (a fresh tree of loaded weights, e.g. float32) with the leaves at `paths` cast to `dtype` one
  at a time, each source leaf let go before the next: the state is then made from them without ever holding
  every frozen weight twice (a float32 base and its cast)."""
  out = jax.tree.map(lambda x: x, params)
  for path in sorted(paths & set(param_layout.flatten(params))):
    leaf = param_layout.get_leaf(out, path)
    set_path(out, path, leaf.astype(dtype))
    del leaf
  return out


def restore(cfg: Any, params: Any, source: Source, where: str) -> Any:
  """params with each leaf held in the compute dtype replaced by the source's float32 value, on the same
  device(s). A source that is not what the run started from (its value rounded differs from the held
  one: init_from changed since) is refused by name; `where` names the source."""
  held = held_paths(cfg, params)
  if not held:
    return params
  values = source()
  out = jax.tree.map(lambda x: x, params)  # fresh dicts: the caller's tree keeps its leaves
  dtype = as_dtype(cfg.dtype)
  for path in sorted(held):
    leaf = param_layout.get_leaf(params, path)
    value = values.get(path)
    if value is None or tuple(np.shape(value)) != tuple(leaf.shape):
      raise TrainError(f'{where} holds no {"/".join(path)} of shape {tuple(leaf.shape)}: the run kept that '
                       f'frozen weight in {dtype.name} and takes its float value from there for the export')
    value = np.asarray(jax.device_get(value), np.float32)
    if not _same(leaf, value.astype(dtype)):
      raise TrainError(f'{where}: {"/".join(path)} is not the value the run started from (changed since?): '
                       'its frozen float weights cannot be exported unchanged; restore the source')
    set_path(out, path, jax.device_put(value, leaf.sharding) if isinstance(leaf, jax.Array) else value)
  return out


def _same(leaf: Any, rounded: np.ndarray) -> bool:
  """Whether a held leaf (this process's blocks of it, on several hosts) equals `rounded`."""
  as_held = lambda x: np.asarray(x).astype(rounded.dtype)  # a float32 leaf of a checkpoint: exact
  if not isinstance(leaf, jax.Array):
    return np.array_equal(as_held(leaf), rounded)
  return all(np.array_equal(as_held(s.data), rounded[s.index]) for s in leaf.addressable_shards)


def kept(params: Any, paths: set[Path]) -> Source:
  """A source of the given params' own leaves at `paths`, copied to the host now (they may be donated)."""
  values = {p: np.asarray(jax.device_get(param_layout.get_leaf(params, p)), np.float32) for p in paths}
  return lambda: values
