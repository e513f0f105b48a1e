"""What a generation request may ask for: its length against the model's window, and its memory
against what the machine has free. Both are checked on the host before any work (no compile, no image
loading or encoding), so a request that cannot finish is refused at once, with the numbers.

The window is the config's `max_position_embeddings` (8192 for the released checkpoints): the longest
context the model declares. Its `seq_length` (2048) is not a limit, since dynamic NTK and logn scaling
extend past it, and generation_config's `max_window_size` (6144) only decides how much chat history
is kept. The memory estimate counts the KV cache, the prefill's largest layer (its float32 attention
scores grow with prompt x slots), the logits and, when the parameters are not yet in the decode layout,
their converted copy; the padded sizes are the ones the program allocates.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import jax.numpy as jnp

from qwenvl_jax.config import QwenVLConfig

GiB = 1024 ** 3


class GenerationLimitError(ValueError):
  """A request longer than the model's window or larger than the memory available."""


def window(config: QwenVLConfig) -> int:
  """Prompt plus new tokens may not exceed this."""
  return config.text.max_position_embeddings


def check_window(config: QwenVLConfig, prompt_tokens: int, max_new_tokens: int) -> None:
  """Raises GenerationLimitError when the longest prompt plus max_new_tokens passes the window."""
  limit = window(config)
  if prompt_tokens + max_new_tokens > limit:
    what = (f'max_new_tokens={max_new_tokens} alone' if prompt_tokens <= 1 else
            f'a prompt of {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} '
            f'({prompt_tokens + max_new_tokens})')
    raise GenerationLimitError(
        f'{what} exceeds the model window of {limit} tokens (max_position_embeddings in config.json); '
        f'shorten the prompt or lower max_new_tokens (at most {max(limit - prompt_tokens, 0)} here)')


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes a generation request allocates, by part."""
  kv_cache: int
  prefill: int
  logits: int
  params_copy: int

  @property
  def total(self) -> int:
    return self.kv_cache + self.prefill + self.logits + self.params_copy

  def describe(self) -> str:
    parts = dict(kv_cache='KV cache', prefill='prefill activations', logits='logits',
                 params_copy='parameter conversion')
    return ', '.join(f'{label} {getattr(self, k) / GiB:.2f}' for k, label in parts.items()
                     if getattr(self, k))


def estimate(config: QwenVLConfig, rows: int, prompt_slots: int, slots: int, n_images: int, *,
             output_logits: bool = False, params_bytes: int = 0) -> Estimate:
  """Bytes for `rows` (padded) rows of `prompt_slots` prompt tokens in a cache of `slots` slots.

  Per layer of the prefill (layers run one after another, so one is live): the residual stream, norms,
  q, k, v and the attention output (c bytes each, ~9 d per token), the MLP's two halves and their
  product (3 f), the float32 attention scores and probabilities plus their cast (h * slots * (8 + c) per
  token), the boolean mask (slots per token) and the cache read for it (2 d per slot). `params_bytes`:
  the parameters' size when `generate` must convert them to the decode layout (a second copy).
  """
  t, v = config.text, config.vision
  c = jnp.dtype(config.dtype).itemsize
  d, f, h = t.hidden_size, t.mlp_width, t.num_heads
  kv = t.num_layers * 2 * rows * slots * d * c
  tokens = rows * prompt_slots
  layer = tokens * ((9 * d + 3 * f) * c + h * slots * (8 + c) + slots) + 2 * rows * slots * d * c
  patches = v.grid * v.grid
  vision = n_images * (v.heads * patches * patches * (8 + c) + patches * (9 * v.width + 3 * v.mlp_width) * c)
  new = slots - prompt_slots
  logits = rows * t.vocab_size * 4 * (2 + (new if output_logits else 0))
  return Estimate(kv, max(layer, vision), logits, params_bytes)


def _host_available() -> int | None:
  """MemAvailable of /proc/meminfo, lowered to the cgroup's headroom when the process has a limit."""
  found = None
  try:
    for line in pathlib.Path('/proc/meminfo').read_text().splitlines():
      if line.startswith('MemAvailable:'):
        found = int(line.split()[1]) * 1024
  except OSError:
    pass
  if found is None and hasattr(os, 'sysconf'):
    try:
      found = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError):
      pass
  try:
    limit = pathlib.Path('/sys/fs/cgroup/memory.max').read_text().strip()
    used = int(pathlib.Path('/sys/fs/cgroup/memory.current').read_text())
    if limit != 'max':
      headroom = max(int(limit) - used, 0)
      found = headroom if found is None else min(found, headroom)
  except (OSError, ValueError):
    pass
  return found


def available_bytes() -> tuple[int | None, str]:
  """(free bytes, where): the free memory of the local accelerators when they report it, else the host's
  (CPU devices allocate from host memory). None when neither can be read."""
  devices = jax.local_devices()
  stats = [d.memory_stats() for d in devices]
  if all(s and 'bytes_limit' in s for s in stats):
    free = sum(s['bytes_limit'] - s.get('bytes_in_use', 0) for s in stats)
    return free, f'{len(devices)} {devices[0].platform} device(s)'
  return _host_available(), 'host memory'


def check_memory(need: Estimate) -> None:
  """Raises GenerationLimitError when `need` is more than the memory available now."""
  free, where = available_bytes()
  if free is not None and need.total > free:
    raise GenerationLimitError(
        f'generation would need about {need.total / GiB:.2f} GiB ({need.describe()} GiB), more than '
        f'the {free / GiB:.2f} GiB free in {where}; shorten the prompt, lower max_new_tokens or use '
        'fewer rows')
