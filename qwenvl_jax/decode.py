"""Text generation: a jitted prefill, then a decode loop on the device over a preallocated KV cache.

Every step is the model's own forward (`QwenVL.__call__` with a cache), in the form decoding reads fastest
(`decode_params`): one module per decoder layer, since slicing the scanned stack at each step would copy
every layer's weights, and on the CPU weight-major kernels and a slots-last cache (`layers.Einsum`,
`decoder.KVCache`). Images are encoded once, before the prefill.

Prompts are left-padded to a length bucket, so prompts of another length in the same bucket reuse the
compiled program. Each row gets its own rotary positions (0.. over its real tokens), dynamic-NTK factor
(from its real length, fixed at prefill) and key mask, so a row generates the same tokens in a padded
batch as alone. The original Qwen-VL code does not: its rotary positions run over the padding too, so
left-padded rows there differ from the same prompts run one by one.
"""
from __future__ import annotations

import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax import param_layout
from qwenvl_jax.batching import Batch, Buckets, check_request, decode_form, load_images, make_batch
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.decoder import KVCache, ntk_alpha_of
from qwenvl_jax.generation_config import GenerationConfig, SettingError  # noqa: F401 (re-exported)
from qwenvl_jax.model import QwenVL, check_image_spans
from qwenvl_jax.sampling import Sampler, select

Array = jax.Array

__all__ = ['Buckets', 'GenerationConfig', 'SettingError', 'check_request', 'decode_params', 'generate',
           'generate_stream', 'load_images']


def decode_params(params: dict, *, consume: bool = False) -> dict:
  """`params` (any form; checkpoints are stacked) in the form decoding reads (`batching.decode_form`);
  returned as it is when already so. consume=True frees the source leaf by leaf
  (`param_layout.convert`): convert once, before generating many times."""
  scan_layers, weight_major = decode_form()
  return param_layout.convert(params, scan_layers=scan_layers, weight_major=weight_major, consume=consume)


def decoding_model(config: QwenVLConfig) -> QwenVL:
  """The model as decoding runs it (`decode_form`): what `decode_params` weights are read by."""
  scan_layers, weight_major = decode_form()
  return QwenVL(config.replace(scan_layers=scan_layers, weight_major=weight_major))


def empty_cache(config: QwenVLConfig, rows: int, slots: int) -> tuple[KVCache, ...]:
  """A zero KV cache of `rows` rows and `slots` slots per layer, in the layout and dtype decoding uses."""
  dtype = decoding_model(config).config.dtype
  return tuple(KVCache.zeros(config.text, rows, slots, dtype, slots_last=decode_form()[1])
               for _ in range(config.text.num_layers))


class DecodeState(NamedTuple):
  """What a decode step carries: the caches and, per row, its key mask and NTK factor."""
  cache: tuple[KVCache, ...]  # per layer
  token: Array  # [b] last chosen token, fed at the next step
  step: Array  # [] tokens generated so far
  done: Array  # [b] row has emitted a stop token (or is batch padding)
  key_mask: Array  # [b, slots] real prompt tokens and every generated slot
  alpha: Array  # [b] dynamic-NTK factor chosen at prefill


def _finish(state: DecodeState, logits: Array, min_new: Array, key: Array, s: Sampler):
  token = select(logits, state.step, min_new, key, s)
  token = jnp.where(state.done, s.pad_id, token)
  done = state.done | jnp.isin(token, jnp.array(s.stop_ids or (-1,), jnp.int32))
  return state._replace(token=token, step=state.step + 1, done=done)


def prompt_forward(params: dict, ids: Array, mask: Array, features: Array, *, config: QwenVLConfig,
                   slots: int) -> tuple[tuple[KVCache, ...], Array, Array, Array]:
  """The left-padded prompts ids [b, p] through the model into a fresh cache of `slots` slots; returns
  (cache, logits at the last token [b, v], key mask [b, slots], NTK factor [b]). Shared by `generate`
  and the server's engine, which puts each prompt's cache into one row of its own."""
  b, p = ids.shape
  model = decoding_model(config)
  alpha = ntk_alpha_of(mask, config.text)
  key_mask = jnp.concatenate([mask, jnp.ones((b, slots - p), bool)], axis=1)
  cache = empty_cache(config, b, slots)
  out = model.apply({'params': params}, ids, image_features=features, attention_mask=key_mask, alpha=alpha,
                    cache=cache, logits_at=jnp.full((b, 1), p - 1, jnp.int32))
  return out['cache'], out['logits'][:, 0], key_mask, alpha


