"""Model configuration: frozen dataclasses built from a released Qwen-VL `config.json`."""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from typing import Any, Mapping

import jax.numpy as jnp

from qwenvl_jax.jsonfile import ConfigFileError, get, read_object
from qwenvl_jax.kernel_math import WEIGHTS
from qwenvl_jax.lora import LoraConfig

DICT_SOURCE = '<config dict>'  # the file name in errors about a config given as a dict
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def as_dtype(name_or_dtype: Any) -> jnp.dtype:
  """Accepts 'bfloat16', jnp.bfloat16 or np.dtype alike."""
  if isinstance(name_or_dtype, str):
    if name_or_dtype not in _DTYPES:
      raise ValueError(f'unknown dtype {name_or_dtype!r}; expected one of {sorted(_DTYPES)}')
    return jnp.dtype(_DTYPES[name_or_dtype])
  return jnp.dtype(name_or_dtype)


def _size(d: Mapping[str, Any], key: str, default: int | None = None, *, file: str | os.PathLike,
          prefix: str = '', minimum: int = 1) -> int:
  """An integer key of at least `minimum` (required when default is None)."""
  value = get(d, key, int, file, prefix=prefix) if default is None else get(d, key, int, file, default,
                                                                            prefix=prefix)
  if value < minimum:
    raise ConfigFileError(file, f'must be at least {minimum}, found {value}', prefix + key)
  return value


def _positive_float(d: Mapping[str, Any], key: str, file: str | os.PathLike, default: float,
                    prefix: str = '') -> float:
  value = get(d, key, float, file, default, prefix=prefix)
  if value <= 0:
    raise ConfigFileError(file, f'must be positive, found {value}', prefix + key)
  return value


def _check_consistent(t: 'TextConfig', v: 'VisionConfig', file: str | os.PathLike) -> None:
  """The relations between sizes that the model's shapes need, each named by the key to fix."""
  def require(ok: bool, key: str, problem: str) -> None:
    if not ok:
      raise ConfigFileError(file, problem, key)
  require(t.num_heads * t.kv_channels == t.hidden_size, 'kv_channels',
          f'num_attention_heads ({t.num_heads}) * kv_channels ({t.kv_channels}) must equal hidden_size '
          f'({t.hidden_size})')
  require(t.intermediate_size % 2 == 0, 'intermediate_size',
          f'must be even (w1 and w2 are each half of it), found {t.intermediate_size}')
  require(t.rotary_pct <= 1 and t.rotary_dim % 2 == 0 and t.rotary_dim > 2, 'rotary_pct',
          f'kv_channels ({t.kv_channels}) * rotary_pct ({t.rotary_pct}) = {t.kv_channels * t.rotary_pct} '
          'rotary channels: must be an even number above 2, at most kv_channels')
  require(v.image_start_id + 2 < t.vocab_size, 'visual.image_start_id',
          f'{v.image_start_id} leaves no room for </img> and the image pad token below vocab_size '
          f'({t.vocab_size})')
  require(v.output_dim == t.hidden_size, 'visual.output_dim',
          f'visual.output_dim ({v.output_dim}) must equal hidden_size ({t.hidden_size})')
  require(v.resampler_heads >= 1, 'visual.output_dim',
          f'{v.output_dim} must be at least 128: the resampler has output_dim // 128 attention heads')
  require(v.output_dim % v.resampler_heads == 0 and v.output_dim % 4 == 0, 'visual.output_dim',
          f'{v.output_dim} must be a multiple of 4 (the 2D sin-cos table) and of its {v.resampler_heads} '
          'resampler heads (output_dim // 128)')
  require(math.isqrt(v.n_queries) ** 2 == v.n_queries, 'visual.n_queries',
          f'must be a square number (the queries form a square grid), found {v.n_queries}')
  require(v.width % v.heads == 0, 'visual.heads',
          f'visual.heads ({v.heads}) must divide visual.width ({v.width})')
  require(v.image_size % v.patch_size == 0, 'visual.image_size',
          f'visual.image_size ({v.image_size}) must be a multiple of visual.patch_size ({v.patch_size})')
  require(v.mlp_width >= 1, 'visual.mlp_ratio',
          f'visual.width ({v.width}) * visual.mlp_ratio ({v.mlp_ratio}) leaves no MLP units')


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


