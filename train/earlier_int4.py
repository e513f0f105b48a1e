"""Resuming a Q-LoRA run saved before int4 values were packed two per byte.

Earlier versions held an int4 base's values one per int8 byte, shaped as the kernel; the state now holds
them as uint8, two per byte along the kernel's last input dim (`quant.pack`). A checkpoint of such a run
is read at its stored form and packed on the devices, so the run resumes where it stopped; the values are
the same, only their storage changes.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from qwenvl_jax.kernel_math import PACKED
from qwenvl_jax.quant import kernel_shape, pack


def _names(path) -> tuple:
  """A tree path as plain names: a NamedTuple's fields and a dict's keys alike (Orbax's metadata keeps the
  state's fields as dict keys)."""
  return tuple(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', None))) for k in path)


def earlier_int4(saved: Any, abstract: Any) -> dict[tuple, tuple]:
  """{names: (stored shape, param path)} of the state's packed int4 leaves that `saved` (the checkpoint's
  metadata tree) holds one value per int8 byte."""
  stored = {_names(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    names = _names(path)
    m = stored.get(names)
    if (m is not None and names[0] == 'params' and names[-1] == 'q' and leaf.dtype == PACKED
        and np.dtype(m.dtype) == np.int8 and tuple(m.shape) == kernel_shape(leaf, names[1:])):
      found[names] = (tuple(m.shape), names[1:])
  return found


def read_as_stored(abstract: Any, found: dict[tuple, tuple]) -> Any:
  """`abstract` with the `found` leaves at their stored form (int8, the kernel's shape; same sharding)."""
  def as_stored(path, leaf):
    hit = found.get(_names(path))
    return leaf if hit is None else jax.ShapeDtypeStruct(hit[0], np.int8, sharding=leaf.sharding)
  return jax.tree_util.tree_map_with_path(as_stored, abstract)


def packed(state: Any, abstract: Any, found: dict[tuple, tuple]) -> Any:
  """The restored `state` with the `found` leaves packed onto the shardings `abstract` gives them."""
  def to_packed(path, leaf, target):
    hit = found.get(_names(path))
    if hit is None:
      return leaf
    return jax.jit(lambda q: pack(q, hit[1]), out_shardings=target.sharding)(leaf)
  return jax.tree_util.tree_map_with_path(to_packed, state, abstract)
