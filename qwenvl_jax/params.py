"""The one mapping between released PyTorch tensor names and the Flax parameter tree, both directions.

Each released tensor maps to one Flax leaf, or to one layer slice of a stacked (scanned) leaf. A rule
reshapes the PyTorch array to `view` and transposes it by `perm`; the inverse is derived, so export is
bit-exact by construction.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Mapping

import numpy as np

from qwenvl_jax.config import QwenVLConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  hf_name: str
  path: Path  # Flax path of the (possibly stacked) leaf
  hf_shape: tuple[int, ...]
  view: tuple[int, ...] | None = None  # reshape of the PyTorch array before the transpose
  perm: tuple[int, ...] | None = None
  layer: int | None = None  # slice index into the stacked leaf
  num_layers: int | None = None

  @property
  def slice_shape(self) -> tuple[int, ...]:
    shape = self.view or self.hf_shape
    return tuple(shape[p] for p in self.perm) if self.perm else tuple(shape)

  @property
  def leaf_shape(self) -> tuple[int, ...]:
    return self.slice_shape if self.layer is None else (self.num_layers,) + self.slice_shape

  def to_flax(self, a: np.ndarray) -> np.ndarray:
    if tuple(a.shape) != self.hf_shape:
      raise ValueError(f'{self.hf_name}: expected shape {self.hf_shape}, got {tuple(a.shape)}')
    if self.view:
      a = a.reshape(self.view)
    return np.transpose(a, self.perm) if self.perm else a

  def to_hf(self, a: np.ndarray) -> np.ndarray:
    if self.perm:
      a = np.transpose(a, np.argsort(self.perm))
    return np.ascontiguousarray(a.reshape(self.hf_shape))


class CheckpointMismatchError(ValueError):
  """Missing, unexpected and mis-shaped tensors (or leaves), all reported at once."""

  def __init__(self, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
               misshaped: Iterable[str] = (), where: str = 'checkpoint', against: str = 'the config'):
    self.missing, self.unexpected, self.misshaped = sorted(missing), sorted(unexpected), sorted(misshaped)
    parts = []
    for label, names in (('missing', self.missing), ('unexpected', self.unexpected),
                         ('mis-shaped', self.misshaped)):
      if names:
        shown = ', '.join(names[:20]) + (f', ... ({len(names) - 20} more)' if len(names) > 20 else '')
        parts.append(f'{len(names)} {label}: {shown}')
    super().__init__(f'{where} does not match {against}: ' + '; '.join(parts))


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                 where: str = 'checkpoint', against: str = 'the config') -> None:
  """The one mismatch check: raises CheckpointMismatchError listing every missing, unexpected and
  mis-shaped name of `found` against `expected`."""
  missing = set(expected) - set(found)
  unexpected = set(found) - set(expected)
  misshaped = [f'{n} {tuple(s)} (expected {tuple(expected[n])})' for n, s in found.items()
               if n in expected and tuple(s) != tuple(expected[n])]
  if missing or unexpected or misshaped:
    raise CheckpointMismatchError(missing, unexpected, misshaped, where, against)


def _linear(out_f: int, in_f: int) -> dict:
  """torch Linear weight [out, in] -> kernel [in, out]."""
  return dict(hf_shape=(out_f, in_f), perm=(1, 0))


def _block_rules(cfg: QwenVLConfig) -> list[tuple[str, Path, dict]]:
  t, v = cfg.text, cfg.vision
  d, h, k, f = t.hidden_size, t.num_heads, t.head_dim, t.mlp_width
  w, vh, vf = v.width, v.heads, v.mlp_width
  vk = w // vh
  dec = 'transformer.h.{i}.'
  vis = 'transformer.visual.transformer.resblocks.{i}.'
  D, V = ('decoder', 'layers'), ('visual', 'blocks')
  return [
      (dec + 'ln_1.weight', D + ('ln_1', 'scale'), dict(hf_shape=(d,))),
      # c_attn rows are [q|k|v] x [head] x [k].
      (dec + 'attn.c_attn.weight', D + ('attn', 'c_attn', 'kernel'),
       dict(hf_shape=(3 * d, d), view=(3, h, k, d), perm=(3, 0, 1, 2))),
      (dec + 'attn.c_attn.bias', D + ('attn', 'c_attn', 'bias'), dict(hf_shape=(3 * d,), view=(3, h, k))),
      (dec + 'attn.c_proj.weight', D + ('attn', 'c_proj', 'kernel'),
       dict(hf_shape=(d, d), view=(d, h, k), perm=(1, 2, 0))),
      (dec + 'ln_2.weight', D + ('ln_2', 'scale'), dict(hf_shape=(d,))),
      (dec + 'mlp.w1.weight', D + ('mlp', 'w1', 'kernel'), _linear(f, d)),
      (dec + 'mlp.w2.weight', D + ('mlp', 'w2', 'kernel'), _linear(f, d)),
      (dec + 'mlp.c_proj.weight', D + ('mlp', 'c_proj', 'kernel'), _linear(d, f)),
      (vis + 'ln_1.weight', V + ('ln_1', 'scale'), dict(hf_shape=(w,))),
      (vis + 'ln_1.bias', V + ('ln_1', 'bias'), dict(hf_shape=(w,))),
      (vis + 'ln_2.weight', V + ('ln_2', 'scale'), dict(hf_shape=(w,))),
      (vis + 'ln_2.bias', V + ('ln_2', 'bias'), dict(hf_shape=(w,))),
      # The ViT's packed projection is Megatron-style: rows are [head] x [q|k|v] x [k].
      (vis + 'attn.in_proj.weight', V + ('in_proj', 'kernel'),
       dict(hf_shape=(3 * w, w), view=(vh, 3, vk, w), perm=(3, 1, 0, 2))),
      (vis + 'attn.in_proj.bias', V + ('in_proj', 'bias'),
       dict(hf_shape=(3 * w,), view=(vh, 3, vk), perm=(1, 0, 2))),
      (vis + 'attn.out_proj.weight', V + ('out_proj', 'kernel'),
       dict(hf_shape=(w, w), view=(w, vh, vk), perm=(1, 2, 0))),
      (vis + 'attn.out_proj.bias', V + ('out_proj', 'bias'), dict(hf_shape=(w,))),
      (vis + 'mlp.c_fc.weight', V + ('c_fc', 'kernel'), _linear(vf, w)),
      (vis + 'mlp.c_fc.bias', V + ('c_fc', 'bias'), dict(hf_shape=(vf,))),
      (vis + 'mlp.c_proj.weight', V + ('c_proj', 'kernel'), _linear(w, vf)),
      (vis + 'mlp.c_proj.bias', V + ('c_proj', 'bias'), dict(hf_shape=(w,))),
  ]


def _single_rules(cfg: QwenVLConfig) -> list[tuple[str, Path, dict]]:
  t, v = cfg.text, cfg.vision
  d, vocab, w, p = t.hidden_size, t.vocab_size, v.width, v.patch_size
  h = v.resampler_heads
  k = d // h
  pool, vis = 'transformer.visual.attn_pool.', 'transformer.visual.'
  P = ('visual', 'attn_pool')
  rules = [
      ('transformer.wte.weight', ('wte', 'embedding'), dict(hf_shape=(vocab, d))),
      ('transformer.ln_f.weight', ('decoder', 'ln_f', 'scale'), dict(hf_shape=(d,))),
      ('lm_head.weight', ('lm_head', 'kernel'), _linear(vocab, d)),
      (vis + 'conv1.weight', ('visual', 'conv1', 'kernel'), dict(hf_shape=(w, 3, p, p), perm=(2, 3, 1, 0))),
      (vis + 'positional_embedding', ('visual', 'positional_embedding'),
       dict(hf_shape=(v.pos_table_rows, w))),
      (vis + 'ln_pre.weight', ('visual', 'ln_pre', 'scale'), dict(hf_shape=(w,))),
      (vis + 'ln_pre.bias', ('visual', 'ln_pre', 'bias'), dict(hf_shape=(w,))),
      (pool + 'pos_embed', P + ('pos_embed',), dict(hf_shape=(v.n_queries, d))),
      (pool + 'query', P + ('query',), dict(hf_shape=(v.n_queries, d))),
      # torch.nn.MultiheadAttention packs rows as [q|k|v] x [head] x [k].
      (pool + 'attn.in_proj_weight', P + ('in_proj', 'kernel'),
       dict(hf_shape=(3 * d, d), view=(3, h, k, d), perm=(3, 0, 1, 2))),
      (pool + 'attn.in_proj_bias', P + ('in_proj', 'bias'), dict(hf_shape=(3 * d,), view=(3, h, k))),
      (pool + 'attn.out_proj.weight', P + ('out_proj', 'kernel'),
       dict(hf_shape=(d, d), view=(d, h, k), perm=(1, 2, 0))),
      (pool + 'attn.out_proj.bias', P + ('out_proj', 'bias'), dict(hf_shape=(d,))),
      (pool + 'ln_q.weight', P + ('ln_q', 'scale'), dict(hf_shape=(d,))),
      (pool + 'ln_q.bias', P + ('ln_q', 'bias'), dict(hf_shape=(d,))),
      (pool + 'ln_kv.weight', P + ('ln_kv', 'scale'), dict(hf_shape=(d,))),
      (pool + 'ln_kv.bias', P + ('ln_kv', 'bias'), dict(hf_shape=(d,))),
      (vis + 'ln_post.weight', ('visual', 'ln_post', 'scale'), dict(hf_shape=(d,))),
      (vis + 'ln_post.bias', ('visual', 'ln_post', 'bias'), dict(hf_shape=(d,))),
      (vis + 'proj', ('visual', 'proj'), dict(hf_shape=(d, d))),
  ]
  if w != d:  # the original uses an identity (no tensor) when the widths agree
    rules.append((pool + 'kv_proj.weight', P + ('kv_proj', 'kernel'), _linear(d, w)))
  return rules


def rules(cfg: QwenVLConfig) -> dict[str, Rule]:
  """Every released tensor name -> its Rule, in the released checkpoint's order of layers."""
  out = {}
  for name, path, kw in _single_rules(cfg):
    out[name] = Rule(name, path, **kw)
  for name, path, kw in _block_rules(cfg):
    n = cfg.text.num_layers if path[0] == 'decoder' else cfg.vision.layers
    for i in range(n):
      out[name.format(i=i)] = Rule(name.format(i=i), path, layer=i, num_layers=n, **kw)
  return out


