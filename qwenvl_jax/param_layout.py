"""The parameter tree's logical axes, as the modules annotate them, and the one conversion between its forms.

A tree has one of four forms (`QwenVLConfig.scan_layers`, `QwenVLConfig.weight_major`): the decoder's
layers stacked under 'layers' (checkpoints) or one subtree per layer 'layers_0'..; kernels as the equations
write them ('kernel') or weight-major ('kernel_t', output dims first). A quantized tree (`quant`) holds
'q' / 'q_t' (oriented as the kernels) and 'scale' (the same in both orientations) in their place. Logical names are read from the
boxed abstract init of a tiny model of each form: they depend on the module code, not on the sizes.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenvl_jax.config import QwenVLConfig, TextConfig, VisionConfig
from qwenvl_jax.lora import LoraConfig
from qwenvl_jax.model import QwenVL, lora_shapes, param_shapes

Path = tuple[str, ...]

# Every kind of leaf: the ViT width differs from the LLM's, so the resampler has its kv_proj.
_TINY = QwenVLConfig(
    text=TextConfig(vocab_size=64, hidden_size=128, num_layers=1, num_heads=2, kv_channels=64,
                    intermediate_size=64, seq_length=16),
    vision=VisionConfig(image_size=28, patch_size=14, width=32, layers=1, heads=2, output_dim=128,
                        n_queries=4, image_start_id=60))
_LAYER = re.compile(r'layers_\d+')


def flatten(tree) -> dict[Path, Any]:
  """Path -> leaf of a params tree (a `nn.LogicallyPartitioned` box counts as one leaf)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  return {tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): leaf
          for path, leaf in leaves}


KERNEL_T = ('kernel_t', 'q_t')  # leaf names of weight-major kernels
QUANTIZED = ('q', 'q_t')
LORA_FACTORS = ('a', 'b')  # leaf names of LoRA's factors (collection 'lora')


@functools.lru_cache(maxsize=None)
def axes_table(weight_major: bool = False, quantized: bool = False) -> dict[Path, tuple[str, ...]]:
  """Path (decoder layers stacked, 'layers' first in their names) -> logical names of every leaf."""
  tiny = _TINY.replace(weight_major=weight_major, weights='int8' if quantized else 'float')
  boxed = param_shapes(QwenVL(tiny), boxed=True)
  return {path: tuple(box.names) for path, box in flatten(boxed).items()}


@functools.lru_cache(maxsize=None)
def lora_axes_table() -> dict[Path, tuple[str, ...]]:
  """The same for LoRA's factors 'a' and 'b' (the model's 'lora' collection, at their kernel's module)."""
  boxed = lora_shapes(QwenVL(_TINY.replace(lora=LoraConfig(rank=1))))
  return {path: tuple(box.names) for path, box in flatten(boxed).items()}


@functools.lru_cache(maxsize=16)
def leaf_shapes(config: QwenVLConfig) -> dict[Path, tuple[int, ...]]:
  """Path -> shape of every leaf of `QwenVL(config)`'s params (`model.param_shapes`)."""
  return {path: tuple(x.shape) for path, x in flatten(param_shapes(QwenVL(config))).items()}


def _canonical(path: Path) -> tuple[Path, int | None]:
  """(the path in the stacked form, the layer index of a per-layer path or None)."""
  for i, key in enumerate(path):
    if _LAYER.fullmatch(key):
      return path[:i] + ('layers',) + path[i + 1:], int(key[len('layers_'):])
  return path, None


def axes_of(path: Path) -> tuple[str, ...]:
  """Logical names of the leaf at `path` in a tree of any form (per-layer leaves without 'layers')."""
  stacked, layer = _canonical(path)
  table = _table_of(stacked)
  if stacked not in table:
    raise KeyError(f'no logical axes for parameter {"/".join(path)}: not a leaf of QwenVL')
  return table[stacked][1:] if layer is not None else table[stacked]


