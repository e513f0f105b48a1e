"""A request's sampling fields on top of the checkpoint's generation_config.json, as the original does.

`temperature` 0 is greedy; `max_tokens` (or `max_completion_tokens`) is max_new_tokens; `top_k` is an
extension. A bad value is a 400 naming the field as the request spelled it.
"""
from __future__ import annotations

import random
from typing import Any

from qwenvl_jax import GenerationConfig, QwenVLTokenizer
from qwenvl_jax.chat_session import chat_config
from qwenvl_jax.generation_config import SettingError
from serve.errors import bad_request

# request field -> GenerationConfig field
_FIELDS = {'temperature': 'temperature', 'top_p': 'top_p', 'top_k': 'top_k', 'max_tokens': 'max_new_tokens',
           'max_completion_tokens': 'max_new_tokens'}


def settings(base: GenerationConfig, tokenizer: QwenVLTokenizer,
             sampling: tuple[tuple[str, Any], ...]) -> tuple[GenerationConfig, int]:
  """(the chat config for this request, its seed); an unset seed is drawn at random."""
  fields = dict(sampling)
  seed = fields.pop('seed', None)
  if seed is None:
    seed = random.randrange(2**31)
  elif isinstance(seed, bool) or not isinstance(seed, int):
    raise bad_request(f'seed must be an integer, got {seed!r}', 'seed')
  config = base
  for name, value in fields.items():
    try:
      config = config.replace(**{_FIELDS[name]: value})
    except SettingError as e:
      raise bad_request(f'{name} {e.problem}', name) from None
  if 'temperature' in fields and config.temperature > 0 and not config.do_sample:
    config = config.replace(do_sample=True)  # a temperature asks for sampling even if the file says greedy
  # seeds outside the key's range are folded into it, so any integer a client sends is accepted
  return chat_config(tokenizer, config), seed % 2**32