def check_names(names_to_shapes: Mapping[str, tuple[int, ...]], cfg: QwenVLConfig) -> None:
  """Raises CheckpointMismatchError listing every missing, unexpected and mis-shaped released tensor."""
  check_shapes(names_to_shapes, {name: rule.hf_shape for name, rule in rules(cfg).items()})


def set_path(tree: dict, path: Path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree: Mapping, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: QwenVLConfig, dtype=None) -> dict:
  """A released-layout state dict -> the Flax params tree (numpy arrays), after checking every name."""
  check_names({n: a.shape for n, a in tensors.items()}, cfg)
  params: dict = {}
  stacked: dict[Path, np.ndarray] = {}
  for name, rule in rules(cfg).items():
    a = rule.to_flax(np.asarray(tensors[name]))  # a view where only axes move
    if rule.layer is None:
      set_path(params, rule.path, a if dtype is None else a.astype(dtype, copy=False))
      continue
    if rule.path not in stacked:
      stacked[rule.path] = np.empty(rule.leaf_shape, a.dtype if dtype is None else dtype)
      set_path(params, rule.path, stacked[rule.path])
    stacked[rule.path][rule.layer] = a  # cast and layout change in this one copy
  return params


def params_to_hf(params: Mapping, cfg: QwenVLConfig) -> Iterator[tuple[str, np.ndarray]]:
  """The Flax params tree -> (released name, array) pairs, in the released order."""
  for name, rule in rules(cfg).items():
    leaf = np.asarray(get_path(params, rule.path))
    yield name, rule.to_hf(leaf if rule.layer is None else leaf[rule.layer])
