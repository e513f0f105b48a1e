"""Text generation: a jitted prefill, then a decode loop on the device over a preallocated KV cache.

Prompts are left-padded to a length bucket, so prompts of another length in the same bucket reuse the
compiled program. Each row gets its own rotary positions (0.. over its real tokens), dynamic-NTK factor
(from its real length, fixed at prefill) and key mask, so a row generates the same tokens in a padded
batch as alone. The original Qwen-VL code does not: its rotary positions run over the padding too, so
left-padded rows there differ from the same prompts run one by one.

Decoding is bound by reading the weights once per step, so it runs the model's decoder blocks over
per-layer parameters and caches (`DecodeParams`) rather than the scanned stack, whose per-step slicing
would copy every layer's weights; images are encoded once, before the prefill.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax import budget, cpu_kernels
from qwenvl_jax.config import QwenVLConfig, TextConfig
from qwenvl_jax.decoder import DecoderBlock, KVCache, logn_scale, ntk_alpha, rotary_tables
from qwenvl_jax.generation_config import GenerationConfig, SettingError  # noqa: F401 (SettingError re-exported)
from qwenvl_jax.images import ImageLoader, ImageSource
from qwenvl_jax.layers import Einsum, RMSNorm
from qwenvl_jax.model import QwenVL, causal_mask, check_image_spans
from qwenvl_jax.params import get_path, set_path
from qwenvl_jax.preprocess import preprocess_images
from qwenvl_jax.sharding import rules_active

Array = jax.Array
@dataclasses.dataclass(frozen=True)
class Buckets:
  """Padded sizes: lengths are powers of two from `min_length` up to `step`, then multiples of `step`.

  Batch and image counts are padded to powers of two. Each bucket compiles once.
  """
  min_length: int = 32
  step: int = 512

  def __post_init__(self):
    powers = all(n > 0 and n & (n - 1) == 0 for n in (self.min_length, self.step))
    if not powers or self.min_length > self.step:
      raise ValueError(f'Buckets need powers of two with min_length <= step, got {self}')

  def length(self, n: int) -> int:
    if n <= self.step:
      return max(self.min_length, 1 << max(n - 1, 0).bit_length())
    return -(-n // self.step) * self.step

  @staticmethod
  def count(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class _Sampler:
  """The static part of a GenerationConfig: changing it recompiles, changing token counts does not."""
  do_sample: bool
  temperature: float
  top_k: int
  top_p: float
  stop_ids: tuple[int, ...]
  pad_id: int
  vocab_limit: int | None = None

  @classmethod
  def of(cls, g: GenerationConfig) -> '_Sampler':
    if g.greedy:  # greedy ignores the warpers, as Hugging Face does
      return cls(False, 1.0, 0, 1.0, g.stop_ids, g.pad_id, g.vocab_limit)
    return cls(True, g.temperature, g.top_k, g.top_p, g.stop_ids, g.pad_id, g.vocab_limit)


_TOP_P_CANDIDATES = 256  # top-p first looks among this many best tokens; a full sort costs ~35 ms at 152k


def _top_p_threshold(descending: Array, lse: Array, top_p: float) -> tuple[Array, Array]:
  """(smallest kept logit [b, 1], whether the candidates hold top_p of the mass [b]).

  Hugging Face removes a token when the ascending cumulative probability up to it is <= 1 - top_p,
  i.e. when the tokens above it already hold top_p: the kept tokens are a prefix of `descending`.
  """
  probs = jnp.exp(descending - lse[:, None])
  mass_above = jnp.cumsum(probs, axis=-1) - probs
  n_kept = jnp.maximum((mass_above < top_p).sum(-1), 1)  # the best token always stays
  return jnp.take_along_axis(descending, n_kept[:, None] - 1, axis=-1), probs.sum(-1) >= top_p


def warp_logits(logits: Array, temperature: float, top_k: int, top_p: float) -> Array:
  """Hugging Face's TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper in that order; [b, v].

  Removed tokens get -inf. Ties at a threshold are all kept (torch keeps an arbitrary subset).
  """
  if temperature != 1.0:
    logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    lse = jax.nn.logsumexp(logits, axis=-1)
    candidates = jax.lax.top_k(logits, min(_TOP_P_CANDIDATES, logits.shape[-1]))[0]
    threshold, enough = _top_p_threshold(candidates, lse, top_p)
    threshold = jax.lax.cond(  # flat distributions need every token sorted
        enough.all(), lambda: threshold,
        lambda: _top_p_threshold(-jnp.sort(-logits, axis=-1), lse, top_p)[0])
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def argmax_last(logits: Array) -> Array:
  """jnp.argmax(logits, -1) (first maximum; first NaN if any) as int32, in two plain reductions: XLA's
  CPU backend runs argmax's (value, index) reduction element by element, 2.7 ms against 0.6 ms for
  [8, 151936], 2% of a batch-8 decode step on the bench dims."""
  top = logits.max(-1, keepdims=True)
  first = (logits == top) | jnp.isnan(logits)
  return jnp.min(jnp.where(first, jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1]), axis=-1)


def _within_limit(logits: Array, limit: int | None) -> Array:
  """Ids at or past `limit` get -inf (an exact -inf, whatever the logits held: NaN included)."""
  if limit is None or limit >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < limit, logits, -jnp.inf)


def _select(logits: Array, step: Array, min_new: Array, key: Array, s: _Sampler) -> Array:
  """The next token [b] from raw logits [b, v] for the step-th new token; never an id >= vocab_limit."""
  logits = _within_limit(logits, s.vocab_limit)
  stops = [i for i in s.stop_ids if i < logits.shape[-1]]
  if stops:  # Hugging Face's MinNewTokensLengthLogitsProcessor, applied to every stop id
    logits = logits.at[:, jnp.array(stops)].set(jnp.where(step < min_new, -jnp.inf, logits[:, stops]))
  if not s.do_sample:
    return argmax_last(logits)  # a first maximum (or first NaN) is never a masked -inf
  # Masked again after warping: arithmetic on -inf can give NaN (-inf / inf, inf - inf), and both
  # argmax and categorical would pick a NaN first.
  logits = _within_limit(warp_logits(logits, s.temperature, s.top_k, s.top_p), s.vocab_limit)
  return jax.random.categorical(jax.random.fold_in(key, step), logits, axis=-1).astype(jnp.int32)


class DecodeParams(NamedTuple):
  """Parameters laid out for generation: each decoder layer's weights are arrays of their own.

  In the scanned layout (a leading [layers] axis) every decode step copies each layer's slice out of
  the stacked arrays before its matmuls, tripling the memory traffic of a step that should read every
  weight once. Every matrix of the decoder and the lm_head is also stored with its contracted dims minor
  (torch's [out, in]) and applied weight-major (`DecoderBlock(decode_layout=True)`,
  `layers.weight_major_einsum`): a decode step is a chain of products of a few rows with big weights,
  which XLA's CPU dot reads fastest in that form (batch 8: 24-27 GB/s against 13-16). w1 and w2 are one
  kernel. `decode_params` converts once; `generate` converts on each call when given the usual tree.
  """
  layers: tuple[dict, ...]  # per decoder layer: {'ln_1', 'attn', 'ln_2', 'mlp'}
  rest: dict  # the other parameters: wte, decoder.ln_f, lm_head [vocab, d], visual


def _decode_layer_params(layer: dict) -> dict:
  """One decoder layer's weights in the decode layout (each kernel's contracted dims minor): c_attn
  [3, h, k, d], attn.c_proj [d, h, k], w12 [2, f, d] (w1 and w2 as one kernel), mlp.c_proj [d, f]."""
  attn, mlp = layer['attn'], layer['mlp']
  w12 = jnp.stack([mlp['w1']['kernel'].T, mlp['w2']['kernel'].T])  # [2, f, d]
  return dict(layer, attn={
      'c_attn': dict(attn['c_attn'], kernel=jnp.transpose(attn['c_attn']['kernel'], (1, 2, 3, 0))),
      'c_proj': {'kernel': jnp.transpose(attn['c_proj']['kernel'], (2, 0, 1))}},
      mlp={'w12': {'kernel': w12}, 'c_proj': {'kernel': mlp['c_proj']['kernel'].T}})


def decode_params(params, *, consume: bool = False) -> DecodeParams:
  """The `QwenVL` parameter tree split per decoder layer (a DecodeParams is returned as it is).

  `params['decoder']['layers']` may be the scanned stack or already a sequence of per-layer trees
  (`load_pretrained(..., split_layers=True)`, which never holds a stacked leaf). consume=True removes each
  stacked leaf, layer and the lm_head from `params` once converted, so that (with no other reference to
  them) its memory is freed before the next: the peak stays near one copy of the weights plus one stacked
  leaf (one layer when already split).
  """
  if isinstance(params, DecodeParams):
    return params
  decoder = params['decoder']
  stacked = decoder.pop('layers') if consume else decoder['layers']
  if isinstance(stacked, (list, tuple)):
    layers = list(stacked)
  else:
    paths = [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(stacked)[0]]
    layers = [{} for _ in range(get_path(stacked, paths[0]).shape[0])]
    for path in paths:
      leaf = get_path(stacked, path[:-1]).pop(path[-1]) if consume else get_path(stacked, path)
      for layer, piece in zip(layers, jnp.unstack(jnp.asarray(leaf))):
        set_path(layer, path, piece)
      del leaf
  del stacked
  converted = []
  while layers:  # one layer at a time, so that with consume=True each original is freed once converted
    converted.append(_decode_layer_params(layers.pop(0)))
  head = params.pop('lm_head') if consume else params['lm_head']
  rest = {k: v for k, v in params.items() if k not in ('decoder', 'lm_head')}
  rest['decoder'] = {k: v for k, v in decoder.items() if k != 'layers'}
  rest['lm_head'] = {'kernel': jnp.asarray(head['kernel']).T}  # [vocab, d]
  return DecodeParams(tuple(converted), rest)


def _kernel_attends(dtype) -> bool:
  """Whether decode steps attend with `cpu_kernels.attend_one`: float32, and not under sharding rules
  (XLA's partitioner does not see into the kernel)."""
  return dtype == jnp.float32 and not rules_active() and cpu_kernels.available()


class SlotsLastCache(KVCache):
  """One layer's keys and values as [b, heads, head_dim, slots]; without the b axis when b is 1 and the
  CPU kernel does not attend.

  The layout in which XLA's CPU dots and the kernel take them: with slots before heads every decode step
  transposes each layer's whole cache (~10% of a batch-1 step). With a size-1 b axis XLA fuses the cache
  update into its two attention dots and copies the cache to do so; the kernel, without that axis, had
  the cache copied several times per layer (a batch-1 step 42 -> 73 ms).
  """

  @classmethod
  def empty(cls, text: TextConfig, batch: int, slots: int, dtype) -> 'SlotsLastCache':
    shape = (batch, text.num_heads, text.head_dim, slots)[batch == 1 and not _kernel_attends(dtype):]
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def write(self, keys: Array, values: Array, index: Array) -> 'SlotsLastCache':
    def put(cache: Array, new: Array) -> Array:
      new = jnp.einsum('bthk->bhkt', new).reshape(cache.shape[:-1] + new.shape[1:2])
      return jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), index, axis=-1)
    return type(self)(put(self.k, keys), put(self.v, values))

  def read(self) -> tuple[Array, Array]:
    return tuple(jnp.einsum('bhks->bshk', c.reshape((-1,) + c.shape[-3:])) for c in self)

  def attend(self, q: Array, mask: Array, dtype) -> Array:
    """A decode step's one query per row goes to the CPU kernel (see `_kernel_attends`); longer queries
    to `layers.attend`."""
    if q.shape[1] != 1 or not _kernel_attends(dtype):
      return super().attend(q, mask, dtype)
    k, v = (c.reshape((-1,) + c.shape[-3:]) for c in self)  # [b, h, k, slots]
    return cpu_kernels.attend_one(q[:, 0], k, v, mask[:, 0])[:, None]


