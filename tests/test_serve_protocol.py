"""The request parser alone: what clients send by default is accepted, the rest refused by name."""
from __future__ import annotations

import pytest

from serve.errors import ApiError
from serve.protocol import parse_request

BASE = {'model': 'chat', 'messages': [{'role': 'user', 'content': 'hi'}]}


@pytest.mark.parametrize('extra', [
    {'user': 'user-1234'}, {'response_format': {'type': 'text'}}, {'n': 1}, {'presence_penalty': 0},
    {'frequency_penalty': 0.0}, {'logprobs': False}, {'stream': True, 'stream_options': {'include_usage': True}}])
def test_fields_clients_send_by_default_are_accepted(extra):
  request = parse_request({**BASE, **extra})
  assert request.model == 'chat' and request.messages[0].parts == ({'type': 'text', 'text': 'hi'},)


@pytest.mark.parametrize('extra, param, words', [
    ({'model': None}, 'model', 'model is required'),
    ({'user': 7}, 'user', 'user must be a string'),
    ({'response_format': {'type': 'json_object'}}, 'response_format', "'json_object' is not supported"),
    ({'frequency_penalty': 0.5}, 'frequency_penalty', 'not supported'),
    ({'n': 2}, 'n', 'not supported'),
    ({'tools': []}, 'tools', 'unrecognized request argument'),
])
def test_unsupported_fields_are_refused_by_name(extra, param, words):
  with pytest.raises(ApiError) as e:
    parse_request({**BASE, **extra})
  assert e.value.status == 400 and e.value.param == param and words in e.value.message, vars(e.value)
