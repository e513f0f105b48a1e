"""The transient memory of one train step per device: a model of the program XLA compiles.

Built from JAX's own list of the residuals the backward pass keeps (`saved_residuals` of the loss, in
jax._src.ad_checkpoint) and checked against `compiled.memory_analysis()` (train/plan_xla.py). The step's
memory peaks in one of three phases; the plan takes the largest:

  loss      every residual, the lm_head gathered in the compute dtype, the float32 logits at the targets of
            one micro-batch and their exp, and the lm_head's whole float32 gradient (no layer gathered).
  backward  the start of the backward pass through the layers: every residual, one layer gathered, the
            gradients' buffers and the lm_head's whole gradient.
  update    after the backward pass: the gradients and the lm_head's whole gradient.

Terms:
  gradients    float32, trainable leaves, sharded like the params.
  weights      the compute-dtype copy of every stacked layer weight that the backward pass needs (sharded;
               without remat the scan saves each layer's cast, or slice of a weight held in the compute
               dtype; a quantized base saves none: the backward pass dequantizes each layer again), and
               in the layers' passes one layer gathered whole in float32 and in the compute dtype (a held
               weight: in the compute dtype alone; an int4 base counted by its values, two per byte).
               LoRA applies inside the model, one layer at a time: no merged kernel exists.
  tables       the lm_head gathered whole in the compute dtype for the logits; its gradient is computed
               whole in float32 (the dot's output and its sum over the devices) and reduced to the shard
               only by the update.
  activations  per layer and token what JAX saves (`text_layer`, `vision_layer`); the ViT only when it is
               differentiated (stages 1 and 2 without LoRA); with remat 'full' each block's input plus one
               layer's residuals recomputed in the backward pass. Policies 'dots' and 'dots_no_batch'
               save a subset of the 'none' residuals: the plan counts them as 'none' (an upper bound).
  loss         float32 logits and their exp at the targets of one micro-batch (every position in the plan).

XLA packs these buffers into one heap whose size can exceed the live peak by a few percent to ~15%.
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


def text_layer(setup, tokens: int, trains: bool) -> float:
  """Bytes one decoder layer saves for the backward pass. Per token: 4 float32 vectors of width d (the
  RMSNorms' float32 input and normalised value), 3 head-split compute-dtype ones (q, k, v), 5 of the MLP
  width (up, gate and the terms of silu), the float32 softmax probabilities, their compute-dtype cast and 2
  statistics per row. When the layer's weights train (LoRA included), also the inputs of its weight
  products, needed for the weights' gradients only: 4 vectors of width d, 1 head-split, 1 of the MLP."""
  t, c = setup.model_config.text, as_dtype(setup.cfg.dtype).itemsize
  d, f, h, s = t.hidden_size, t.mlp_width, t.num_heads, setup.seq
  tp_h, tp_f = _split(setup, 'act_heads', h), _split(setup, 'act_mlp', f)
  saved = F32 * 4 * d + c * (3 * d / tp_h + 5 * f / tp_f) + (F32 + c) * h / tp_h * s + 2 * F32 * h / tp_h
  if trains:
    saved += c * (4 * d + d / tp_h + f / tp_f)
  return tokens * saved


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
  micro_rows = cfg.batch_size // cfg.samples_per_row // cfg.grad_accum  # packed rows: several samples each
  rows = math.ceil(micro_rows / _split(setup, 'batch', micro_rows))  # one micro-batch, one device
  tokens, patches = rows * setup.seq, rows * cfg.max_images * cfg.samples_per_row * v.grid ** 2
  vit_trains = not cfg.lora and cfg.stage in (1, 2)
  remat = cfg.remat == 'full'
  table = t.vocab_size * t.hidden_size / _split(setup, 'act_vocab', t.vocab_size)  # gathered over fsdp
  tables_train = not cfg.lora and cfg.stage != 1
  # one layer gathered whole: a float32 master (or a quantized base dequantized in float32) and its cast;
  # a frozen weight held in the compute dtype (train/frozen.py) as it is
  held = counts['decoder_held_local']
  layer = ((c + F32) * (counts['decoder_local'] - held) + c * held) / t.num_layers * _split(setup, 'embed',
                                                                                            t.hidden_size)
  text = text_layer(setup, tokens, trains=cfg.lora or cfg.stage != 1)
  vis = vision_layer(setup, patches)
  if remat:  # each block's input, and one block's residuals recomputed in the backward pass
    acts = t.num_layers * tokens * c * t.hidden_size + text
    if vit_trains:
      acts += v.layers * patches * c * v.width
    weights = layer
  else:
    acts = t.num_layers * text + (v.layers * vis if vit_trains else 0)
    # a quantized base's layers are dequantized again in the backward pass (layers.Einsum): none saved;
    # a float one's per-layer slices are (a weight held in the compute dtype too: the scan's residual)
    saved = 0 if setup.weights != 'float' else counts['decoder_local']
    weights = layer + c * (saved + (counts['vit_local'] if vit_trains else 0))
  grads = F32 * counts['trainable_local']
  # The lm_head's gradient is computed whole (float32, as its dot's output and summed over the devices)
  # and reduced to its shard only when the update needs it.
  head_grad = 2 * F32 * table if tables_train else 0
  phases = {
      # The loss: every residual, the lm_head gathered in the compute dtype, the float32 logits at the
      # targets of one micro-batch and their exp (the residual of logsumexp; their gradient takes the
      # logits' place), the lm_head's gradient.
      # No layer is gathered there (the forward's scan is over, the backward's not begun).
      'loss': dict(weights=weights - layer, activations=acts, tables=c * table + head_grad,
                   loss=2 * F32 * rows * setup.seq * t.vocab_size / _split(setup, 'act_vocab', t.vocab_size)),
      # The start of the backward pass through the layers: every residual and the gradients' buffers.
      'backward': dict(weights=weights, activations=acts, gradients=grads, tables=head_grad),
      # After the backward pass, before the update: the gradients.
      'update': dict(gradients=grads, tables=head_grad),
  }
  name = max(phases, key=lambda k: sum(phases[k].values()))
  return name, {k: int(x) for k, x in phases[name].items()}
