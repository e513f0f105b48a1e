"""Throughput accounting: model FLOPs of a step, the peak to compare with (MFU), and the metrics file.

Model FLOPs follow the usual convention (PaLM appendix B): 2 per multiply-add of every matmul in the
forward pass, including attention scores; a component whose weights train costs 3x its forward (forward,
input gradients, weight gradients), one that is frozen but lies on the gradient path 2x, one that is
frozen and off the path 1x. Element-wise work, norms and softmax are not counted.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from qwenvl_jax.config import QwenVLConfig

# Per stage (and LoRA): multiplier of (ViT blocks and patch embedding, resampler/adapter, LLM, lm_head).
_MULTIPLIERS = {1: (3, 3, 2, 2), 2: (3, 3, 3, 3), 3: (1, 3, 3, 3), 'lora': (1, 1, 2, 2)}


def step_flops(config: QwenVLConfig, batch_shapes: Mapping[str, tuple[int, ...]], stage: int,
               lora: bool = False) -> float:
  """Model FLOPs of one step on a global batch with these shapes (padding included)."""
  t, v = config.text, config.vision
  b, seq = batch_shapes['input_ids']
  n_targets = batch_shapes['targets'][1]
  images = b * batch_shapes['pixel_values'][1]
  patches = (v.image_size // v.patch_size) ** 2
  d, w = t.hidden_size, v.width
  vit = images * patches * (
      2 * v.patch_size ** 2 * 3 * w  # patch embedding
      + v.layers * (2 * (4 * w * w + 2 * w * v.mlp_width) + 4 * patches * w))
  adapter = images * (2 * patches * (w * d + 2 * d * d) + 2 * v.n_queries * (2 * d * d + 2 * patches * d))
  llm = b * seq * t.num_layers * (2 * (4 * d * d + 3 * d * t.mlp_width) + 4 * seq * d)
  head = b * n_targets * 2 * d * t.vocab_size
  mult = _MULTIPLIERS['lora' if lora else stage]
  return float(sum(m * f for m, f in zip(mult, (vit, adapter, llm, head))))


@functools.lru_cache  # once per process: every stage of a run shares the machine
def measure_peak_flops(dtype: Any, size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of one device on a square matmul in `dtype`, best of `repeats`: the MFU reference where the
  hardware peak is not configured (on CPU there is no published one)."""
  x = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


class MetricsLog:
  """Appends one JSON object per logged step to `path` (JSON lines)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, 'a', encoding='utf-8')

  def write(self, record: Mapping[str, Any]) -> None:
    self._file.write(json.dumps(dict(record)) + '\n')
    self._file.flush()

  def close(self) -> None:
    self._file.close()
