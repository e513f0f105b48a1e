"""The train step: a pure function `step(state, batch) -> (state, metrics)`, ready for jit with shardings.

A batch (global rows, split into `grad_accum` micro-batches by a scan inside the step):
  input_ids [B, T] int32, attention_mask [B, T] int32: the sample of each token, 1 (or 1, 2, .. in a row of
    several samples, sequence packing: each has its own positions and attention); 0 for right padding,
  targets [B, N] int32: positions p whose next token p+1 is a training target (padding: 0),
  target_mask [B, N] float32: 1 for real targets, 0 for padding,
  pixel_values [B, M, S, S, 3] float32, or uint8 bytes normalised here: M image slots per row, filled in
  order of the row's `<img>` tokens (across its samples), zeros when unused.
The loss is the mean cross entropy over all real targets of the global batch. Logits are computed only at
the target positions (the model's `logits_at`): the 152k-vocabulary head dominates otherwise.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qwenvl_jax.model import QwenVL
from qwenvl_jax.preprocess import normalize_on_device
from qwenvl_jax.quant import is_quantized
from train.config import TrainConfig
from train.lora import lora_config
from train.optim import combine, lr_schedule, partition, trainables

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

__all__ = ['TrainState', 'init_state', 'make_train_step', 'image_order', 'target_nll']


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any  # float32 master weights; frozen ones read in the compute dtype held in it (train/frozen.py)
  opt_state: Any
  lora: Any = None  # LoRA tree when training with LoRA


def init_state(cfg: TrainConfig, params: Any, optimizer: optax.GradientTransformation,
               lora: Any = None) -> TrainState:
  """Step 0; the optimiser's state covers the trained part of the tree alone."""
  trained, _ = partition(cfg, trainables(params, lora))
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(trained), lora)


def image_order(input_ids: jax.Array, image_start_id: int, slots: int) -> jax.Array:
  """[b * slots] slot index of each image in row-major order of its `<img>` token (the order the model
  splices features in), from per-row slots (row r owns slots r*slots ... r*slots + slots - 1)."""
  b = input_ids.shape[0]
  is_start = input_ids == image_start_id
  slot = jnp.arange(b)[:, None] * slots + jnp.cumsum(is_start, axis=1) - 1  # [b, t]
  (pos,) = jnp.nonzero(is_start.reshape(-1), size=b * slots, fill_value=0)
  return jnp.clip(slot.reshape(-1)[pos], 0, b * slots - 1)


def target_nll(logits: jax.Array, input_ids: jax.Array, targets: jax.Array) -> jax.Array:
  """[b, n] negative log-likelihood of token targets+1 under logits [b, n, vocab] taken at targets."""
  labels = jnp.take_along_axis(input_ids, targets + 1, axis=1)
  logits = logits.astype(jnp.float32)
  # logsumexp - label logit never materialises a [b, n, vocab] log_softmax: ~30% less time on the CPU.
  return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]


def _micro_batches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...] with micro-batch i = rows i, i+n, ...: with the rows split over devices,
  every micro-batch is spread over all of them."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1), batch)


def make_train_step(model: QwenVL, optimizer: optax.GradientTransformation,
                    cfg: TrainConfig) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """`cfg` gives the stage mask, LoRA settings, grad_accum and the lr schedule of the metrics. `model`
  describes the params as the state holds them (a quantized base: its weights mode); with cfg.lora the
  step runs it with LoRA applied inside (`train/lora.py`), dropout drawn per step and micro-batch."""
  start_id = model.config.vision.image_start_id
  schedule = lr_schedule(cfg)
  if cfg.lora:
    model = QwenVL(model.config.replace(lora=lora_config(cfg)))
  rngs = lambda rng: {'dropout': rng} if cfg.lora and cfg.lora_dropout > 0 else {}

  def loss_sum(trained, frozen, mb: Batch, rng: jax.Array) -> jax.Array:
    tree = combine(trained, frozen)
    variables = {'params': tree['params'], **({'lora': tree['lora']} if cfg.lora else {})}
    ids, pixels = mb['input_ids'], mb['pixel_values']
    if pixels.dtype == jnp.uint8:  # the loader ships bytes: a quarter of float32's transfer
      pixels = normalize_on_device(pixels)
    b, slots = pixels.shape[:2]
    features = None
    if slots:
      features = model.apply(variables, pixels.reshape((b * slots,) + pixels.shape[2:]),
                             method=QwenVL.encode_images)  # [b*slots, q, d]
      features = features[image_order(ids, start_id, slots)]
    logits = model.apply(variables, ids, image_features=features, attention_mask=mb['attention_mask'],
                         logits_at=mb['targets'], train=True, rngs=rngs(rng))  # [b, n, vocab]
    return (target_nll(logits, ids, mb['targets']) * mb['target_mask']).sum()

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    if is_quantized(state.params) and model.config.weights == 'float':
      raise ValueError('the state holds a quantized base but the step was made for a float model: make it '
                       'with the base\'s config (train/state.py base_config, or the loaded quantized model)')
    trained, frozen = partition(cfg, trainables(state.params, state.lora))
    rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)  # LoRA dropout: one key per step

    def accumulate(carry, indexed):
      i, mb = indexed
      loss, grads = jax.value_and_grad(loss_sum)(trained, frozen, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trained))
    micro = (jnp.arange(cfg.grad_accum), _micro_batches(batch, cfg.grad_accum))
    (total_loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    count = batch['target_mask'].astype(jnp.float32).sum()
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, trained)
    new_tree = combine(optax.apply_updates(trained, updates), frozen)  # frozen leaves: the same arrays
    new_state = TrainState(state.step + 1, new_tree['params'], opt_state,
                           new_tree['lora'] if state.lora is not None else None)
    metrics = {'loss': total_loss / denom, 'grad_norm': grad_norm, 'lr': schedule(state.step),
               'targets': count, 'tokens': (batch['attention_mask'] != 0).astype(jnp.float32).sum()}
    return new_state, metrics

  return step
