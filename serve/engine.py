"""The engine interface the server talks to, and the continuous-batching engine behind it.

The server prepares each request (ChatML tokens, preprocessed pixels, a checked GenerationConfig) and
hands it to an `Engine`; `submit` returns a `Handle` whose async iteration yields the new token ids as
they are chosen and which `cancel` stops (a client gone). Text, stop strings and usage are the server's
business, so an engine deals in token ids only.

`BatchEngine` (serve/batch_engine.py) decodes up to `max_batch` requests at once over one preallocated
KV cache, taking new ones into rows as others finish.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import AsyncIterator, Protocol

import numpy as np

from qwenvl_jax import GenerationConfig


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
  the engine stops it (a stop id, max_new_tokens, or `cancel`). The engine's thread calls `put`/`finish`,
  or `deliver` for many handles at once."""

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
    deliver([(self, token)])

  def finish(self, error: BaseException | None = None) -> None:
    deliver([(self, self.end(error))])

  def end(self, error: BaseException | None = None) -> object:
    """The item that ends the iteration (raising `error` if any), for `deliver`."""
    self.error = error
    return self._END

  async def __aiter__(self) -> AsyncIterator[int]:
    while (item := await self._queue.get()) is not self._END:
      yield item
    if self.error is not None:
      raise self.error


def deliver(items: list[tuple[Handle, object]]) -> None:
  """Hands tokens (and `Handle.end` items) to their handles from another thread, with one call into each
  event loop for all of them: an engine sends a whole step's tokens at once, not one call per token."""
  by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Handle, object]]] = {}
  for handle, item in items:
    by_loop.setdefault(handle._loop, []).append((handle, item))
  for loop, batch in by_loop.items():
    try:
      loop.call_soon_threadsafe(_put_all, batch)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
      for handle, _ in batch:
        handle.cancelled.set()


def _put_all(batch: list[tuple[Handle, object]]) -> None:
  for handle, item in batch:
    handle._queue.put_nowait(item)


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