def _prefill(params: dict, ids: Array, mask: Array, features: Array, min_new: Array, key: Array,
             *, config: QwenVLConfig, sampler: Sampler, slots: int) -> tuple[DecodeState, Array]:
  """Runs the left-padded prompts ids [b, p] through the model; returns the state and logits [b, v]."""
  cache, logits, key_mask, alpha = prompt_forward(params, ids, mask, features, config=config, slots=slots)
  state = DecodeState(cache, jnp.zeros((ids.shape[0],), jnp.int32), jnp.zeros((), jnp.int32), ~mask.any(-1),
                      key_mask, alpha)
  return _finish(state, logits, min_new, key, sampler), logits


def _advance(params: dict, state: DecodeState, prompt_slots: int, min_new: Array, key: Array, *,
             config: QwenVLConfig, sampler: Sampler) -> tuple[DecodeState, Array]:
  """Feeds the last token (at slot prompt_slots + step - 1) and chooses the next; logits [b, v]."""
  fed = jnp.where(state.done, 0, state.token)[:, None]  # finished rows feed an in-vocabulary dummy
  out = decoding_model(config).apply({'params': params}, fed, attention_mask=state.key_mask,
                                     alpha=state.alpha, cache=state.cache,
                                     cache_index=prompt_slots + state.step - 1)
  logits = out['logits'][:, 0]
  return _finish(state._replace(cache=out['cache']), logits, min_new, key, sampler), logits


