"""`GenerationConfig`: decoding settings, validated when built, read from generation_config.json.

Every setting is checked by name when the config is made (by hand, from a file or by `replace`), so a
bad value is refused before any model work: non-finite or negative temperatures, top_p outside (0, 1],
fractional or negative counts, negative ids, a bool where a number belongs.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import pathlib
from typing import Any

from qwenvl_jax import jsonfile
from qwenvl_jax.chat_format import CHAT_FORMATS

ENDOFTEXT_ID = 151643  # `<|endoftext|>` of the Qwen vocabulary: eos and pad of the released checkpoints.
GENERATION_CONFIG = 'generation_config.json'
# Keys of generation_config.json that would change the output but are not implemented, with the value
# that means "off".
_UNSUPPORTED = {'num_beams': 1, 'repetition_penalty': 1.0, 'no_repeat_ngram_size': 0, 'typical_p': 1.0,
                'epsilon_cutoff': 0.0, 'eta_cutoff': 0.0, 'length_penalty': 1.0}
# Settings whose key in generation_config.json is Hugging Face's name, not the field's.
_FILE_KEYS = {'stop_ids': 'eos_token_id', 'pad_id': 'pad_token_id'}


class SettingError(ValueError):
  """A generation setting of the wrong type or out of range; `name` is the GenerationConfig field."""

  def __init__(self, name: str, problem: str):
    self.name, self.problem = name, problem
    super().__init__(f'{name} {problem}')


def _integer(name: str, value: Any, least: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise SettingError(name, f'must be an integer >= {least}, got {value!r}')
  if value < least:
    raise SettingError(name, f'must be >= {least}, got {value}')
  return int(value)


def _real(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise SettingError(name, f'must be a number, got {value!r}')
  if not math.isfinite(value):
    raise SettingError(name, f'must be finite, got {value}')
  return float(value)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """Decoding settings; the defaults are those of the released Qwen-VL-Chat generation_config.json.

  Sampling follows Hugging Face's logits warpers in their order: temperature, then top_k (0: off), then
  top_p (1: off), each keeping at least one token. Temperature 0 (or do_sample=False) is greedy.
  `stop_ids` end a row (the stop token is kept, the rest of the row is `pad_id`); `min_new_tokens`
  suppresses them until that many tokens were generated; stop ids past the model's vocabulary never
  occur. `vocab_limit` (None: off) keeps ids at or above it from being generated whatever the other
  settings: checkpoints pad the embedding past the tokenizer's vocabulary, and those ids cannot be
  decoded (`chat` sets it to the tokenizer's size).
  """
  max_new_tokens: int = 512
  min_new_tokens: int = 0
  do_sample: bool = True
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 0.5
  stop_ids: tuple[int, ...] = (ENDOFTEXT_ID,)
  pad_id: int = ENDOFTEXT_ID
  vocab_limit: int | None = None
  chat_format: str = 'chatml'
  max_window_size: int = 6144

  def __post_init__(self):
    fix = lambda name, value: object.__setattr__(self, name, value)
    fix('max_new_tokens', _integer('max_new_tokens', self.max_new_tokens, 1))
    fix('min_new_tokens', _integer('min_new_tokens', self.min_new_tokens, 0))
    if not isinstance(self.do_sample, bool):
      raise SettingError('do_sample', f'must be true or false, got {self.do_sample!r}')
    fix('temperature', _real('temperature', self.temperature))
    if self.temperature < 0:
      raise SettingError('temperature', f'must be >= 0 (0: greedy), got {self.temperature}')
    fix('top_k', _integer('top_k', self.top_k, 0))
    fix('top_p', _real('top_p', self.top_p))
    if not 0 < self.top_p <= 1:
      raise SettingError('top_p', f'must be in (0, 1] (1 turns it off), got {self.top_p}')
    if isinstance(self.stop_ids, (str, bytes)) or not hasattr(self.stop_ids, '__iter__'):
      raise SettingError('stop_ids', f'must be a list of token ids, got {self.stop_ids!r}')
    fix('stop_ids', tuple(_integer('stop_ids', i, 0) for i in self.stop_ids))
    fix('pad_id', _integer('pad_id', self.pad_id, 0))
    if self.vocab_limit is not None:
      fix('vocab_limit', _integer('vocab_limit', self.vocab_limit, 1))
      beyond = [i for i in self.stop_ids if i >= self.vocab_limit]
      if beyond:
        raise SettingError('stop_ids', f'{beyond} can never be generated: vocab_limit is {self.vocab_limit}')
    if self.chat_format not in CHAT_FORMATS:
      raise SettingError('chat_format', f'must be one of {CHAT_FORMATS}, got {self.chat_format!r}')
    fix('max_window_size', _integer('max_window_size', self.max_window_size, 1))

  @property
  def greedy(self) -> bool:
    return not self.do_sample or self.temperature == 0

  @classmethod
  def from_dict(cls, d: dict[str, Any], file: str | os.PathLike = 'generation config',
                **overrides) -> 'GenerationConfig':
    """From generation_config.json keys (eos_token_id may be an int or a list); errors name `file` and
    the key. `overrides` are applied afterwards, and their errors name the setting."""
    kinds = {'max_new_tokens': int, 'min_new_tokens': int, 'do_sample': bool, 'temperature': float,
             'top_k': int, 'top_p': float, 'stop_ids': (int, list), 'pad_id': (int, type(None)),
             'vocab_limit': (int, type(None)), 'chat_format': str, 'max_window_size': int}
    for key, off in _UNSUPPORTED.items():
      if d.get(key, off) != off:
        raise jsonfile.ConfigFileError(file, f'{d[key]!r} asks for a feature qwenvl_jax does not implement '
                                       f'(only {off!r} is supported)', key)
    kw: dict[str, Any] = {}
    for name, kind in kinds.items():
      key = _FILE_KEYS.get(name, name)
      key = key if key in d else name
      value = jsonfile.get(d, key, kind, file, None)
      if value is not None:
        kw[name] = tuple(value) if isinstance(value, list) else (value,) if name == 'stop_ids' else value
    try:
      config = cls(**kw)
    except SettingError as e:
      key = _FILE_KEYS.get(e.name, e.name)
      raise jsonfile.ConfigFileError(file, e.problem, key if key in d else e.name) from None
    return config.replace(**overrides)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, **overrides) -> 'GenerationConfig':
    """From a checkpoint directory's generation_config.json (or the file); defaults when the directory
    has none. A missing directory or file is an error."""
    path = pathlib.Path(path)
    if path.is_dir():
      file = path / GENERATION_CONFIG
      if not file.exists():
        return cls(**overrides)
    elif not path.exists():
      raise FileNotFoundError(f'generation config not found: {path}')
    else:
      file = path
    return cls.from_dict(jsonfile.read_object(file), file, **overrides)

  def replace(self, **kw) -> 'GenerationConfig':
    unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise TypeError(f'unknown generation settings {sorted(unknown)}; known: '
                      f'{[f.name for f in dataclasses.fields(self)]}')
    return dataclasses.replace(self, **kw)
