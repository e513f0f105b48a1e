"""The HTTP app: OpenAI's `POST /v1/chat/completions` (streamed or not), `GET /v1/models`, `GET /health`,
`GET /metrics` (Prometheus) and the chat page at `/`.

Every refusal is OpenAI's error JSON with a 4xx naming the problem (`errors.ApiError`), and the server
goes on serving. A client that goes away stops its request in the engine: a streamed answer when the
next event cannot be sent, a plain one when the connection closes (watched while it generates).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import pathlib
import time
from typing import Any, AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from qwenvl_jax import GenerationConfig, QwenVLTokenizer, extract_boxes
from serve import protocol
from serve.engine import Engine, EngineRequest, Handle, QueueFull
from serve.errors import ApiError
from serve.limits import Limits
from serve.metrics import CONTENT_TYPE_LATEST, Metrics
from serve.prompt import Preparer
from serve.sampling import settings
from serve.text import Answer

log = logging.getLogger('qwenvl_jax.serve')
PAGE = pathlib.Path(__file__).parent / 'static' / 'index.html'
_WATCH_SECONDS = 0.25  # how often a non-streamed request looks for its client having gone


@dataclasses.dataclass(frozen=True)
class Service:
  """Everything a request needs: the model's name, tokenizer, default settings, preparer and engine."""
  name: str
  tokenizer: QwenVLTokenizer
  generation_config: GenerationConfig
  preparer: Preparer
  engine: Engine
  limits: Limits = Limits()
  api_key: str | None = None


class _Stream(StreamingResponse):
  """Closes its event generator however the response ends, so a vanished client's request is cancelled
  at once rather than when the generator is garbage collected."""

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      await self.body_iterator.aclose()


def _error(e: ApiError) -> JSONResponse:
  return JSONResponse(e.body(), e.status, headers=e.headers)


def create_app(service: Service) -> FastAPI:
  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    yield
    # uvicorn runs this once the connections in flight are done (SIGTERM: no new ones are accepted)
    await anyio.to_thread.run_sync(service.engine.close)
    log.info('engine stopped: %s', service.engine.stats())

  app = FastAPI(title='qwenvl-jax', docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
  app.state.service = service
  metrics = Metrics(service.engine.stats)

  @app.exception_handler(ApiError)
  async def api_error(request: Request, e: ApiError):
    return _error(e)

  @app.exception_handler(HTTPException)
  async def http_error(request: Request, e: HTTPException):  # unknown paths and methods
    return _error(ApiError(e.status_code, f'{request.method} {request.url.path}: {e.detail}'))

  @app.exception_handler(Exception)
  async def internal_error(request: Request, e: Exception):
    log.exception('request failed')
    return _error(ApiError(500, f'internal error: {type(e).__name__}: {e}', code='internal_error'))

  @app.get('/health')
  async def health():
    if not _ready(service.engine):  # 503 until --warm's compiles are done: load balancers wait for it
      return JSONResponse({'status': 'warming', **service.engine.stats()}, 503)
    return {'status': 'ok', **service.engine.stats()}

  @app.get('/metrics')
  async def prometheus():
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

  @app.get('/v1/models')
  async def models(request: Request):
    _authorize(request, service)
    return {'object': 'list', 'data': [{'id': service.name, 'object': 'model', 'created': 0,
                                        'owned_by': 'qwenvl-jax'}]}

  @app.get('/')
  async def page():
    return FileResponse(PAGE, media_type='text/html')

  @app.post('/v1/chat/completions')
  async def chat_completions(request: Request):
    _authorize(request, service)
    req = protocol.parse_request(protocol.parse_json(await _body(request, service.limits.max_request_bytes)))
    if req.model != service.name:
      raise ApiError(404, f'model {req.model!r} does not exist; this server serves {service.name!r}',
                     'model', 'model_not_found')
    config, seed = settings(service.generation_config, service.tokenizer, req.sampling)
    if not _ready(service.engine):
      raise ApiError(503, 'the server is compiling its programs (--warm); retry in a minute', code='warming',
                     headers={'Retry-After': '30'})
    _check_queue(service.engine)  # before decoding images for a request that cannot be queued
    prompt = await anyio.to_thread.run_sync(service.preparer.prepare, req.messages, config)
    try:
      handle = service.engine.submit(EngineRequest(prompt.tokens, prompt.pixels, config, seed))
    except QueueFull as e:
      raise _busy(e) from None
    run = _Run(service, req, config, handle, len(prompt.tokens), metrics)
    if req.stream:
      return _Stream(run.events(), media_type='text/event-stream',
                     headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})
    return JSONResponse(await run.whole(request))

  return app


def _ready(engine: Engine) -> bool:
  """Whether the engine serves requests yet (engines that never warm always do)."""
  return getattr(engine, 'ready', lambda: True)()


