"""The engine's decode step at serving scale: it reads the rows' slots up to a bucket covering the longest,
not every row's whole length; a step in which no row starts or ends sends nothing to the device; the
tokens of a step reach the event loop in one call; the stop-string search costs per token what the
token adds. One engine run (module fixture) over test_serve's small-vocabulary model is recorded."""
import asyncio
import threading

import jax
import numpy as np
import pytest

from qwenvl_jax import GenerationConfig, QwenVL
from qwenvl_jax.decode import decode_params, generate
from serve import slots as slots_module
from serve.batch_engine import BatchEngine
from serve.engine import EngineRequest
from test_chat import random_params
from test_serve import small_vocab_config

MAX_LEN = 512  # slot buckets 64, 128, 256, 512


class Recorded(BatchEngine):
  """Each decode step runs under jax's host-to-device transfer guard ('disallow': any implicit transfer
  fails the step, and so its requests); records the (rows, slots) each step reads, the explicit uploads
  of the steps in which no row changed, and the turns of the loop."""

  def __init__(self, *args, **kw):
    self.shapes, self.steady, self.steady_uploads, self.turns = [], 0, 0, 0
    super().__init__(*args, **kw)
    real = self.slots.step
    self.slots.step = lambda rows, n, slots: (self.shapes.append((n, slots)), real(rows, n, slots))[1]

  def _advance(self):
    steady = self._state is not None  # no row started or ended since the last step
    before = self.uploads + self.choices.uploads
    with jax.transfer_guard_host_to_device('disallow'):
      super()._advance()
    if steady:
      self.steady += 1
      self.steady_uploads += self.uploads + self.choices.uploads - before

  def _pause(self):
    self.turns += 1


@pytest.fixture(scope='module')
def run():
  cfg = small_vocab_config()
  model, params = QwenVL(cfg), decode_params(random_params(cfg, seed=1))
  rng = np.random.default_rng(0)
  base = GenerationConfig(do_sample=False, stop_ids=())
  asks = [(tuple(int(t) for t in rng.integers(0, 500, n)), base.replace(max_new_tokens=new, **kind), seed)
          for n, new, kind, seed in [(40, 12, {}, 0), (50, 90, {}, 0), (60, 20, dict(do_sample=True, top_k=5), 3),
                                     (35, 8, dict(do_sample=True, temperature=0.7, top_p=0.9), 4)]]
  engine = Recorded(model, params, max_batch=4, max_queue=8, max_len=MAX_LEN)
  compiled = slots_module._PLAIN[1]._cache_size()
  calls = []

  async def serve():
    loop = asyncio.get_running_loop()
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    handles = [engine.submit(EngineRequest(p, None, g, seed)) for p, g, seed in asks]
    return [[t async for t in h] for h in handles]
  try:
    answers = asyncio.run(serve())
  finally:
    engine.close()
  alone = [generate(model, params, [p], generation_config=g, seed=seed)[0, len(p):].tolist() for p, g, seed in asks]
  return dict(engine=engine, answers=answers, alone=alone, calls=len(calls),
              compiled=slots_module._PLAIN[1]._cache_size() - compiled)


def test_answers_equal_generate_alone(run):
  assert run['answers'] == run['alone']


def test_step_reads_a_slot_bucket(run):
  """Rows of 40-60 prompt tokens (a 64-slot bucket) read 128 slots of the 512 of a row while the longest
  writes below slot 128, then 256; each (rows, slots) bucket compiles once at most."""
  shapes = run['engine'].shapes
  slots = [s for _, s in shapes]
  assert slots[0] == 128 and max(slots) == 256 and slots == sorted(slots), shapes
  assert {n for n, _ in shapes} <= {1, 2, 4}
  assert run['compiled'] <= len(set(shapes)), (run['compiled'], set(shapes))


def test_steady_step_sends_nothing_to_the_device(run):
  """A step in which no row starts or ends makes no implicit host-to-device transfer (it ran under the
  guard and its answers are right) and no explicit one: the row state and settings stay on the device."""
  engine = run['engine']
  assert engine.steady > 50 and engine.steady_uploads == 0
  changed = len(engine.shapes) - engine.steady  # steps after a row started or ended: one upload each at most
  assert engine.uploads <= changed and engine.choices.uploads <= changed


def test_tokens_reach_the_loop_once_a_turn(run):
  """A turn hands its tokens and ends to the event loop in one call (two in the turns that prefill: the
  first tokens go before the step), not one call per token (here 130 tokens and 4 ends)."""
  tokens = sum(len(a) for a in run['answers'])
  assert run['calls'] <= run['engine'].turns + 2 < tokens, (run['calls'], run['engine'].turns, tokens)


def test_stop_string_search_is_per_token(vocab_file):
  """A token's text work does not grow with the answer: over a 48k-token answer the text that stop-string
  searches, holds and deltas read (the tail) stays a few tokens long (the old search rescanned the whole
  text at every token); the streamed answer is unchanged."""
  from qwenvl_jax.tokenizer import QwenVLTokenizer
  from serve.text import Answer
  tok = QwenVLTokenizer(vocab_file)
  text = 'hello world, ' * 16000
  stops = ('never said', 'nor this')
  answer, longest, sent = Answer(tok, stops), 0, []
  for t in tok.encode(text):
    sent.append(answer.add(t))
    longest = max(longest, len(answer._tail))
  sent.append(answer.finish())
  assert ''.join(sent) == answer.sent == text.strip()
  assert longest < 200, longest  # of an answer of 208,000 characters: each search reads at most this


def test_warming_server_is_not_ready(vocab_file):
  """`serve --warm`: while the engine compiles, /health answers 503 "warming" and a request 503 with
  Retry-After; once done, /health answers 200 "ok". A --warm length that cannot fit a row is refused
  first (the flag's own checks: test_serve_command_errors)."""
  import httpx
  from qwenvl_jax.tokenizer import QwenVLTokenizer
  from serve.app import Service, create_app
  from serve.limits import Limits
  from serve.prompt import Preparer
  from serving import live_server
  gate = threading.Event()

  class Gated(BatchEngine):
    def warm(self, prompt_tokens):  # the compiles, held until the test lets them end
      assert gate.wait(30)
  cfg = small_vocab_config()
  model, params = QwenVL(cfg), decode_params(random_params(cfg))
  tok = QwenVLTokenizer(vocab_file)
  engine = Gated(model, params, max_batch=2, max_len=128)
  with pytest.raises(ValueError, match='--max-len 128'):
    engine.start_warming((40, 200))
  app = create_app(Service('tiny', tok, GenerationConfig(), Preparer(model, params, tok, Limits()), engine))
  try:
    with live_server(app) as url:
      warming = engine.start_warming((40,))
      health = httpx.get(url + '/health')
      assert health.status_code == 503 and health.json()['status'] == 'warming'
      r = httpx.post(url + '/v1/chat/completions', json={'model': 'tiny', 'messages': [{'role': 'user', 'content': 'hi'}]})
      assert r.status_code == 503 and r.headers['retry-after'] and '--warm' in r.json()['error']['message']
      gate.set()
      warming.join(30)
      assert httpx.get(url + '/health').json()['status'] == 'ok'
  finally:
    gate.set()
    engine.close()
