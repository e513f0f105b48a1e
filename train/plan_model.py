"""The transient memory of one train step per device: a model of the program XLA compiles.

Measured against `compiled.memory_analysis()` (train/plan_xla.py) and JAX's own list of the residuals the
backward pass keeps (`jax._src.ad_checkpoint.saved_residuals` of the loss). Terms, per device:

  gradients   float32, trainable leaves, sharded like the params.
  weights     the compute-dtype copy of every stacked layer weight that the backward pass needs
              (sharded; without remat the scan saves each layer's cast), plus one layer gathered whole.
  tables      the embedding and the lm_head gathered whole (float32 table for the lookup, compute-dtype
              lm_head for the logits), and their full float32 gradients when they train.
  activations per layer and token what JAX saves (see `text_layer` and `vision_layer`); the ViT only when
              it is differentiated (stages 1 and 2 without LoRA); with remat 'full' only each block's input
              plus one layer recomputed in the backward pass.
  loss        float32 logits, their exp and their gradient at the targets of one micro-batch.
"""
from __future__ import annotations

import math
from typing import Mapping

from qwenvl_jax import sharding as sh
from qwenvl_jax.config import as_dtype

F32 = 4


def _split(setup, name: str, size: int) -> int:
  """How many ways a dimension of this logical name and size is split on the mesh."""
  rules = sh.get_rules(setup.rules)
  return size // sh.shard_shape((size,), sh.spec_for((name,), (size,), setup.sizes, rules), setup.sizes)[0]


def text_layer(setup, tokens: int) -> float:
  """Bytes one decoder layer saves for the backward pass: per token 4 float32 vectors of width d (the
  RMSNorm's float32 input and normalised value, for both norms), 4 compute-dtype ones (norm outputs, the
  residual), 4 head-split ones (q, k, v and the attention output), 6 of the MLP width (up, gate, silu and
  their products), the float32 softmax probabilities with their compute-dtype cast, and its 2 statistics."""
  t, c = setup.model_config.text, as_dtype(setup.cfg.dtype).itemsize
  d, f, h, s = t.hidden_size, t.mlp_width, t.num_heads, setup.seq
  tp_h, tp_f = _split(setup, 'act_heads', h), _split(setup, 'act_mlp', f)
  return tokens * (F32 * 4 * d + c * (4 * d + 4 * d / tp_h + 6 * f / tp_f) + (F32 + c) * h / tp_h * s
                   + 2 * F32 * h / tp_h)


def vision_layer(setup, patches: int) -> float:
  """The same for a ViT block, per patch: 6 float32 vectors of width w (two LayerNorms), 2 compute-dtype
  ones, 4 head-split ones, 4 of the MLP width (fc output, GELU), probabilities and statistics."""
  v, c = setup.model_config.vision, as_dtype(setup.cfg.dtype).itemsize
  w, mlp, h, p = v.width, v.mlp_width, v.heads, v.grid ** 2
  tp_h, tp_f = _split(setup, 'act_heads', h), _split(setup, 'act_mlp', mlp)
  return patches * (F32 * 6 * w + c * (2 * w + 4 * w / tp_h + 4 * mlp / tp_f) + (F32 + c) * h / tp_h * p
                    + 2 * F32 * h / tp_h)


def transient_bytes(setup, counts: Mapping[str, int]) -> tuple[str, dict[str, int]]:
  """(the phase of the step where memory peaks, that phase's transient bytes per device by kind)."""
  cfg, config = setup.cfg, setup.model_config
  t, v = config.text, config.vision
  c = as_dtype(cfg.dtype).itemsize
  batch_split = _split(setup, 'batch', cfg.batch_size // cfg.grad_accum)
  rows = math.ceil(cfg.batch_size / cfg.grad_accum / batch_split)  # one micro-batch, one device
  tokens, patches = rows * setup.seq, rows * cfg.max_images * v.grid ** 2
  vit_trains = not cfg.lora and cfg.stage in (1, 2)
  remat = cfg.remat != 'none'
  table = t.vocab_size * t.hidden_size / _split(setup, 'act_vocab', t.vocab_size)  # gathered over fsdp
  tables_train = not cfg.lora and cfg.stage != 1
  layer = (c + F32) * counts['decoder_local'] / t.num_layers * _split(setup, 'embed', t.hidden_size)
  text, vis = text_layer(setup, tokens), vision_layer(setup, patches)
  if remat:  # each block's input, and one block's residuals recomputed in the backward pass
    acts = t.num_layers * tokens * c * t.hidden_size + text
    if vit_trains:
      acts += v.layers * patches * c * v.width
    weights = layer
  else:
    acts = t.num_layers * text + (v.layers * vis if vit_trains else 0)
    weights = layer + c * (counts['decoder_local'] + (counts['vit_local'] if vit_trains else 0))
  grads = F32 * counts['trainable_local']
  phases = {
      # The loss: the lm_head gathered in the compute dtype, float32 logits, their exp and their gradient,
      # and the lm_head's full float32 gradient before it is reduced to its shard.
      'loss': dict(weights=weights, activations=acts, tables=c * table + (F32 * table if tables_train else 0),
                   loss=3 * F32 * rows * setup.seq * t.vocab_size / _split(setup, 'act_vocab', t.vocab_size)),
      # The start of the backward pass through the layers: every residual and the gradients' buffers.
      'backward': dict(weights=weights, activations=acts, gradients=grads),
  }
  name = max(phases, key=lambda k: sum(phases[k].values()))
  return name, {k: int(x) for k, x in phases[name].items()}
