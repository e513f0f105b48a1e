"""What server tests need without a model: the app served live on 127.0.0.1 in a thread, and an engine
that answers with scripted texts.

`ScriptedEngine` implements `serve.engine.Engine` (`submit` -> `Handle`, `stats`, `close`) and nothing
more of the server: it streams each reply's tokens in the real vocabulary with a small delay, records the
requests it gets, and can hold a reply mid-way until the test lets it go on, so a test sees an answer
half-streamed for certain rather than by timing.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import time
from typing import Iterator

from processes import free_port
from serve.engine import EngineRequest, Handle, QueueFull

_HOLD_SECONDS = 30  # a held reply gives up after this (a test that failed before letting it go)


@dataclasses.dataclass(frozen=True)
class Reply:
  """An answer: `text`, then the end-of-turn token; after each count of tokens in `holds` the reply waits
  for `ScriptedEngine.go`; with `fails_after`, the engine fails once that many tokens are out."""
  text: str
  holds: tuple[int, ...] = ()
  fails_after: int | None = None


class ScriptedEngine:
  max_batch = 1

  def __init__(self, tokenizer, delay: float = 0.02, max_queue: int = 4):
    self.tokenizer, self.delay, self.max_queue = tokenizer, delay, max_queue
    self.replies: collections.deque[Reply] = collections.deque()  # answered in order, one per request
    self.requests: list[EngineRequest] = []
    self._go = threading.Semaphore(0)
    self._lock = threading.Lock()
    self._threads: list[threading.Thread] = []
    self._counts = dict(active=0, finished=0, cancelled=0, failed=0)
    self._closing = False

  def tokens(self, reply: Reply) -> list[int]:
    return self.tokenizer.encode(reply.text) + [self.tokenizer.im_end_id]

  def go(self) -> None:
    """Lets the reply held at a hold go on."""
    self._go.release()

  def submit(self, request: EngineRequest) -> Handle:
    handle = Handle(asyncio.get_running_loop())
    with self._lock:
      if self._closing or len(self._threads) - self._done() >= self.max_batch + self.max_queue:
        raise QueueFull('the scripted engine is closing or full')
      reply = self.replies.popleft() if self.replies else None
      self.requests.append(request)
      self._counts['active'] += 1
      thread = threading.Thread(target=self._stream, args=(reply, handle), daemon=True)
      self._threads.append(thread)
    thread.start()
    return handle

  def stats(self) -> dict[str, int]:
    with self._lock:
      return dict(queued=0, max_batch=self.max_batch, max_queue=self.max_queue, **self._counts)

  def close(self) -> None:
    with self._lock:
      self._closing = True
    for thread in self._threads:
      self._go.release()  # nothing stays held
      thread.join(_HOLD_SECONDS)

  def _done(self) -> int:
    return sum(self._counts[k] for k in ('finished', 'cancelled', 'failed'))

  def _stream(self, reply: Reply | None, handle: Handle) -> None:
    outcome, error = 'finished', None
    try:
      if reply is None:
        raise RuntimeError('the test scripted no reply for this request')
      for n, token in enumerate(self.tokens(reply), 1):
        if handle.cancelled.is_set():
          outcome = 'cancelled'
          break
        handle.put(token)
        time.sleep(self.delay)
        if n == reply.fails_after:
          raise RuntimeError(f'scripted failure after {n} tokens')
        if n in reply.holds and not self._go.acquire(timeout=_HOLD_SECONDS):
          raise TimeoutError(f'reply {reply.text[:20]!r} held for {_HOLD_SECONDS} s after {n} tokens')
    except Exception as e:  # handed to the server, which answers with an error
      outcome, error = 'failed', e
    handle.finish(error)
    with self._lock:
      self._counts['active'] -= 1
      self._counts[outcome] += 1


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
  """Serves `app` with uvicorn on 127.0.0.1 at a free port in a daemon thread; yields its base URL."""
  import uvicorn
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    assert thread.is_alive(), 'the server did not start'
    time.sleep(0.05)
  try:
    yield f'http://127.0.0.1:{port}'
  finally:
    server.should_exit = True
    thread.join(10)
