"""Continuous batching: `max_batch` decode rows over one preallocated KV cache (`slots.Slots`), driven by
one background thread.

Each turn of the loop takes waiting requests into free rows (those of one prompt-length bucket
prefilled together in one program, their first tokens chosen at once), drops the rows whose client is
gone, then advances every busy row by one token in one step. A row is freed the moment its request ends
(a stop id, its max_new_tokens, a cancel), and the next waiting request takes it at the next turn while
the others go on decoding. Requests come from the event loop through `submit` (a locked queue); tokens
go back through the requests' `Handle`s, all of a turn's in one call into the event loop.

A decode step sends nothing to the device: the rows' state (`slots.RowState`: tokens, slots, step counts)
stays there and the step programs advance it, and it is sent again, with the sampling settings, only in
a turn where a row starts or ends. Only the chosen tokens come back to the host.

Each row keeps its own sampling settings (temperature, top_p, top_k), seed, stop ids and token budget
(`choice.Choices`: arrays, so no setting a client sends compiles anything): a greedy request gets the
tokens `generate` gives it alone, and a sampled one the same draws for the same seed.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading

import numpy as np

from qwenvl_jax import GenerationConfig, QwenVL
from qwenvl_jax.batching import Buckets
from qwenvl_jax.budget import GenerationLimitError, check_memory, estimate
from serve.choice import Choices
from serve.engine import EngineRequest, Handle, QueueFull, deliver
from serve.slots import Slots

log = logging.getLogger('qwenvl_jax.serve')


@dataclasses.dataclass
class _Row:
  """A request in a row: what its next step needs."""
  request: EngineRequest
  handle: Handle
  prompt_slots: int  # its first new token's slot
  generated: int = 0
  last: int = 0

  @property
  def index(self) -> int:
    """The slot its last token is written at when fed."""
    return self.prompt_slots + self.generated - 1


_TAKEN = 'taken'  # a row being prefilled: counted as active, not yet stepped


def _parts(group: list, most: int) -> list[list]:
  """Requests prefilled together, split into programs of a power of two of prompts that pad at most a
  quarter of them: a prefill is compute-bound (a padding prompt costs as much as a real one) while each
  program reads the weights once. 15 -> 16, 12 -> 16, 9 -> 8 + 1, 5 -> 4 + 1; at most `most` prompts
  (rounded down to a power of two) to a program."""
  most = 1 << (max(most, 1).bit_length() - 1)
  parts = []
  while group:
    n = min(Buckets.count(len(group)), most)
    if 4 * (n - len(group)) > n:
      n //= 2
    parts.append(group[:n])
    group = group[n:]
  return parts


class BatchEngine:
  """The `serve.engine.Engine` of the server (see the module doc).

  max_len: key slots per row; a request's prompt (padded to its length bucket) plus max_new_tokens must
  fit (`check`). The cache is allocated once, here: rows x max_len x layers x 2 x hidden.
  max_prefill_tokens: prompt slots prefilled in one program (prompts of one bucket together). A request
  is checked against memory as one row; a group's prefill activations grow with its total tokens, so the
  groups are capped (a prompt longer than the cap is prefilled alone).
  mesh, rules: for parameters sharded on a mesh (see `slots.Slots`).
  """

  def __init__(self, model: QwenVL, params, *, max_batch: int = 8, max_queue: int = 16, max_len: int = 2048,
               max_prefill_tokens: int = 8192, buckets: Buckets = Buckets(), mesh=None, rules: str | None = None):
    self.max_batch, self.max_queue, self.max_len = max_batch, max_queue, max_len
    self.max_prefill_tokens = max_prefill_tokens
    try:
      check_memory(estimate(model.config, max_batch, 0, max_len, 0))
    except GenerationLimitError as e:
      raise ValueError(f'--max-batch {max_batch} rows of --max-len {max_len} slots: {e}') from None
    self.slots = Slots(model.config, params, max_batch, max_len, buckets, mesh, rules)
    self.choices = Choices(max_batch)
    self._rows: list[_Row | str | None] = [None] * max_batch
    self._waiting: collections.deque[tuple[EngineRequest, Handle]] = collections.deque()
    self._lock = threading.Condition()
    self._closing = False
    self._counts = {'finished': 0, 'cancelled': 0, 'failed': 0}
    self._warming = threading.Event()  # set while `start_warming`'s thread compiles: requests are refused
    self._state = None  # the rows' state on the device; None once a row started or ended
    self._outbox: list[tuple[Handle, object]] = []  # tokens and ends for the handles, sent once a turn
    self.uploads = 0  # transfers of the row state to the device
    self._worker = threading.Thread(target=self._run, name='qwenvl-serve-engine', daemon=True)
    self._worker.start()

  def check(self, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raises GenerationLimitError when a request of this size cannot fit a row."""
    need = self.slots.prompt_slots(prompt_tokens) + max_new_tokens
    if need > self.max_len:
      raise GenerationLimitError(
          f'a prompt of {prompt_tokens} tokens (taking {self.slots.prompt_slots(prompt_tokens)} slots) plus '
          f'max_tokens={max_new_tokens} needs {need} slots, over the server\'s --max-len {self.max_len}; '
          'shorten the prompt or lower max_tokens')

  def submit(self, request: EngineRequest) -> Handle:
    self.check(len(request.tokens), request.config.max_new_tokens)
    handle = Handle(asyncio.get_running_loop())
    with self._lock:
      if self._closing:
        raise QueueFull('the server is shutting down', retry_after=5)
      if self._warming.is_set():
        raise QueueFull('the server is compiling its programs (--warm); retry later', retry_after=30)
      if len(self._waiting) >= self.max_queue:
        raise QueueFull(f'the queue is full ({self.max_queue} requests waiting, {self._active()} running); '
                        'retry later')
      self._waiting.append((request, handle))
      self._lock.notify()
    return handle

  def _active(self) -> int:
    return sum(row is not None for row in self._rows)

  def stats(self) -> dict[str, int]:
    with self._lock:
      return dict(active=self._active(), queued=len(self._waiting), max_batch=self.max_batch,
                  max_queue=self.max_queue, **self._counts)

  def ready(self) -> bool:
    """False while `start_warming`'s compiles run."""
    return not self._warming.is_set()

  def start_warming(self, prompt_tokens: tuple[int, ...]) -> threading.Thread:
    """Warms (`warm`) for each prompt length in a thread of its own; until it is done `ready()` is False
    and requests are refused (QueueFull), while the server answers /health."""
    for n in prompt_tokens:
      self.check(n, 1)  # GenerationLimitError (a ValueError) when its prompt bucket leaves no slot
    with self._lock:
      if self._active() or self._waiting:
        raise RuntimeError('warm the engine before it serves')
      self._warming.set()

    def run():
      try:
        for n in prompt_tokens:
          log.info('warming: compiling the programs of %d-token prompts', n)
          self.warm(n)
      except Exception:  # a failed compile leaves it to the first requests, which report it
        log.exception('warming failed')
      finally:
        self._warming.clear()
      log.info('warm: ready')
    thread = threading.Thread(target=run, name='qwenvl-serve-warm', daemon=True)
    thread.start()
    return thread

  def warm(self, prompt_tokens: int, max_new_tokens: int | None = None) -> None:
    """Compiles, before serving, what requests with prompts of this many tokens (and up to max_new_tokens
    new ones, default: as many as a row holds) run: the prefill of each power of two of prompts up to
    max_batch, the step over each power of two of rows and slot bucket, the token choice of each (else
    the first requests of each size wait for them)."""
    with self._lock:
      if self._active() or self._waiting:
        raise RuntimeError('warm the engine before it serves')
    # Compiled outside the lock (/health reads the stats meanwhile): no request takes a row meanwhile,
    # none being submitted while warming (or before serving).
    self.choices.set(0, GenerationConfig(), 0)  # a row's key is made on the device
    free = self.slots.state(*(np.zeros((self.max_batch,), np.int32) for _ in range(4)))
    for logits in self.slots.warm(prompt_tokens, max_new_tokens):
      self.choices.choose(logits, np.zeros(len(logits), np.int32), np.zeros(len(logits), np.int32))
      if len(logits) <= self.max_batch:
        self.choices.choose_step(logits, free)
    self.choices.clear(0)

  def close(self) -> None:
    with self._lock:
      self._closing = True
      self._lock.notify()
    self._worker.join()

  # Seams for tests: `_token` may replace a chosen token, `_pause` runs after each turn of the loop.
  def _token(self, row: _Row, token: int) -> int:
    return token

  def _pause(self) -> None:
    pass

  def _run(self) -> None:
    while True:
      with self._lock:
        while not self._waiting and not self._active() and not self._closing:
          self._lock.wait()
        if not self._waiting and not self._active():
          return  # closing, and everything submitted has ended
        waiting, self._waiting = self._waiting, collections.deque()
        for request, handle in waiting:  # clients that left while waiting give their places up
          if handle.cancelled.is_set():
            self._counts['cancelled'] += 1
            self._outbox.append((handle, handle.end()))
          else:
            self._waiting.append((request, handle))
        starting = []
        for r in range(self.max_batch):
          if self._rows[r] is None and self._waiting:
            self._rows[r] = _TAKEN
            starting.append((r, *self._waiting.popleft()))
      groups: dict[int, list[tuple[int, EngineRequest, Handle]]] = {}
      for r, request, handle in starting:
        groups.setdefault(self.slots.prompt_slots(len(request.tokens)), []).append((r, request, handle))
      for slots, group in groups.items():
        for part in _parts(group, self.max_prefill_tokens // slots):
          self._start(part)
      self._flush()  # the first tokens go out before the step
      for r, row in enumerate(self._rows):
        if isinstance(row, _Row) and row.handle.cancelled.is_set():
          self._end(r, row.handle, 'cancelled')
      if any(isinstance(row, _Row) for row in self._rows):
        self._advance()
      self._flush()
      self._pause()

  def _flush(self) -> None:
    outbox, self._outbox = self._outbox, []
    deliver(outbox)

  def _start(self, group: list[tuple[int, EngineRequest, Handle]]) -> None:
    """Prefills the group's prompts (one length bucket) together into their rows; each first token."""
    for r, _, handle in group:
      if handle.cancelled.is_set():
        self._end(r, handle, 'cancelled')
    group = [(r, request, handle) for r, request, handle in group if not handle.cancelled.is_set()]
    if not group:
      return
    try:
      for r, request, _ in group:
        self.choices.set(r, request.config, request.seed)
      logits, prompt_slots = self.slots.prefill([r for r, _, _ in group],
                                                [(request.tokens, request.pixels) for _, request, _ in group])
      rows = np.array([r for r, _, _ in group] + [group[0][0]] * (len(logits) - len(group)))  # padding: repeats
      tokens = self.choices.choose(logits, rows, np.zeros(len(rows), np.int32))
    except Exception as e:  # handed to the requests' handlers, which answer with an error
      if len(group) > 1 and not self.slots.broken():  # one bad request fails alone
        for member in group:
          self._start([member])
        return
      log.exception('prefill failed')
      return self._fail([(r, handle) for r, _, handle in group], e)
    for (r, request, handle), token in zip(group, tokens):
      row = _Row(request, handle, prompt_slots)
      with self._lock:
        self._rows[r] = row
      self._state = None
      self._emit(r, row, int(token))

  def _advance(self) -> None:
    busy = [(r, row) for r, row in enumerate(self._rows) if isinstance(row, _Row)]
    try:
      if self._state is None:  # a row started or ended: the state goes to the device again
        token, index, steps, live = (np.zeros((self.max_batch,), np.int32) for _ in range(4))
        for r, row in busy:
          token[r], index[r], steps[r], live[r] = row.last, row.index, row.generated, 1
        self._state = self.slots.state(token, index, steps, live)
        self.uploads += 1
      n, slots = self.slots.bucket(busy[-1][0] + 1, max(row.index for _, row in busy))
      logits = self.slots.step(self._state, n, slots)
      chosen, self._state = self.choices.choose_step(logits, self._state)
      chosen = np.asarray(chosen)
    except Exception as e:
      log.exception('decode step failed')
      self._state = None
      return self._fail([(r, row.handle) for r, row in busy], e)
    for r, row in busy:
      self._emit(r, row, int(chosen[r]))

  def _emit(self, r: int, row: _Row, token: int) -> None:
    scripted = self._token(row, token)
    if scripted != token:  # a test's token: the device holds another
      self._state = None
    token = scripted
    self._outbox.append((row.handle, token))
    row.generated, row.last = row.generated + 1, token
    g = row.request.config
    if token in g.stop_ids or row.generated >= g.max_new_tokens:
      self._end(r, row.handle, 'finished')

  def _fail(self, rows: list[tuple[int, Handle]], error: Exception) -> None:
    for r, handle in rows:
      self._end(r, handle, 'failed', error)
    if self.slots.broken():  # the failure came after the cache was handed to the program: start afresh
      for r, row in enumerate(self._rows):
        if isinstance(row, _Row):
          self._end(r, row.handle, 'failed', error)
      self.slots.reset()

  def _end(self, r: int, handle: Handle, outcome: str, error: Exception | None = None) -> None:
    self.slots.free(r)
    self.choices.clear(r)
    with self._lock:
      self._rows[r] = None
      self._counts[outcome] += 1
    self._state = None
    self._outbox.append((handle, handle.end(error)))