QUANTIZABLE = ('decoder', 'lm_head')  # the params roots whose kernels `weights` can quantize


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
  """Architecture plus numerics policy.

  `param_dtype` is what parameters are stored in; `dtype` is what matmuls run in (names such as 'bfloat16'
  are accepted and held as the dtype itself). Norms, softmax, rotary tables and the loss always run in
  float32. `remat` is a `jax.checkpoint` policy name
  ('none', 'full', 'dots', 'dots_no_batch') applied to every decoder and ViT block.

  The parameter tree's form: `scan_layers` stacks the decoder's layers under one scanned module (what
  checkpoints store), else one module per layer (what decoding reads); `weight_major` stores the decoder's
  and lm_head's kernels output dims first (the CPU decode layout, see `layers.Einsum`).
  `param_layout.convert` moves a tree between the forms. `weights` 'int8' / 'int4': the kernels under
  `quantized_roots` (the decoder's and lm_head's unless told) are weight-only quantized (`quant.quantize`;
  int4 in groups of `group_size` inputs, -1: one group per kernel, as GPTQ writes it). The released Int4
  checkpoint keeps its lm_head float: `quantized_roots=('decoder',)`. `lora`: LoRA factors on the decoder
  weights it names, applied where each weight is used (`qwenvl_jax.lora`; the train step sets it).
  """
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = 'none'
  scan_layers: bool = True
  weight_major: bool = False
  weights: str = 'float'
  group_size: int = 128
  quantized_roots: tuple[str, ...] = QUANTIZABLE
  lora: LoraConfig | None = None

  def __post_init__(self):
    object.__setattr__(self, 'dtype', as_dtype(self.dtype))  # one name and one type for each
    object.__setattr__(self, 'param_dtype', as_dtype(self.param_dtype))
    if self.weights not in WEIGHTS:
      raise ValueError(f'unknown weights {self.weights!r}; expected one of {", ".join(WEIGHTS)}')
    if self.group_size < 1 and self.group_size != -1:
      raise ValueError(f'group_size must be positive or -1 (one group per kernel), got {self.group_size}')
    unknown = [r for r in self.quantized_roots if r not in QUANTIZABLE]
    if unknown or not isinstance(self.quantized_roots, tuple):
      raise ValueError(f'quantized_roots must be a tuple of {QUANTIZABLE}, got {self.quantized_roots!r}')

  def weights_of(self, root: str) -> str:
    """The weights of the kernels under params root `root` ('decoder', 'lm_head'): `weights` for the
    quantized roots, 'float' elsewhere."""
    return self.weights if root in self.quantized_roots else 'float'

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], file: str | os.PathLike = DICT_SOURCE,
                **overrides) -> 'QwenVLConfig':
    """From the keys of a released `config.json`; every problem is a ConfigFileError naming `file` (a
    placeholder for dicts that come from no file) and the key."""
    if not isinstance(d, Mapping):
      raise ConfigFileError(file, 'expected a JSON object ({...}) at the top level, found '
                                  f'{type(d).__name__}')
    v = get(d, 'visual', dict, file, {})
    vis = functools.partial(_size, v, file=file, prefix='visual.')
    vision = VisionConfig(
        image_size=vis('image_size', 448), patch_size=vis('patch_size', 14), width=vis('width', 1664),
        layers=vis('layers', 48), heads=vis('heads', 16),
        mlp_ratio=_positive_float(v, 'mlp_ratio', file, 4.9231, prefix='visual.'),
        output_dim=vis('output_dim', 4096), n_queries=vis('n_queries', 256),
        image_start_id=vis('image_start_id', 151857, minimum=0))
    size = functools.partial(_size, d, file=file)
    text = TextConfig(
        vocab_size=size('vocab_size'), hidden_size=size('hidden_size'), num_layers=size('num_hidden_layers'),
        num_heads=size('num_attention_heads'), kv_channels=size('kv_channels'),
        intermediate_size=size('intermediate_size'), seq_length=size('seq_length', minimum=2),
        rotary_emb_base=_positive_float(d, 'rotary_emb_base', file, 10000.0),
        rotary_pct=_positive_float(d, 'rotary_pct', file, 1.0),
        layer_norm_eps=_positive_float(d, 'layer_norm_epsilon', file, 1e-6),
        use_dynamic_ntk=get(d, 'use_dynamic_ntk', bool, file, True),
        use_logn_attn=get(d, 'use_logn_attn', bool, file, True),
        max_position_embeddings=size('max_position_embeddings', 8192))
    if get(d, 'tie_word_embeddings', bool, file, False):
      raise ConfigFileError(file, 'tied word embeddings are not part of Qwen-VL; must be false',
                            'tie_word_embeddings')
    _check_consistent(text, vision, file)
    return cls(text=text, vision=vision, **overrides)

  @classmethod
  def from_json(cls, path: str | os.PathLike, **overrides) -> 'QwenVLConfig':
    """Reads `config.json` (or the directory holding it)."""
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / 'config.json'
    return cls.from_dict(read_object(path), path, **overrides)

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


def qwen_vl_7b(**overrides) -> QwenVLConfig:
  """The released Qwen-VL / Qwen-VL-Chat dimensions (9.6B parameters)."""
  return QwenVLConfig(**overrides)