@functools.partial(jax.jit, static_argnames=('config', 'sampler', 'slots', 'output_logits'))
def _generate_on_device(params, ids: Array, mask: Array, features: Array, max_new: Array, min_new: Array,
                        key: Array, *, config: QwenVLConfig, sampler: Sampler, slots: int,
                        output_logits: bool) -> tuple[Array, Array, Array | None]:
  """Prefill plus a while_loop of decode steps; returns (new tokens [b, n], steps run, logits or None)."""
  b, p = ids.shape
  n = slots - p
  state, logits = _prefill(params, ids, mask, features, min_new, key, config=config, sampler=sampler,
                           slots=slots)
  tokens = jnp.full((b, n), sampler.pad_id, jnp.int32).at[:, 0].set(state.token)
  all_logits = (jnp.zeros((b, n, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
                if output_logits else None)

  def cond(carry):
    state = carry[0]
    return (state.step < max_new) & ~state.done.all()

  def body(carry):
    state, tokens, all_logits = carry
    state, logits = _advance(params, state, p, min_new, key, config=config, sampler=sampler)
    at = state.step - 1
    tokens = jax.lax.dynamic_update_slice(tokens, state.token[:, None], (0, at))
    if all_logits is not None:
      all_logits = jax.lax.dynamic_update_slice(all_logits, logits[:, None], (0, at, 0))
    return state, tokens, all_logits

  state, tokens, all_logits = jax.lax.while_loop(cond, body, (state, tokens, all_logits))
  return tokens, state.step, all_logits


_prefill_jit = jax.jit(_prefill, static_argnames=('config', 'sampler', 'slots'))
_advance_jit = jax.jit(_advance, static_argnames=('prompt_slots', 'config', 'sampler'), donate_argnums=1)


@functools.partial(jax.jit, static_argnames='config')
def _encode_images(params, pixel_values: Array, *, config: QwenVLConfig) -> Array:
  return decoding_model(config).apply({"params": params}, pixel_values, method=QwenVL.encode_images)


def image_features(params, pixel_values, config: QwenVLConfig, n_images_in_ids: int) -> Array:
  """Encodes the images once, padded with zero features to a power-of-two count (at least 1)."""
  v = config.vision
  if pixel_values is None:
    if n_images_in_ids:
      raise ValueError(f'input_ids hold {n_images_in_ids} image spans but no pixel_values were given')
    return jnp.zeros((1, v.n_queries, config.text.hidden_size), config.dtype)
  if not isinstance(pixel_values, (np.ndarray, jax.Array)):
    pixel_values = load_images(pixel_values, config)
  expected = (v.image_size, v.image_size, 3)
  if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
    raise ValueError(f'pixel_values must be [n, {v.image_size}, {v.image_size}, 3] (NHWC, normalised), '
                     f'got {tuple(pixel_values.shape)}')
  n = pixel_values.shape[0]
  if n != n_images_in_ids:
    raise ValueError(f'input_ids hold {n_images_in_ids} image spans but {n} images were given')
  features = _encode_images(params, jnp.asarray(pixel_values, jnp.float32), config=config)
  return jnp.pad(features, ((0, Buckets.count(n) - n), (0, 0), (0, 0)))


def _resolve(generation_config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
  return (generation_config or GenerationConfig()).replace(**overrides)


def _as_key(seed: int | Array) -> Array:
  return jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed


def _prepare(model: QwenVL, params, input_ids, pixel_values, attention_mask, g: GenerationConfig,
             buckets: Buckets, output_logits: bool = False) -> tuple[dict, Batch, Array, int]:
  config = model.config
  batch = make_batch(input_ids, attention_mask, config, g.pad_id, buckets)
  n_images = check_image_spans(batch.ids[:batch.n_rows], config)
  check_request(config, batch.mask.sum(1)[:batch.n_rows], n_images, g, buckets=buckets,
                output_logits=output_logits, params=params)
  params = decode_params(params)
  features = image_features(params, pixel_values, config, n_images)
  slots = batch.ids.shape[1] + buckets.length(g.max_new_tokens)
  return params, batch, features, slots


def generate(model: QwenVL, params, input_ids, pixel_values=None, *, attention_mask=None,
             generation_config: GenerationConfig | None = None, seed: int | Array = 0,
             output_logits: bool = False, buckets: Buckets = Buckets(), **overrides):
  """Prompt plus new tokens, [b, t + steps] int64 (t: longest prompt, steps: until every row stopped).

  Args:
    model, params: a QwenVL and its parameters, best converted once with `decode_params` (a tree of
      another form is converted on every call).
    input_ids: a [b, t] integer array (left-padded when `attention_mask` is given), or a list of rows
      of different lengths. Image spans are checked against `pixel_values`.
    pixel_values: normalised [n, S, S, 3] pixels (`preprocess_images`), or a list of paths, bytes, PIL
      images or HWC arrays (loaded with `ImageLoader()`: no URLs); the images of the spans in row-major
      order.
    generation_config: defaults to `GenerationConfig()`; keyword `overrides` replace its fields, e.g.
      `max_new_tokens=40, do_sample=False`.
    seed: an int or a jax PRNG key for sampling.
    output_logits: also return the raw logits of every step, [b, steps, vocab] float32.
  Rows that stop early are filled with `pad_id`; prompts shorter than the longest are left-padded with it.
  Before any work the request is checked (`check_request`): the longest prompt plus max_new_tokens must
  fit the model's window (`max_position_embeddings`) and its estimated memory what is free, else
  `budget.GenerationLimitError` (a ValueError) says by how much.
  """
  g = _resolve(generation_config, overrides)
  params, batch, features, slots = _prepare(model, params, input_ids, pixel_values, attention_mask, g,
                                            buckets, output_logits)
  tokens, steps, logits = _generate_on_device(
      params, batch.ids, batch.mask, features, jnp.int32(g.max_new_tokens), jnp.int32(g.min_new_tokens),
      _as_key(seed), config=model.config, sampler=Sampler.of(g), slots=slots, output_logits=output_logits)
  steps = int(steps)
  new = np.asarray(tokens)[:batch.n_rows, :steps]
  out = np.concatenate([batch.prompt, new], axis=1)
  if output_logits:
    return out, np.asarray(logits)[:batch.n_rows, :steps]
  return out


def generate_stream(model: QwenVL, params, input_ids, pixel_values=None, *, attention_mask=None,
                    generation_config: GenerationConfig | None = None, seed: int | Array = 0,
                    buckets: Buckets = Buckets(), **overrides) -> Iterator[np.ndarray]:
  """Like `generate`, but yields each step's new tokens [b] as soon as they are chosen.

  Rows that have stopped yield `pad_id`; the iteration ends when every row stopped or after
  max_new_tokens. The request is checked and prepared (images encoded) by the call itself, so bad input
  fails here rather than at the first token. Uses a jitted prefill and a jitted single decode step
  (each compiled once per bucket) driven from Python, since the host must see every token.
  """
  g = _resolve(generation_config, overrides)
  params, batch, features, slots = _prepare(model, params, input_ids, pixel_values, attention_mask, g,
                                            buckets)
  return _stream(model.config, params, batch, features, slots, g, _as_key(seed))


def _stream(config: QwenVLConfig, params: dict, batch: Batch, features: Array, slots: int,
            g: GenerationConfig, key: Array) -> Iterator[np.ndarray]:
  sampler, min_new = Sampler.of(g), jnp.int32(g.min_new_tokens)
  state, _ = _prefill_jit(params, batch.ids, batch.mask, features, min_new, key, config=config,
                          sampler=sampler, slots=slots)
  prompt_slots = batch.ids.shape[1]
  chosen = 1  # state.step, counted here rather than fetched from the device at every token
  while True:
    token, done = jax.device_get((state.token, state.done))
    yield token[:batch.n_rows].astype(np.int64)
    if chosen >= g.max_new_tokens or done[:batch.n_rows].all():
      return
    state, _ = _advance_jit(params, state, prompt_slots, min_new, key, config=config, sampler=sampler)
    chosen += 1