class DecodeState(NamedTuple):
  """What a decode step carries: the caches and, per row, its real prompt length and NTK factor."""
  caches: tuple[SlotsLastCache, ...]  # per layer
  token: Array  # [b] last chosen token, fed at the next step
  step: Array  # [] tokens generated so far
  done: Array  # [b] row has emitted a stop token (or is batch padding)
  key_mask: Array  # [b, slots] real prompt tokens and every generated slot
  lengths: Array  # [b] real prompt lengths
  alpha: Array  # [b] dynamic-NTK factor chosen at prefill


def _forward(p: DecodeParams, ids: Array, features: Array | None, key_mask: Array, positions: Array,
             alpha: Array, caches: tuple[SlotsLastCache, ...], cache_index: Array, config: QwenVLConfig):
  """QwenVL's cached forward (ids [b, t] at slots cache_index..) over per-layer parameters and caches.

  Built from the model's own modules, so the numerics are the model's. Returns (logits of the last
  position [b, vocab] float32, updated caches).
  """
  t = config.text
  kw = dict(dtype=config.compute_dtype, param_dtype=config.weights_dtype)
  x = QwenVL(config).apply({'params': p.rest}, ids, features, method=QwenVL.embed)
  rope = rotary_tables(positions, alpha, t)
  q_scale = (logn_scale(positions, t.seq_length) if t.use_logn_attn
             else jnp.ones(positions.shape, jnp.float32))
  mask = causal_mask(key_mask, ids.shape[1], cache_index)
  block = DecoderBlock(t, decode_layout=True, **kw)
  updated = []
  for layer, cache in zip(p.layers, caches):
    x, (cache, _) = block.apply({'params': layer}, x, cache, rope, q_scale, mask, cache_index)
    updated.append(cache)
  x = RMSNorm(t.layer_norm_eps, **kw).apply({'params': p.rest['decoder']['ln_f']}, x[:, -1:])
  return _head(p.rest['lm_head']['kernel'], x, kw)[:, 0], tuple(updated)


