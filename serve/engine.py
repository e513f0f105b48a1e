"""The engine interface the server talks to, and the interim engine behind it for now.

The server prepares each request (ChatML tokens, preprocessed pixels, a checked GenerationConfig) and
hands it to an `Engine`; `submit` returns a `Handle` whose async iteration yields the new token ids as
they are chosen and which `cancel` stops (a client gone). Text, stop strings and usage are the server's
business, so an engine deals in token ids only.

`InterimEngine` runs one request at a time through `qwenvl_jax.generate_stream` in a worker thread.
It is a stand-in: the continuous-batching engine (decode slots over one preallocated KV cache, new
requests prefilled into free slots) replaces it, behind the same interface.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from typing import AsyncIterator, Iterator, Protocol

import numpy as np

from qwenvl_jax import GenerationConfig, QwenVL, generate_stream


class QueueFull(Exception):
  """The engine holds as many requests as it accepts; `retry_after` is a suggested wait in seconds."""

  def __init__(self, message: str, retry_after: int = 1):
    super().__init__(message)
    self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class EngineRequest:
  """One prepared request: the context tokens, its images' pixels [n, S, S, 3] (or None), the settings
  (stop ids and vocab limit included) and the sampling seed."""
  tokens: tuple[int, ...]
  pixels: np.ndarray | None
  config: GenerationConfig
  seed: int


class Handle:
  """A submitted request: `async for token in handle` yields its new token ids; the iteration ends when
  the engine stops it (a stop id, max_new_tokens, or `cancel`). The engine's thread calls `put`/`finish`."""

  _END = object()

  def __init__(self, loop: asyncio.AbstractEventLoop):
    self._loop = loop
    self._queue: asyncio.Queue = asyncio.Queue()
    self.cancelled = threading.Event()
    self.error: BaseException | None = None

  def cancel(self) -> None:
    """Asks the engine to stop this request and free its place; safe to call more than once."""
    self.cancelled.set()

  def put(self, token: int) -> None:
    self._send(token)

  def finish(self, error: BaseException | None = None) -> None:
    self.error = error
    self._send(self._END)

  def _send(self, item) -> None:
    try:
      self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
      self.cancelled.set()

  async def __aiter__(self) -> AsyncIterator[int]:
    while (item := await self._queue.get()) is not self._END:
      yield item
    if self.error is not None:
      raise self.error


class Engine(Protocol):
  """What the server needs from an engine."""
  max_batch: int  # requests decoded at once
  max_queue: int  # requests waiting beyond those; more are refused with QueueFull

  def submit(self, request: EngineRequest) -> Handle:
    """Queues `request` (raises QueueFull when full); call from the event loop's thread."""

  def stats(self) -> dict[str, int]:
    """active, queued, finished, cancelled and failed counts, max_batch and max_queue (for /health)."""

  def close(self) -> None:
    """Finishes the requests already submitted, then stops; later submits raise QueueFull."""


class InterimEngine:
  """One request at a time through `generate_stream` in a worker thread (see the module doc).

  Greedy answers equal `qwenvl_jax.chat`'s: the same tokens, config and pixels reach the same decoder.
  A cancelled request stops at its next token, freeing the worker for the next one.
  """

  max_batch = 1

  def __init__(self, model: QwenVL, params, max_queue: int = 16):
    self.model, self.params, self.max_queue = model, params, max_queue
    self._waiting: collections.deque[tuple[EngineRequest, Handle]] = collections.deque()
    self._lock = threading.Condition()
    self._active = 0
    self._closing = False
    self._counts = {'finished': 0, 'cancelled': 0, 'failed': 0}
    self._worker = threading.Thread(target=self._run, name='qwenvl-serve-engine', daemon=True)
    self._worker.start()

  def submit(self, request: EngineRequest) -> Handle:
    handle = Handle(asyncio.get_running_loop())
    with self._lock:
      if self._closing:
        raise QueueFull('the server is shutting down', retry_after=5)
      if len(self._waiting) >= self.max_queue:
        raise QueueFull(f'the queue is full ({self.max_queue} requests waiting, {self._active} running); '
                        'retry later')
      self._waiting.append((request, handle))
      self._lock.notify()
    return handle

  def stats(self) -> dict[str, int]:
    with self._lock:
      return dict(active=self._active, queued=len(self._waiting), max_batch=self.max_batch,
                  max_queue=self.max_queue, **self._counts)

  def close(self) -> None:
    with self._lock:
      self._closing = True
      self._lock.notify()
    self._worker.join()

  def _steps(self, request: EngineRequest) -> Iterator[np.ndarray]:
    """The new tokens of each step, [1]; a seam for tests that need to hold a request mid-way."""
    return generate_stream(self.model, self.params, [list(request.tokens)], request.pixels,
                           generation_config=request.config, seed=request.seed)

  def _run(self) -> None:
    while True:
      with self._lock:
        while not self._waiting and not self._closing:
          self._lock.wait()
        if not self._waiting:
          return
        request, handle = self._waiting.popleft()
        self._active = 1
      outcome = 'cancelled'
      try:
        if not handle.cancelled.is_set():
          outcome = self._generate(request, handle)
        handle.finish()
      except Exception as e:  # handed to the request's handler, which answers with an error
        outcome = 'failed'
        handle.finish(e)
      with self._lock:
        self._active = 0
        self._counts[outcome] += 1

  def _generate(self, request: EngineRequest, handle: Handle) -> str:
    stops = set(request.config.stop_ids)
    for step in self._steps(request):
      if handle.cancelled.is_set():
        return 'cancelled'
      token = int(step[0])
      handle.put(token)
      if token in stops:
        break
    return 'finished'
