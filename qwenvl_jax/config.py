"""Model configuration: frozen dataclasses built from a released Qwen-VL `config.json`."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def as_dtype(name_or_dtype: Any) -> jnp.dtype:
  """Accepts 'bfloat16', jnp.bfloat16 or np.dtype alike."""
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in _DTYPES:
      raise ValueError(f'unknown dtype {name_or_dtype!r}; expected one of {sorted(_DTYPES)}')
    return jnp.dtype(_DTYPES[name_or_dtype])
  return jnp.dtype(name_or_dtype)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 448
  patch_size: int = 14
  width: int = 1664
  layers: int = 48
  heads: int = 16
  mlp_ratio: float = 4.9231
  output_dim: int = 4096
  n_queries: int = 256  # absent from the released config.json; the original defaults it to 256.
  image_start_id: int = 151857
  pos_table_rows: int = 256  # the learned ViT table is 16x16, resized to the patch grid at run time.
  layer_norm_eps: float = 1e-6

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def mlp_width(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def resampler_heads(self) -> int:
    return self.output_dim // 128

  @property
  def image_end_id(self) -> int:
    return self.image_start_id + 1

  @property
  def image_pad_id(self) -> int:
    return self.image_start_id + 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 151936
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  kv_channels: int = 128
  intermediate_size: int = 22016  # w1 and w2 are each half of it, as in the original.
  seq_length: int = 2048
  rotary_emb_base: float = 10000.0
  rotary_pct: float = 1.0
  layer_norm_eps: float = 1e-6
  use_dynamic_ntk: bool = True
  use_logn_attn: bool = True
  max_position_embeddings: int = 8192

  @property
  def head_dim(self) -> int:
    return self.kv_channels

  @property
  def mlp_width(self) -> int:
    return self.intermediate_size // 2

  @property
  def rotary_dim(self) -> int:
    return int(self.kv_channels * self.rotary_pct)


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
  """Architecture plus numerics policy.

  `param_dtype` is what parameters are stored in; `dtype` is what matmuls run in. Norms, softmax, rotary
  tables and the loss always run in float32. `remat` is a `jax.checkpoint` policy name
  ('none', 'full', 'dots', 'dots_no_batch') applied to every scanned block.
  """
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'

  @classmethod
  def from_dict(cls, d: dict[str, Any], **overrides) -> 'QwenVLConfig':
    v = dict(d.get('visual', {}))
    vision = VisionConfig(
        image_size=v.get('image_size', 448), patch_size=v.get('patch_size', 14),
        width=v.get('width', 1664), layers=v.get('layers', 48), heads=v.get('heads', 16),
        mlp_ratio=v.get('mlp_ratio', 4.9231), output_dim=v.get('output_dim', 4096),
        n_queries=v.get('n_queries', 256), image_start_id=v.get('image_start_id', 151857))
    text = TextConfig(
        vocab_size=d['vocab_size'], hidden_size=d['hidden_size'], num_layers=d['num_hidden_layers'],
        num_heads=d['num_attention_heads'], kv_channels=d['kv_channels'],
        intermediate_size=d['intermediate_size'], seq_length=d['seq_length'],
        rotary_emb_base=float(d.get('rotary_emb_base', 10000)), rotary_pct=d.get('rotary_pct', 1.0),
        layer_norm_eps=d.get('layer_norm_epsilon', 1e-6),
        use_dynamic_ntk=d.get('use_dynamic_ntk', True), use_logn_attn=d.get('use_logn_attn', True),
        max_position_embeddings=d.get('max_position_embeddings', 8192))
    if text.hidden_size != vision.output_dim:
      raise ValueError(f'visual.output_dim ({vision.output_dim}) must equal hidden_size ({text.hidden_size})')
    if vision.resampler_heads < 1:
      raise ValueError(f'visual.output_dim ({vision.output_dim}) must be at least 128: the resampler has '
                       'output_dim // 128 attention heads')
    if text.num_heads * text.kv_channels != text.hidden_size:
      raise ValueError('num_attention_heads * kv_channels must equal hidden_size')
    if d.get('tie_word_embeddings', False):
      raise ValueError('tied word embeddings are not part of Qwen-VL; config says tie_word_embeddings=true')
    return cls(text=text, vision=vision, **overrides)

  @classmethod
  def from_json(cls, path: str | os.PathLike, **overrides) -> 'QwenVLConfig':
    """Reads `config.json` (or the directory holding it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, 'config.json')
    with open(path) as f:
      return cls.from_dict(json.load(f), **overrides)

  def to_dict(self) -> dict[str, Any]:
    """The released `config.json` keys, so exported checkpoints load in the original code."""
    t, v = self.text, self.vision
    return {
        'architectures': ['QWenLMHeadModel'],
        'auto_map': {'AutoConfig': 'configuration_qwen.QWenConfig',
                     'AutoModelForCausalLM': 'modeling_qwen.QWenLMHeadModel'},
        'model_type': 'qwen', 'attn_dropout_prob': 0.0, 'emb_dropout_prob': 0.0,
        'bf16': False, 'fp16': False, 'fp32': True,
        'hidden_size': t.hidden_size, 'initializer_range': 0.02, 'intermediate_size': t.intermediate_size,
        'kv_channels': t.kv_channels, 'layer_norm_epsilon': t.layer_norm_eps,
        'max_position_embeddings': t.max_position_embeddings, 'no_bias': True,
        'num_attention_heads': t.num_heads, 'num_hidden_layers': t.num_layers,
        'rotary_emb_base': t.rotary_emb_base, 'rotary_pct': t.rotary_pct, 'scale_attn_weights': True,
        'seq_length': t.seq_length, 'tie_word_embeddings': False, 'tokenizer_type': 'QWenTokenizer',
        'use_cache': True, 'use_dynamic_ntk': t.use_dynamic_ntk, 'use_flash_attn': 'auto',
        'use_logn_attn': t.use_logn_attn, 'vocab_size': t.vocab_size,
        'visual': {'heads': v.heads, 'image_size': v.image_size, 'image_start_id': v.image_start_id,
                   'layers': v.layers, 'mlp_ratio': v.mlp_ratio, 'output_dim': v.output_dim,
                   'patch_size': v.patch_size, 'width': v.width, 'n_queries': v.n_queries},
    }

  def replace(self, **kw) -> 'QwenVLConfig':
    """`cfg.replace(dtype='bfloat16')`, or nested: `cfg.replace(vision={'image_size': 224})`."""
    for key in ('text', 'vision'):
      if isinstance(kw.get(key), dict):
        kw[key] = dataclasses.replace(getattr(self, key), **kw[key])
    return dataclasses.replace(self, **kw)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return as_dtype(self.dtype)

  @property
  def weights_dtype(self) -> jnp.dtype:
    return as_dtype(self.param_dtype)


def qwen_vl_7b(**overrides) -> QwenVLConfig:
  """The released Qwen-VL / Qwen-VL-Chat dimensions (9.6B parameters)."""
  return QwenVLConfig(**overrides)