# XLA's CPU backend has no bfloat16 or float16 dot: it converts a weight to float32 first. For the
# 152k x 4096 lm_head that is a 2.5 GB temporary (13% of the released model's bf16 weights), so there the
# head runs over vocabulary chunks, each converted on its own (XLA_FLAGS in the README keep XLA from
# hoisting the conversions out of the loop). The logits are the same numbers.
_HEAD_CHUNKS = 8


def _head(kernel: Array, x: Array, kw: dict) -> Array:
  """Logits [b, t, vocab] float32 of x [b, t, d] with the lm_head kernel [vocab, d]."""
  vocab, d = kernel.shape
  chunks = next(n for n in (_HEAD_CHUNKS, 4, 2, 1) if vocab % n == 0)
  if kernel.dtype == jnp.float32 or jax.default_backend() != 'cpu' or chunks == 1:
    return Einsum((vocab, d), weight_major=True, **kw).apply({'params': {'kernel': kernel}}, 'btd,vd->btv',
                                                              x).astype(jnp.float32)
  head = Einsum((vocab // chunks, d), weight_major=True, **kw)
  parts = jax.lax.map(lambda k: head.apply({'params': {'kernel': k}}, 'btd,vd->btv', x).astype(jnp.float32),
                      kernel.reshape(chunks, vocab // chunks, d))  # [chunks, b, t, vocab / chunks]
  return jnp.moveaxis(parts, 0, 2).reshape(*x.shape[:2], vocab)


def _finish(state: DecodeState, logits: Array, min_new: Array, key: Array, s: _Sampler):
  token = _select(logits, state.step, min_new, key, s)
  token = jnp.where(state.done, s.pad_id, token)
  done = state.done | jnp.isin(token, jnp.array(s.stop_ids or (-1,), jnp.int32))
  return state._replace(token=token, step=state.step + 1, done=done)


def _prefill(params: DecodeParams, ids: Array, mask: Array, features: Array, min_new: Array, key: Array,
             *, config: QwenVLConfig, sampler: _Sampler, slots: int) -> tuple[DecodeState, Array]:
  """Runs the left-padded prompts ids [b, p] through the model; returns the state and logits [b, v]."""
  b, p = ids.shape
  t = config.text
  lengths = mask.sum(-1)
  alpha = ntk_alpha(lengths, t.seq_length) if t.use_dynamic_ntk else jnp.ones((b,), jnp.float32)
  key_mask = jnp.concatenate([mask, jnp.ones((b, slots - p), bool)], axis=1)
  caches = tuple(SlotsLastCache.empty(t, b, slots, config.compute_dtype) for _ in params.layers)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  logits, caches = _forward(params, ids, features, key_mask, positions, alpha, caches, jnp.int32(0), config)
  state = DecodeState(caches, jnp.zeros((b,), jnp.int32), jnp.zeros((), jnp.int32), lengths == 0,
                      key_mask, lengths, alpha)
  return _finish(state, logits, min_new, key, sampler), logits


def _advance(params: DecodeParams, state: DecodeState, prompt_slots: int, min_new: Array, key: Array, *,
             config: QwenVLConfig, sampler: _Sampler) -> tuple[DecodeState, Array]:
  """Feeds the last token (at slot prompt_slots + step - 1) and chooses the next; logits [b, v]."""
  last = state.step - 1
  fed = jnp.where(state.done, 0, state.token)[:, None]  # finished rows feed an in-vocabulary dummy
  logits, caches = _forward(params, fed, None, state.key_mask, (state.lengths + last)[:, None], state.alpha,
                            state.caches, prompt_slots + last, config)
  return _finish(state._replace(caches=caches), logits, min_new, key, sampler), logits


@functools.partial(jax.jit, static_argnames=('config', 'sampler', 'slots', 'output_logits'))
def _generate_on_device(params, ids: Array, mask: Array, features: Array, max_new: Array, min_new: Array,
                        key: Array, *, config: QwenVLConfig, sampler: _Sampler, slots: int,
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
  return QwenVL(config).apply({'params': params}, pixel_values, method=QwenVL.encode_images)


class _Batch(NamedTuple):
  ids: np.ndarray  # [b', p'] left-padded to the buckets, padding id 0
  mask: np.ndarray  # [b', p']
  prompt: np.ndarray  # [b, p] the prompts as returned: left-padded with pad_id to the longest
  n_rows: int


def _as_rows(input_ids, attention_mask) -> list[np.ndarray]:
  """The real tokens of each row, from ragged lists or a left-padded [b, t] array plus mask."""
  if isinstance(input_ids, (np.ndarray, jax.Array)) or (
      len(input_ids) and not isinstance(input_ids[0], (list, tuple, np.ndarray))):
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f'input_ids must be integer [batch, length], got {ids.dtype} {ids.shape}')
    if attention_mask is None:
      return list(ids)
    mask = np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
      raise ValueError(f'attention_mask {mask.shape} does not match input_ids {ids.shape}')
    if np.any(mask[:, :-1] & ~mask[:, 1:]):
      raise ValueError('attention_mask must be left padding (zeros, then ones) in every row')
    return [row[m] for row, m in zip(ids, mask)]
  if attention_mask is not None:
    raise ValueError('attention_mask is only accepted with a [batch, length] array of input_ids')
  return [np.asarray(row, np.int64).reshape(-1) for row in input_ids]


def _make_batch(input_ids, attention_mask, config: QwenVLConfig, pad_id: int, buckets: Buckets) -> _Batch:
  rows = _as_rows(input_ids, attention_mask)
  if not rows:
    raise ValueError('input_ids holds no rows')
  vocab = config.text.vocab_size
  for r, row in enumerate(rows):
    if row.size == 0:
      raise ValueError(f'row {r} of input_ids holds no tokens')
    if row.min() < 0 or row.max() >= vocab:
      raise ValueError(f'row {r} of input_ids holds ids outside the vocabulary [0, {vocab})')
  longest = max(len(r) for r in rows)
  b, p = buckets.count(len(rows)), buckets.length(longest)
  ids, mask = np.zeros((b, p), np.int32), np.zeros((b, p), bool)
  prompt = np.full((len(rows), longest), pad_id, np.int64)
  for r, row in enumerate(rows):
    ids[r, p - len(row):], mask[r, p - len(row):] = row, True
    prompt[r, longest - len(row):] = row
  return _Batch(ids, mask, prompt, len(rows))


def load_images(images: Sequence[ImageSource], config: QwenVLConfig,
                loader: ImageLoader | None = None) -> np.ndarray:
  """Paths, URLs, bytes, PIL images or HWC arrays -> normalised pixels [n, S, S, 3] for the model.

  Loading happens on the host through `loader` (default: `ImageLoader()`, no URLs).
  """
  loader = loader or ImageLoader()
  return preprocess_images([loader.load(im) for im in images], config.vision.image_size)


def _image_features(params, pixel_values, config: QwenVLConfig, n_images_in_ids: int) -> Array:
  """Encodes the images once, padded with zero features to a power-of-two count (at least 1)."""
  v = config.vision
  if pixel_values is None:
    if n_images_in_ids:
      raise ValueError(f'input_ids hold {n_images_in_ids} image spans but no pixel_values were given')
    return jnp.zeros((1, v.n_queries, config.text.hidden_size), config.compute_dtype)
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


def check_request(config: QwenVLConfig, prompt_lengths: Sequence[int], n_images: int, g: GenerationConfig,
                  *, buckets: Buckets = Buckets(), output_logits: bool = False, params=None) -> None:
  """Raises `budget.GenerationLimitError` when the longest prompt plus max_new_tokens passes the model's
  window, or when the request's estimated memory passes what is free; host arithmetic only.

  `params`: when given in the scanned layout, its converted copy is counted too.
  """
  longest = int(max(prompt_lengths))
  budget.check_window(config, longest, g.max_new_tokens)
  prompt_slots = buckets.length(longest)
  copy = 0
  if params is not None and not isinstance(params, DecodeParams):
    copy = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  budget.check_memory(budget.estimate(
      config, Buckets.count(len(prompt_lengths)), prompt_slots, prompt_slots + buckets.length(g.max_new_tokens),
      Buckets.count(n_images) if n_images else 0, output_logits=output_logits, params_bytes=copy))


def _prepare(model: QwenVL, params, input_ids, pixel_values, attention_mask, g: GenerationConfig,
             buckets: Buckets, output_logits: bool = False) -> tuple[DecodeParams, _Batch, Array, int]:
  config = model.config
  batch = _make_batch(input_ids, attention_mask, config, g.pad_id, buckets)
  n_images = check_image_spans(batch.ids[:batch.n_rows], config)
  check_request(config, batch.mask.sum(1)[:batch.n_rows], n_images, g, buckets=buckets,
                output_logits=output_logits, params=params)
  params = decode_params(params)
  features = _image_features(params.rest, pixel_values, config, n_images)
  slots = batch.ids.shape[1] + buckets.length(g.max_new_tokens)
  return params, batch, features, slots


def generate(model: QwenVL, params, input_ids, pixel_values=None, *, attention_mask=None,
             generation_config: GenerationConfig | None = None, seed: int | Array = 0,
             output_logits: bool = False, buckets: Buckets = Buckets(), **overrides):
  """Prompt plus new tokens, [b, t + steps] int64 (t: longest prompt, steps: until every row stopped).

  Args:
    model, params: a QwenVL and its parameters, best converted once with `decode_params` (a tree in the
      scanned layout is converted on every call).
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
      _as_key(seed), config=model.config, sampler=_Sampler.of(g), slots=slots, output_logits=output_logits)
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


def _stream(config: QwenVLConfig, params: DecodeParams, batch: _Batch, features: Array, slots: int,
            g: GenerationConfig, key: Array) -> Iterator[np.ndarray]:
  sampler, min_new = _Sampler.of(g), jnp.int32(g.min_new_tokens)
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
