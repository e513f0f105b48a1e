"""ChatML prompts and answer extraction for Qwen-VL-Chat, as `qwen_generation_utils` does them."""
from __future__ import annotations

import codecs
from typing import Sequence

from qwenvl_jax.tokenizer import IMAGE_ST, IM_END, IM_START, QwenVLTokenizer

History = Sequence[tuple[str, str | None]]
CHAT_FORMATS = ('chatml', 'raw')


def _check_format(chat_format: str) -> None:
  if chat_format not in CHAT_FORMATS:
    raise ValueError(f'unknown chat_format {chat_format!r}; expected one of {CHAT_FORMATS}')


def _turn(tokenizer: QwenVLTokenizer, role: str, content: str) -> tuple[str, list[int]]:
  """One `<|im_start|>role\\ncontent<|im_end|>` block.

  Content may only produce image/box special tokens: a user typing `<|im_end|>` gets plain text,
  so it cannot forge turns.
  """
  ids = ([tokenizer.im_start_id] + tokenizer.encode(role, allowed_special=set())
         + tokenizer.encode('\n') + tokenizer.encode(content, allowed_special=set(IMAGE_ST))
         + [tokenizer.im_end_id])
  return f'{IM_START}{role}\n{content}{IM_END}', ids


DEFAULT_SYSTEM = 'You are a helpful assistant.'  # the original chat()'s system message


def make_context(tokenizer: QwenVLTokenizer, query: str, history: History | None = None,
                 system: str = '', max_window_size: int = 6144,
                 chat_format: str = 'chatml') -> tuple[str, list[int]]:
  """(raw_text, context_tokens) for the next answer.

  Past turns are kept newest first while system + kept turns stay under max_window_size tokens;
  the current query is always added, as in the original.
  """
  _check_format(chat_format)
  if chat_format == 'raw':
    return query, tokenizer.encode(query)
  nl = tokenizer.encode('\n')
  system_text, system_ids = _turn(tokenizer, 'system', system)
  past_text, past_ids = '', []
  for past_query, response in reversed(history or ()):
    text, ids = _turn(tokenizer, 'user', past_query)
    text, ids = f'\n{text}\n', nl + ids + nl
    if response is not None:
      response_text, response_ids = _turn(tokenizer, 'assistant', response)
      text, ids = text + response_text, ids + response_ids
    if len(system_ids) + len(ids) + len(past_ids) >= max_window_size:
      break
    past_text, past_ids = text + past_text, ids + past_ids
  query_text, query_ids = _turn(tokenizer, 'user', query)
  raw_text = f'{system_text}{past_text}\n{query_text}\n{IM_START}assistant\n'
  context = (system_ids + past_ids + nl + query_ids + nl + [tokenizer.im_start_id]
             + tokenizer.encode('assistant') + nl)
  return raw_text, context


def response_ids(tokens: Sequence[int], tokenizer: QwenVLTokenizer, context_length: int,
                 chat_format: str = 'chatml') -> list[int]:
  """The answer's ids in `tokens[context_length:]`, cut before the first end-of-turn token."""
  _check_format(chat_format)
  stops = {tokenizer.eod_id}
  if chat_format == 'chatml':
    stops |= {tokenizer.im_start_id, tokenizer.im_end_id}
  generated = [int(t) for t in tokens[context_length:]]
  end = next((i for i, t in enumerate(generated) if t in stops), len(generated))
  return generated[:end]


def decode_response(tokens: Sequence[int], tokenizer: QwenVLTokenizer, context_length: int,
                    chat_format: str = 'chatml', errors: str = 'replace') -> str:
  """The answer in `tokens[context_length:]`, cut at the first end-of-turn token and stripped.

  Generated text need not be well formed: a malformed image span decodes as its ordinary tokens, and
  bytes that are not UTF-8 become U+FFFD (with errors='replace').
  """
  ids = response_ids(tokens, tokenizer, context_length, chat_format)
  return tokenizer.decode_bytes(ids, strict_images=False).decode('utf-8', errors).strip()


def partial_response(tokens: Sequence[int], tokenizer: QwenVLTokenizer, context_length: int,
                     chat_format: str = 'chatml') -> str:
  """The part of an answer still being generated that no later token can change: always a prefix of
  `decode_response` of any continuation of `tokens`.

  Held back until they are complete: an `<img>` span not yet closed, and bytes that may still be
  the start of a UTF-8 character. Bytes that can never become one show as U+FFFD at once, as in the
  final text.
  """
  ids = response_ids(tokens, tokenizer, context_length, chat_format)
  start = len(ids) - 1 - ids[::-1].index(tokenizer.img_start_id) if tokenizer.img_start_id in ids else -1
  if start >= 0 and tokenizer.img_end_id not in ids[start:]:
    ids = ids[:start]
  data = tokenizer.decode_bytes(ids, strict_images=False)
  return codecs.getincrementaldecoder('utf-8')('replace').decode(data).strip()
