"""Refusals in OpenAI's error JSON: `{"error": {"message", "type", "param", "code"}}` with a 4xx status."""
from __future__ import annotations

from typing import Any

# status -> OpenAI's error type for it
_TYPES = {400: 'invalid_request_error', 401: 'authentication_error', 404: 'invalid_request_error',
          413: 'invalid_request_error', 429: 'rate_limit_exceeded', 500: 'server_error',
          503: 'server_error'}


class ApiError(Exception):
  """A request the server refuses; the message names the problem (and `param` the field, when one)."""

  def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.headers = headers or {}

  def body(self) -> dict[str, Any]:
    return {'error': {'message': self.message, 'type': _TYPES.get(self.status, 'invalid_request_error'),
                      'param': self.param, 'code': self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
  return ApiError(400, message, param, code)