def leaf_axes(path: Path, shape: tuple[int, ...]) -> tuple[str, ...]:
  """Logical names of one leaf of a tree of any form, checked against its shape."""
  names = axes_of(path)
  if len(names) != len(shape):
    raise ValueError(f'parameter {"/".join(path)} has shape {tuple(shape)} but logical axes {names}')
  return names


def _table_of(stacked: Path) -> dict[Path, tuple[str, ...]]:
  """The axes table holding a leaf (stacked path): LoRA's for a factor, weight-major or not by its name,
  quantized for q and for a scale no float table has (the norms' scales are in both)."""
  if stacked[-1] in LORA_FACTORS:
    return lora_axes_table()
  weight_major = stacked[-1] in KERNEL_T
  quantized = stacked[-1] in QUANTIZED or (stacked[-1] == 'scale' and stacked not in axes_table(weight_major))
  return axes_table(weight_major, quantized)


def _set(tree: dict, path: Path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def form(params: dict) -> tuple[bool, bool]:
  """(scan_layers, weight_major) of a params tree."""
  weight_major = any(p[-1] in KERNEL_T for p in flatten(params.get('lm_head', {})))
  return 'layers' in params.get('decoder', {}), weight_major


def convert(params: dict, *, scan_layers: bool, weight_major: bool, consume: bool = False) -> dict:
  """`params` of any form in the form of (scan_layers, weight_major): layers stacked or split, kernels
  transposed by their logical names. A tree already in that form comes back as it is.

  consume=True empties `params` leaf by leaf as it converts, so that (with no other reference to them)
  each source leaf is freed before the next: the peak stays near one copy plus one stacked leaf.
  """
  if form(params) == (scan_layers, weight_major):
    return params
  flat = flatten(params)
  out: dict = {}
  groups: dict[Path, dict[int | None, Path]] = {}  # stacked path -> layer (None: not per layer) -> path
  for path in flat:
    stacked, layer = _canonical(path)
    groups.setdefault(stacked, {})[layer] = path
  for stacked, sources in groups.items():
    in_layers = stacked[:2] == ('decoder', 'layers')
    name = stacked[-1]
    if name in ('kernel', 'kernel_t') and stacked[0] in ('decoder', 'lm_head'):
      name = 'kernel_t' if weight_major else 'kernel'
    if name in QUANTIZED:
      name = 'q_t' if weight_major else 'q'
    target = stacked[:-1] + (name,)
    pieces = []  # per layer (or the one leaf), in the target orientation
    for layer, path in sorted(sources.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
      leaf = pop_leaf(params, path) if consume else get_leaf(params, path)
      src = leaf_axes(path, jnp.shape(leaf))
      dst = _table_of(target)[target]
      dst = dst[1:] if in_layers else dst
      if in_layers and layer is None:  # a stacked leaf: its layers one by one
        pieces.extend(_orient(piece, src[1:], dst) for piece in jnp.unstack(jnp.asarray(leaf)))
      else:
        pieces.append(_orient(leaf, src, dst))
      del leaf
    if not in_layers:
      _set(out, target, pieces[0])
    elif scan_layers:
      _set(out, target, jnp.stack(pieces))
    else:
      for i, piece in enumerate(pieces):
        _set(out, target[:1] + (f'layers_{i}',) + target[2:], piece)
  return out


def _orient(leaf, src: tuple[str, ...], dst: tuple[str, ...]):
  if src == dst:
    return leaf
  return jnp.transpose(leaf, [src.index(n) for n in dst])


def get_leaf(tree, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def pop_leaf(tree, path: Path):
  """Removes the leaf at path, and the dicts it leaves empty."""
  parents = [tree]
  for key in path[:-1]:
    parents.append(parents[-1][key])
  leaf = parents[-1].pop(path[-1])
  for parent, key in zip(reversed(parents[:-1]), reversed(path[:-1])):
    if parent[key]:
      break
    del parent[key]
  return leaf
