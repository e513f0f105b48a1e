"""OpenAI chat-completion requests, checked field by field, and the responses and stream chunks.

A request is refused (400, OpenAI's error JSON) naming the field and the problem: unknown fields, wrong
types, unknown roles, unsupported options (`n` > 1, tools, JSON output). Fields that change nothing here
are let through, as clients send them by default: `user` (any string: an end-user id for the client's own
records), zero penalties, `logprobs: false`, `response_format` of type "text".
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from serve.errors import bad_request

ROLES = ('system', 'user', 'assistant')
# fields whose default is the only value served; a client may send that value
_INERT = {'n': 1, 'logprobs': False, 'frequency_penalty': 0, 'presence_penalty': 0,
          'parallel_tool_calls': None, 'top_logprobs': None}
_SAMPLING = ('temperature', 'top_p', 'top_k', 'max_tokens', 'max_completion_tokens', 'seed')
_FIELDS = {'model', 'messages', 'stream', 'stream_options', 'stop', 'user', 'response_format', *_SAMPLING, *_INERT}


@dataclasses.dataclass(frozen=True)
class Message:
  role: str
  parts: tuple[dict[str, Any], ...]  # {'type': 'text', 'text'} or {'type': 'image_url', 'url'}


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  model: str
  messages: tuple[Message, ...]
  stream: bool = False
  include_usage: bool = False  # stream_options.include_usage: a last chunk with usage and no choices
  stop: tuple[str, ...] = ()
  sampling: tuple[tuple[str, Any], ...] = ()  # the sampling fields the request set, as sent


def parse_json(body: bytes) -> dict[str, Any]:
  try:
    data = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise bad_request(f'the request body is not valid JSON: {e}', code='invalid_json') from None
  if not isinstance(data, dict):
    raise bad_request(f'the request body must be a JSON object, got {type(data).__name__}')
  return data


def _type_name(value: Any) -> str:
  return {dict: 'an object', list: 'an array', str: 'a string', bool: 'a boolean',
          type(None): 'null'}.get(type(value), 'a number')


def _expect(value: Any, kind: type | tuple[type, ...], param: str, what: str) -> Any:
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # bool is an int
    raise bad_request(f'{param} must be {what}, got {_type_name(value)}', param)
  return value


def _parts(content: Any, param: str) -> tuple[dict[str, Any], ...]:
  if isinstance(content, str):
    return ({'type': 'text', 'text': content},)
  _expect(content, list, param, 'a string or an array of content parts')
  parts = []
  for i, part in enumerate(content):
    where = f'{param}[{i}]'
    _expect(part, dict, where, 'an object')
    kind = part.get('type')
    if kind == 'text':
      parts.append({'type': 'text', 'text': _expect(part.get('text'), str, f'{where}.text', 'a string')})
    elif kind == 'image_url':
      image = part.get('image_url')
      url = image.get('url') if isinstance(image, dict) else image  # the object, or a bare string
      parts.append({'type': 'image_url', 'url': _expect(url, str, f'{where}.image_url.url', 'a string')})
    else:
      raise bad_request(f'{where}.type {kind!r} is not supported: use "text" or "image_url"', f'{where}.type')
  return tuple(parts)


def _messages(value: Any) -> tuple[Message, ...]:
  _expect(value, list, 'messages', 'an array')
  if not value:
    raise bad_request('messages is empty: send at least one user message', 'messages')
  messages = []
  for i, m in enumerate(value):
    _expect(m, dict, f'messages[{i}]', 'an object')
    role = m.get('role')
    if role not in ROLES:
      raise bad_request(f'messages[{i}].role {role!r} is not supported: use one of {", ".join(ROLES)}',
                        f'messages[{i}].role')
    content = m.get('content')
    if role == 'assistant' and content is None:
      content = ''
    parts = _parts(content, f'messages[{i}].content')
    if role != 'user' and any(p['type'] != 'text' for p in parts):
      raise bad_request(f'messages[{i}]: only user messages may hold images', f'messages[{i}].content')
    messages.append(Message(role, parts))
  if messages[-1].role != 'user':
    raise bad_request(f'the last message must be from the user, got {messages[-1].role!r}', 'messages')
  return tuple(messages)


def _stop(value: Any) -> tuple[str, ...]:
  if value is None:
    return ()
  stops = [value] if isinstance(value, str) else _expect(value, list, 'stop', 'a string or an array of strings')
  if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
    raise bad_request(f'stop must be up to 4 non-empty strings, got {value!r}', 'stop')
  return tuple(stops)


def parse_request(data: dict[str, Any]) -> ChatRequest:
  unknown = sorted(set(data) - _FIELDS)
  if unknown:
    raise bad_request(f'unrecognized request argument supplied: {", ".join(unknown)}', unknown[0])
  for key, only in _INERT.items():
    if data.get(key) not in (None, only):
      raise bad_request(f'{key}={data[key]!r} is not supported (only {only!r})', key)
  if data.get('model') is None:
    raise bad_request('model is required: GET /v1/models lists the model this server serves', 'model')
  model = _expect(data['model'], str, 'model', 'a string')
  _expect(data.get('user', ''), str, 'user', 'a string')
  response_format = _expect(data.get('response_format') or {}, dict, 'response_format', 'an object')
  if response_format.get('type', 'text') != 'text':
    raise bad_request(f'response_format type {response_format["type"]!r} is not supported (only "text")',
                      'response_format')
  stream = _expect(data.get('stream', False), bool, 'stream', 'a boolean')
  options = _expect(data.get('stream_options') or {}, dict, 'stream_options', 'an object')
  sampling = tuple((k, data[k]) for k in _SAMPLING if data.get(k) is not None)
  return ChatRequest(model, _messages(data.get('messages')), stream, bool(options.get('include_usage')),
                     _stop(data.get('stop')), sampling)


def completion_id() -> str:
  return f'chatcmpl-{uuid.uuid4().hex}'


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
  return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
          'total_tokens': prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, use: dict[str, int],
               boxes: list | None) -> dict[str, Any]:
  """The non-streamed answer; `message.boxes` (an extension) holds the parsed grounding boxes."""
  message: dict[str, Any] = {'role': 'assistant', 'content': text}
  if boxes:
    message['boxes'] = boxes
  return {'id': cid, 'object': 'chat.completion', 'created': int(time.time()), 'model': model,
          'choices': [{'index': 0, 'message': message, 'finish_reason': finish_reason, 'logprobs': None}],
          'usage': use}


def chunk(cid: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
          use: dict[str, int] | None = None) -> str:
  """One server-sent event of a streamed answer; delta None gives the usage-only last chunk."""
  body: dict[str, Any] = {'id': cid, 'object': 'chat.completion.chunk', 'created': int(time.time()),
                          'model': model, 'choices': []}
  if delta is not None:
    body['choices'] = [{'index': 0, 'delta': delta, 'finish_reason': finish_reason, 'logprobs': None}]
  if use is not None:
    body['usage'] = use
  return f'data: {json.dumps(body, ensure_ascii=False)}\n\n'


DONE = 'data: [DONE]\n\n'
