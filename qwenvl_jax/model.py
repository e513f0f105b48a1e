"""QwenVL: image features written over the `<img>` spans of the token embeddings, then the decoder."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.decoder import Decoder, KVCache, causal_mask, ntk_alpha_of, positions_of
from qwenvl_jax.layers import Einsum, default_kernel_init, with_axes
from qwenvl_jax.logical import constrain
from qwenvl_jax.vision import VisionTransformer

Array = jax.Array


def check_image_spans(input_ids: np.ndarray, config: QwenVLConfig, n_images: int | None = None) -> int:
  """Host-side check that every `<img>` has a `</img>` in the same row, n_queries tokens later.

  Returns the number of images. Inside jit the spans cannot be validated, so callers check concrete ids first.
  """
  v = config.vision
  ids = np.asarray(input_ids)
  count = 0
  for row, toks in enumerate(ids):
    starts = np.flatnonzero(toks == v.image_start_id)
    ends = np.flatnonzero(toks == v.image_end_id)
    if len(starts) != len(ends) or np.any(ends - starts != v.n_queries + 1):
      raise ValueError(
          f'row {row}: every <img> (id {v.image_start_id}) needs a </img> (id {v.image_end_id}) exactly '
          f'{v.n_queries + 1} tokens later; found <img> at {starts.tolist()} and </img> at {ends.tolist()}')
    count += len(starts)
  if n_images is not None and n_images != count:
    raise ValueError(f'input_ids hold {count} image spans but {n_images} images were given')
  return count


def splice_images(x: Array, input_ids: Array, features: Array, image_start_id: int) -> Array:
  """Writes features [n, q, d] over the q tokens inside each `<img>...</img>` span of x [b, t, d].

  Images are taken in row-major order of their `<img>` tokens, as the original does.
  """
  b, t, d = x.shape
  ids = input_ids.reshape(-1)
  is_start = ids == image_start_id
  n_started = jnp.cumsum(is_start)
  n_ended = jnp.cumsum(ids == image_start_id + 1)
  inside = (n_started > n_ended) & ~is_start
  j = jnp.arange(ids.shape[0])
  last_start = jax.lax.cummax(jnp.where(is_start, j, -1), axis=0)
  img = jnp.clip(n_started - 1, 0, features.shape[0] - 1)
  query = jnp.clip(j - last_start - 1, 0, features.shape[1] - 1)
  spliced = jnp.where(inside[:, None], features[img, query].astype(x.dtype), x.reshape(-1, d))
  return spliced.reshape(b, t, d)


class QwenVL(nn.Module):
  """The whole model. `apply({'params': p}, input_ids, pixel_values)` -> logits [b, t, vocab].

  Keyword arguments cover batched and cached use:
    attention_mask [b, s]: which key slots hold real tokens (left padding); s = t, or the cache's slots.
      Sequence packing (training): sample ids 1, 2, .. instead of ones, 0 for padding; each sample then
      has its own positions from 0 and sees only itself (`positions_of`, `causal_mask`).
    positions [b, t]: rotary positions; by default 0.. over each row's real tokens (`positions_of`).
    alpha [b]: dynamic-NTK factor; by default chosen from each row's real length up to this call's last
      token, as the original does at prefill (1 in training, where the original also uses 1 and no logn
      scaling). Decode steps pass the prefill's, as the original keeps it.
    cache, cache_index: the KV cache (a KVCache with a leading layers axis when config.scan_layers, else a
      tuple of per-layer ones) and the slot at which this call's tokens are written: an int, or an int32
      [b] of one slot per row (rows at different lengths). Returns {'logits', 'cache'} then.
    image_features: precomputed `encode_images` output instead of pixel_values.
    logits_at [b, n]: compute logits only at these positions (prefill's last token, training's targets):
      with a 152k vocabulary the lm_head dominates otherwise.
  """
  config: QwenVLConfig

  def setup(self):
    c, t = self.config, self.config.text
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    self.wte = nn.Embed(t.vocab_size, t.hidden_size, **kw,
                        embedding_init=with_axes(default_kernel_init, 'vocab', 'embed'))
    self.visual = VisionTransformer(c)
    self.decoder = Decoder(c)
    self.lm_head = Einsum((t.hidden_size, t.vocab_size), kernel_axes=('embed', 'vocab'),
                          weight_major=c.weight_major, out_chunks=head_chunks(c),
                          weights=c.weights_of('lm_head'), group_size=c.group_size, **kw)

  def encode_images(self, pixel_values: Array) -> Array:
    """[n, H, W, 3] normalised pixels -> [n, n_queries, hidden]."""
    return self.visual(pixel_values.astype(self.config.dtype))

  def embed(self, input_ids: Array, image_features: Array | None = None) -> Array:
    x = self.wte(input_ids)
    if image_features is not None:
      x = splice_images(x, input_ids, image_features, self.config.vision.image_start_id)
    return constrain(x, ('batch', 'length', 'act_embed'))

  def __call__(self, input_ids: Array, pixel_values: Array | None = None, *,
               image_features: Array | None = None, attention_mask: Array | None = None,
               positions: Array | None = None, alpha: Array | None = None,
               cache: KVCache | None = None, cache_index: Array | int = 0,
               logits_at: Array | None = None, train: bool = False, return_hidden: bool = False) -> Any:
    t_cfg = self.config.text
    b, t = input_ids.shape
    if not isinstance(input_ids, jax.core.Tracer):
      n_images = None if pixel_values is None and image_features is None else (
          (pixel_values if pixel_values is not None else image_features).shape[0])
      check_image_spans(np.asarray(input_ids), self.config, n_images)
    if image_features is None and pixel_values is not None:
      image_features = self.encode_images(pixel_values)
    x = self.embed(input_ids, image_features)

    if attention_mask is None:
      attention_mask = jnp.ones((b, t if cache is None else _slots(cache)), bool)
    segments = attention_mask.astype(jnp.int32)
    if positions is None:
      positions = positions_of(segments, cache_index, t)
    if alpha is None:  # the real length so far: valid slots before this call's last query + 1
      end = jnp.asarray(cache_index, jnp.int32).reshape(-1, 1) + t
      so_far = (segments != 0) & (jnp.arange(segments.shape[1]) < end)
      alpha = ntk_alpha_of(so_far, t_cfg, train)
    mask = causal_mask(segments, t, cache_index)

    x, hidden, cache = self.decoder(
        x, positions=positions, alpha=alpha, use_logn=t_cfg.use_logn_attn and not train, mask=mask,
        cache=cache, cache_index=cache_index, collect_hidden=return_hidden)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)  # [b, n, d]
    logits = constrain(self.lm_head('btd,dv->btv', x).astype(jnp.float32), ('batch', 'length', 'act_vocab'))
    if cache is None and not return_hidden:
      return logits
    out = {'logits': logits}
    if cache is not None:
      out['cache'] = cache
    if return_hidden:  # inputs of every block, then the output after ln_f (HF's output_hidden_states)
      out['hidden'] = [hidden[i] for i in range(hidden.shape[0])] + [x]
    return out


# XLA's CPU backend has no bfloat16 or float16 dot: it converts a weight to float32 first. For the
# 152k x 4096 lm_head that is a 2.5 GB temporary (13% of the released model's bf16 weights), so there the
# head runs over vocabulary chunks, each converted on its own (XLA_FLAGS in the README keep XLA from
# hoisting the conversions out of the loop). The logits are the same numbers.
_HEAD_CHUNKS = 8


def head_chunks(config: QwenVLConfig) -> int:
  """Vocabulary chunks of the lm_head (`Einsum.out_chunks`): several only for low-precision or quantized
  weights in the CPU decode layout (a quantized head is dequantized chunk by chunk where no kernel runs)."""
  if not config.weight_major or (config.param_dtype == jnp.float32 and config.weights_of('lm_head') == 'float'):
    return 1
  return next(n for n in (_HEAD_CHUNKS, 4, 2, 1) if config.text.vocab_size % n == 0)


def _slots(cache) -> int:
  layer = cache[0] if isinstance(cache, tuple) else cache
  return layer.k.shape[-1] if layer.slots_last else layer.k.shape[-3]


def example_inputs(config: QwenVLConfig, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, pixel_values) holding one well-formed image span per row: what `init` needs."""
  v = config.vision
  row = [v.image_start_id] + [v.image_pad_id] * v.n_queries + [v.image_end_id]
  ids = np.tile(np.asarray(row, np.int32), (batch, 1))
  return ids, np.zeros((batch, v.image_size, v.image_size, 3), np.float32)


def init_params(model: QwenVL, rng: Array) -> dict:
  """Random parameters (initializer_range 0.02, as the original); use under jax.eval_shape for shapes only."""
  return nn.meta.unbox(model.init(rng, *example_inputs(model.config))['params'])


def param_shapes(model: QwenVL, boxed: bool = False) -> dict:
  """The params tree as ShapeDtypeStructs (init under jax.eval_shape): nothing is allocated. The one
  source of every parameter's shape; boxed=True keeps each leaf in its `nn.LogicallyPartitioned` box,
  which carries the logical axis names its module annotates."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(model.config))['params'])
  return shapes if boxed else nn.meta.unbox(shapes)


def lora_shapes(model: QwenVL) -> dict:
  """The 'lora' collection of a model with `config.lora`, boxed with its logical axes (see `param_shapes`)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), ids)['lora'])


def lm_loss(logits: Array, labels: Array, loss_mask: Array | None = None) -> Array:
  """Mean next-token cross entropy: logits[:, i] predicts labels[:, i+1] (the original's shift)."""
  logits, labels = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  if loss_mask is None:
    return nll.mean()
  w = loss_mask[:, 1:].astype(jnp.float32)
  return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)