def _authorize(request: Request, service: Service) -> None:
  if service.api_key is None:
    return
  scheme, _, key = request.headers.get('authorization', '').partition(' ')
  if scheme.lower() != 'bearer' or not hmac.compare_digest(key.strip().encode(), service.api_key.encode()):
    raise ApiError(401, 'missing or wrong API key: send the header "Authorization: Bearer <key>"',
                   code='invalid_api_key', headers={'WWW-Authenticate': 'Bearer'})


async def _body(request: Request, limit: int) -> bytes:
  """The request body, refused (413) as soon as it passes `limit` bytes."""
  declared = request.headers.get('content-length', '')
  too_big = ApiError(413, f'the request body is over max_request_bytes={limit} bytes', code='request_too_large')
  if declared.isdigit() and int(declared) > limit:
    raise too_big
  body = bytearray()
  async for piece in request.stream():
    body += piece
    if len(body) > limit:
      raise too_big
  return bytes(body)


def _busy(e: QueueFull) -> ApiError:
  return ApiError(429, str(e), code='rate_limit_exceeded', headers={'Retry-After': str(e.retry_after)})


def _check_queue(engine: Engine) -> None:
  if engine.stats()['queued'] >= engine.max_queue:
    raise _busy(QueueFull(f'the queue is full ({engine.max_queue} requests waiting); retry later'))


class _Run:
  """One submitted request turned into an OpenAI answer."""

  def __init__(self, service: Service, req: protocol.ChatRequest, config: GenerationConfig, handle: Handle,
               prompt_tokens: int, metrics: Metrics):
    self.service, self.req, self.handle, self.metrics = service, req, handle, metrics
    self.stop_ids = set(config.stop_ids)
    self.answer = Answer(service.tokenizer, req.stop)
    self.id, self.prompt_tokens = protocol.completion_id(), prompt_tokens
    self.generated, self.last = 0, None
    self.started = time.monotonic()

  async def _deltas(self) -> AsyncIterator[str]:
    """The answer's new text as tokens arrive; ends early (cancelling the rest) at a stop string."""
    async for token in self.handle:
      if not self.generated:
        self.metrics.first_token.observe(time.monotonic() - self.started)
      self.metrics.tokens.inc()
      self.generated, self.last = self.generated + 1, token
      delta = self.answer.add(token)
      if delta:
        yield delta
      if self.answer.stopped:
        self.handle.cancel()
        return
    if rest := self.answer.finish():
      yield rest

  def _finish_reason(self) -> str:
    return 'stop' if self.answer.stopped or self.last in self.stop_ids else 'length'

  def _boxes(self) -> list[dict[str, Any]] | None:
    try:
      return extract_boxes(self.answer.sent) or None
    except ValueError:  # a malformed <box>: the text still holds it
      return None

  def _usage(self) -> dict[str, int]:
    return protocol.usage(self.prompt_tokens, self.generated)

  async def whole(self, request: Request) -> dict[str, Any]:
    watcher = asyncio.create_task(_watch(request, self.handle))
    try:
      async for _ in self._deltas():
        pass
    finally:
      watcher.cancel()
      self.handle.cancel()  # a no-op once the engine finished it
    self._log()
    return protocol.completion(self.id, self.service.name, self.answer.sent, self._finish_reason(),
                               self._usage(), self._boxes())

  async def events(self) -> AsyncIterator[str]:
    name = self.service.name
    try:
      yield protocol.chunk(self.id, name, {'role': 'assistant', 'content': ''})
      async for delta in self._deltas():
        yield protocol.chunk(self.id, name, {'content': delta})
      boxes = self._boxes()
      yield protocol.chunk(self.id, name, {'boxes': boxes} if boxes else {}, self._finish_reason())
      if self.req.include_usage:
        yield protocol.chunk(self.id, name, None, use=self._usage())
      self._log()
    except Exception as e:  # the status is sent already: the error goes in the stream, as OpenAI does
      log.exception('streamed request failed')
      yield f'data: {json.dumps(ApiError(500, f"internal error: {type(e).__name__}: {e}").body())}\n\n'
    finally:
      self.handle.cancel()
    yield protocol.DONE

  def _log(self) -> None:
    self.metrics.latency.observe(time.monotonic() - self.started)
    self.metrics.requests.labels(self._finish_reason()).inc()
    log.info('%s: %d prompt + %d new tokens in %.2f s (%s)', self.id, self.prompt_tokens, self.generated,
             time.monotonic() - self.started, self._finish_reason())


async def _watch(request: Request, handle: Handle) -> None:
  while not await request.is_disconnected():
    await asyncio.sleep(_WATCH_SECONDS)
  handle.cancel()
