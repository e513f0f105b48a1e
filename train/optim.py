"""Which parameters each stage trains, the paper's AdamW chain, ViT layer-wise lr decay, the schedule.

The tree of a run is `{'params': model params, 'lora': LoRA params ({} without LoRA)}`. `partition` splits it
into the trained and the frozen part: the one place freezing happens. Gradients are taken of the trained part
alone and the optimiser sees only it, so frozen leaves have no gradient, no optimiser state and are never
written.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.stages import trainable
from train.config import TrainConfig

TRAIN, FROZEN = 'train', 'frozen'
# ViT leaves below the blocks: they get the deepest layer-wise decay.
VIT_EMBEDDINGS = ('conv1', 'positional_embedding', 'ln_pre')
NO_DECAY = ('bias', 'scale')  # norm scales and biases take no weight decay

Schedule = Callable[[Any], jax.Array]


def path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def labels(cfg: TrainConfig, tree: dict) -> dict:
  """'train'/'frozen' per leaf of {'params', 'lora'}; with LoRA the whole base model is frozen."""
  def label(path, _):
    keys = path_keys(path)
    if keys[0] == 'lora':
      return TRAIN
    return TRAIN if not cfg.lora and trainable(keys[1:], cfg.stage) else FROZEN  # train/stages.py
  return jax.tree_util.tree_map_with_path(label, tree)


def trainable_mask(cfg: TrainConfig, tree: dict) -> dict:
  return jax.tree.map(lambda lab: lab == TRAIN, labels(cfg, tree))


def partition(cfg: TrainConfig, tree: dict) -> tuple[dict, dict]:
  """(trained, frozen): the tree twice, each with None where a leaf belongs to the other part."""
  mask = trainable_mask(cfg, tree)
  trained = jax.tree.map(lambda x, m: x if m else None, tree, mask)
  frozen = jax.tree.map(lambda x, m: None if m else x, tree, mask)
  return trained, frozen


def combine(trained: dict, frozen: dict) -> dict:
  """The inverse of `partition`."""
  return jax.tree.map(lambda a, b: b if a is None else a, trained, frozen, is_leaf=lambda x: x is None)


def lr_schedule(cfg: TrainConfig) -> Schedule:
  """Linear warmup to peak_lr over warmup_steps (step s gets (s+1)/warmup of it), then cosine to min_lr
  at `steps`."""
  peak, low, warmup, total = cfg.peak_lr, cfg.min_lr, cfg.warmup_steps, cfg.steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cosine = low + (peak - low) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < warmup, warm, cosine)
  return schedule


def vit_layer_scale(keys: tuple[str, ...], shape: tuple[int, ...], num_layers: int, decay: float,
                    visual: float = 1.0):
  """lr factor of one leaf: decay**(L - i) for ViT block i (a vector along the stacked axis 0),
  decay**(L + 1) for the patch embedding, positions and ln_pre, 1 for the adapter; all of these times
  `visual`. 1 for the LLM."""
  if len(keys) < 2 or keys[:2] != ('params', 'visual'):
    return 1.0
  if keys[2] == 'blocks':
    factors = visual * decay ** (num_layers - np.arange(num_layers, dtype=np.float64))
    return factors.astype(np.float32).reshape((num_layers,) + (1,) * (len(shape) - 1))
  if keys[2] in VIT_EMBEDDINGS:
    return float(visual * decay ** (num_layers + 1))
  return float(visual)


def scale_vit_layers(num_layers: int, decay: float, visual: float = 1.0) -> optax.GradientTransformation:
  """Multiplies each update by its leaf's lr factor (`vit_layer_scale`); stateless."""
  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: u * jnp.asarray(vit_layer_scale(path_keys(path), u.shape, num_layers, decay, visual),
                                        u.dtype), updates)
    return scaled, state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _decay_mask(tree):
  return jax.tree_util.tree_map_with_path(lambda path, _: path_keys(path)[-1] not in NO_DECAY, tree)


def trainables(params: dict, lora: dict | None = None) -> dict:
  """The tree the optimiser works on."""
  return {'params': params, 'lora': lora or {}}


def make_optimizer(cfg: TrainConfig, params: dict) -> optax.GradientTransformation:
  """AdamW (b1, b2, eps), decoupled weight decay, clipping, ViT layer-wise decay, warmup + cosine.

  Its state and updates are for the trained part of `trainables(params, lora)` (`partition`); `params` gives
  only the ViT's depth.
  """
  vit_layers = jax.tree.leaves(params['visual']['blocks'])[0].shape[0]
  chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
  chain += [
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
      optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask),
      scale_vit_layers(vit_layers, cfg.vit_lr_decay, cfg.visual_lr_scale),
      optax.scale_by_learning_rate(lr_schedule(cfg)),
  ]
  return optax.chain(*chain)
