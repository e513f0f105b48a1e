"""The OpenAI-compatible server against the real `openai` client: one live server on 127.0.0.1 for the
module, over the tiny real-vocabulary model of test_chat."""
import base64
import dataclasses
import io
import os
import pathlib
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip('openai', reason='the serve tests need the test extra (openai, fastapi, uvicorn)')
uvicorn = pytest.importorskip('uvicorn')

from processes import free_port, xla_flags  # noqa: E402
from qwenvl_jax import GenerationConfig, ImageLoader, QwenVL  # noqa: E402
from qwenvl_jax import chat  # noqa: E402
from qwenvl_jax.chat_format import DEFAULT_SYSTEM, decode_response, make_context  # noqa: E402
from qwenvl_jax.decode import decode_params  # noqa: E402
from qwenvl_jax.tokenizer import QwenVLTokenizer  # noqa: E402
from serve.app import Service, create_app  # noqa: E402
from serve.batch_engine import BatchEngine  # noqa: E402
from serve.limits import Limits  # noqa: E402
from serve.prompt import Preparer  # noqa: E402
from serving import live_server  # noqa: E402
from test_chat import N_QUERIES, random_params, tiny_chat_config  # noqa: E402
from test_cli import ckpt  # noqa: E402,F401 (the fixture: a tiny checkpoint directory)

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY, NAME = 'test-key', 'tiny'
QUEUE = 8  # requests waiting beyond the rows decoding: room for the 8 concurrent ones
ROWS = 4  # decode rows: 8 concurrent requests wait, then take rows as others finish
BASE = GenerationConfig(max_new_tokens=8, do_sample=False)
HELLO = 'Hello, who are you? Say in a few words who made you and what you can do for me.'  # 33+ tokens
LIMITS = Limits(max_request_bytes=2**20, max_image_bytes=2**17, max_images=2, max_image_pixels=10**6)


class Engine(BatchEngine):
  """The engine with two test hooks: `gate` (cleared, the engine waits after each turn of its loop, so
  tests can hold requests mid-way) and `script` (tokens to answer with instead of the model's)."""

  def __init__(self, *args, **kw):
    self.gate = threading.Event()
    self.gate.set()
    self.script = None
    self.most = 0  # the most rows busy at once
    self.prefills = []  # the number of requests of each prefill
    super().__init__(*args, **kw)

  def _start(self, group):
    self.prefills.append(len(group))
    super()._start(group)

  def _token(self, row, token):
    return self.script[row.generated] if self.script else token

  def _pause(self):
    self.most = max(self.most, self.stats()['active'])
    assert self.gate.wait(30)


@pytest.fixture(scope='module')
def server(vocab_file, golden_dir):
  cfg = tiny_chat_config()
  model, params = QwenVL(cfg), decode_params(random_params(cfg))
  tok = QwenVLTokenizer(vocab_file, image_span_length=N_QUERIES)
  engine = Engine(model, params, max_batch=ROWS, max_queue=QUEUE, max_len=256)
  preparer = Preparer(model, params, tok, LIMITS, image_root=golden_dir / 'img', fits=engine.check)
  app = create_app(Service(NAME, tok, BASE, preparer, engine, LIMITS, KEY))
  with live_server(app) as url:
    yield dict(url=url, model=model, params=params, tok=tok, engine=engine)
  engine.close()


@pytest.fixture(scope='module')
def client(server):
  return openai.OpenAI(base_url=server['url'] + '/v1', api_key=KEY, max_retries=0, timeout=60)


def _data_url(path) -> str:
  return 'data:image/jpeg;base64,' + base64.b64encode(path.read_bytes()).decode()


def _ask(client, messages, **kw):
  return client.chat.completions.create(model=NAME, messages=messages, **kw)


def _streamed(client, messages, **kw) -> tuple[str, list]:
  chunks = list(_ask(client, messages, stream=True, **kw))
  return ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices), chunks


def test_answers_equal_chat(server, client, golden_dir):
  """Text, an image as a data URL and as a path, and a history with a system message: greedy answers,
  streamed or not, equal chat()'s for the same conversation. The contexts share one length bucket, so
  each side compiles once."""
  model, params, tok = server['model'], server['params'], server['tok']
  poster = golden_dir / 'img' / 'poster.jpg'
  loader = ImageLoader(allowed_root=golden_dir / 'img')
  cases = [
      ([{'role': 'user', 'content': HELLO}], dict(query=HELLO)),
      ([{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': _data_url(poster)}},
                                     {'type': 'text', 'text': 'What is written here?'}]}],
       dict(query='Picture 1:<img>upload1</img>\nWhat is written here?', images={'upload1': poster.read_bytes()})),
      ([{'role': 'system', 'content': 'Be brief.'},
        {'role': 'user', 'content': 'Describe <img>menu.jpg</img>'},
        {'role': 'assistant', 'content': 'A menu.'},
        {'role': 'user', 'content': 'Translate it.'}],
       dict(query='Translate it.', history=[('Describe <img>menu.jpg</img>', 'A menu.')], system='Be brief.')),
  ]
  for messages, want in cases:
    expected, _ = chat(model, params, tok, want['query'], want.get('history'), want.get('system', DEFAULT_SYSTEM),
                       images=want.get('images'), generation_config=BASE, image_loader=loader)
    answer = _ask(client, messages, temperature=0)
    assert answer.choices[0].message.content == expected and expected
    _, context = make_context(tok, want['query'], want.get('history'), want.get('system', DEFAULT_SYSTEM))
    assert answer.usage.prompt_tokens == len(context) and 0 < answer.usage.completion_tokens <= 8
    text, chunks = _streamed(client, messages, temperature=0, stream_options={'include_usage': True})
    assert text == expected
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens and not chunks[-1].choices
    assert chunks[-2].choices[0].finish_reason == answer.choices[0].finish_reason


def test_stream_is_sse_ending_with_done(server):
  body = {'model': NAME, 'messages': [{'role': 'user', 'content': HELLO}], 'stream': True, 'max_tokens': 3}
  with httpx.stream('POST', server['url'] + '/v1/chat/completions', json=body,
                    headers={'Authorization': f'Bearer {KEY}'}, timeout=60) as r:
    assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream')
    lines = [line for line in r.iter_lines() if line]
  assert all(line.startswith('data: ') for line in lines) and lines[-1] == 'data: [DONE]'


def test_boxes_and_stop_strings(server, client):
  """A grounding answer keeps its text and carries the parsed boxes; a stop string ends the answer."""
  tok, engine = server['tok'], server['engine']
  text = 'The<ref> cat</ref><box>(10,20),(300,400)</box> sleeps. Then it wakes.'
  engine.script = tok.encode(text) + [tok.im_end_id]
  ask = dict(messages=[{'role': 'user', 'content': HELLO}], max_tokens=len(engine.script))
  try:
    answer = _ask(client, **ask)
    message = answer.choices[0].message
    assert message.content == text and answer.choices[0].finish_reason == 'stop'
    assert message.model_extra['boxes'] == [{'box': [10, 20, 300, 400], 'ref': 'cat'}]
    streamed, chunks = _streamed(client, **ask)
    assert streamed == text and chunks[-1].choices[0].delta.model_extra['boxes'][0]['ref'] == 'cat'
    for stream in (False, True):
      stop = ['wakes', 'ps. Th']  # the second spans tokens
      cut = _streamed(client, stop=stop, **ask)[0] if stream else \
          _ask(client, stop=stop, **ask).choices[0].message.content
      assert cut == text[:text.index('ps. Th')]
  finally:
    engine.script = None


def test_concurrent_requests_equal_solo(server, client, golden_dir):
  """8 requests at once (different prompts, with and without images, one sampled with a seed) over 4
  rows: each gets chat()'s answer for it alone; requests wait, then take rows while others decode, those
  that arrive together prefilled together."""
  model, params, tok, engine = server['model'], server['params'], server['tok'], server['engine']
  poster = golden_dir / 'img' / 'poster.jpg'
  part = {'type': 'image_url', 'image_url': {'url': _data_url(poster)}}
  sampled = dict(temperature=0.7, top_p=0.9, seed=5)
  asks, wants = [], []
  for i in range(8):
    if i % 2:
      asks.append([{'role': 'user', 'content': f'{HELLO} ({i})' + ' more' * i}])
      wants.append(dict(query=f'{HELLO} ({i})' + ' more' * i))
    else:
      asks.append([{'role': 'user', 'content': [part, {'type': 'text', 'text': f'Read {i}.'}]}])
      wants.append(dict(query=f'Picture 1:<img>upload1</img>\nRead {i}.', images={'upload1': poster.read_bytes()}))
  solo = []
  for i, want in enumerate(wants):
    g, seed = (BASE.replace(do_sample=True, temperature=0.7, top_p=0.9), 5) if i == 3 else (BASE, 0)
    solo.append(chat(model, params, tok, want['query'], images=want.get('images'), generation_config=g,
                     seed=seed)[0])
  together = [None] * len(asks)

  def ask(i):
    kw = sampled if i == 3 else dict(temperature=0)
    together[i] = _ask(client, asks[i], **kw).choices[0].message.content
  engine.most, engine.prefills = 0, []
  engine.gate.clear()  # held until all 8 are in: the first decodes, the others wait in the queue
  threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
  try:
    for t in threads:
      t.start()
    _wait_for(lambda: engine.stats()['active'] + engine.stats()['queued'] == len(asks), 'the requests did not arrive',
              30)
  finally:
    engine.gate.set()
  for t in threads:
    t.join(120)
  assert together == solo and len(set(solo)) > 1
  assert engine.most == ROWS and engine.stats()['active'] == 0 and max(engine.prefills) > 1, engine.prefills


def test_prefill_groups_pad_little_and_keep_under_the_token_cap():
  """Powers of two of prompts padding at most a quarter; at most max_prefill_tokens // slots prompts a
  program (rounded down to a power of two), and one at least, whatever the cap."""
  from serve.batch_engine import _parts
  sizes = lambda n, most: [len(p) for p in _parts(list(range(n)), most)]
  assert sizes(15, 64) == [15] and sizes(9, 64) == [8, 1] and sizes(5, 64) == [4, 1]
  assert sizes(15, 4) == [4, 4, 4, 3] and sizes(16, 6) == [4, 4, 4, 4] and sizes(3, 0) == [1, 1, 1]


def test_a_bad_request_in_a_group_fails_alone(server, monkeypatch):
  """Three requests prefilled together, one of which fails in its prefill: the group is retried one request
  at a time, so that one alone gets the error and the others their solo answers."""
  import asyncio
  from qwenvl_jax.decode import generate
  from serve.engine import EngineRequest
  model, params, engine = server['model'], server['params'], server['engine']
  g = BASE.replace(stop_ids=())
  prompts = [tuple(range(100 + n, 100 + 2 * n)) for n in (20, 21, 22)]  # one length bucket
  alone = [generate(model, params, [p], generation_config=g)[0, len(p):].tolist() for p in prompts]
  real = engine.slots.prefill

  def prefill(rows, prompts_and_pixels):
    if any(tuple(tokens) == prompts[1] for tokens, _ in prompts_and_pixels):
      raise ValueError('this prompt cannot be prefilled')
    return real(rows, prompts_and_pixels)
  monkeypatch.setattr(engine.slots, 'prefill', prefill)

  async def run():
    engine.gate.clear()  # a first request holds the engine after its turn: the three then wait together
    try:
      first = engine.submit(EngineRequest((7,) * 30, None, g, 0))
      await asyncio.to_thread(_wait_for, lambda: engine.stats()['active'] == 1, 'the first did not start')
      handles = [engine.submit(EngineRequest(p, None, g, 0)) for p in prompts]
      engine.prefills = []
    finally:
      engine.gate.set()
    out = []
    for h in [first, *handles]:
      try:
        out.append([t async for t in h])
      except ValueError as e:
        out.append(str(e))
    return out
  out = asyncio.run(run())
  assert out[1:] == [alone[0], 'this prompt cannot be prefilled', alone[2]], out
  assert engine.prefills[0] > 1 and engine.prefills.count(1) >= 2, engine.prefills  # a group, then alone


def test_sampling_settings():
  """Request fields over the checkpoint's settings: temperature 0 is greedy, unset fields keep the file's,
  bad values are refused naming the field."""
  from serve.errors import ApiError
  from serve.sampling import settings
  base = GenerationConfig(top_p=0.8, top_k=5, do_sample=False)

  class Tok:  # what chat_config reads of a tokenizer
    im_end_id, im_start_id, eod_id, vocab_size = 151645, 151644, 151643, 151851
  g, seed = settings(base, Tok, (('temperature', 0.7), ('max_tokens', 9), ('seed', -1)))
  assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.max_new_tokens) == (True, 0.7, 0.8, 5, 9)
  assert seed == 2**32 - 1 and set(g.stop_ids) == {151643, 151644, 151645}
  assert settings(base, Tok, (('temperature', 0),))[0].greedy
  assert settings(base, Tok, (('top_k', 3), ('max_completion_tokens', 4)))[0].replace(stop_ids=(1,)) == \
      base.replace(top_k=3, max_new_tokens=4, stop_ids=(1,), vocab_limit=151851)
  for field, value in [('top_p', 0), ('max_tokens', 0), ('top_k', 1.5), ('seed', 'x')]:
    with pytest.raises(ApiError) as e:
      settings(base, Tok, ((field, value),))
    assert e.value.status == 400 and e.value.param == field and field in e.value.message


def _wait_for(condition, what: str, seconds: float = 10):
  end = time.monotonic() + seconds
  while not condition():
    assert time.monotonic() < end, what
    time.sleep(0.02)


def _leave_streamed(client):
  stream = _ask(client, [{'role': 'user', 'content': HELLO}], stream=True, max_tokens=30)
  next(iter(stream))  # the role chunk: the request is in the engine
  return stream.close


def _leave_whole(client):
  """A plain request whose client gives up (its read times out) while the engine holds the request."""
  leaving = threading.Thread(target=lambda: pytest.raises(openai.APITimeoutError, _ask, client.with_options(
      timeout=1), [{'role': 'user', 'content': HELLO}], max_tokens=30))
  leaving.start()
  return leaving.join


@pytest.mark.parametrize('leave', [_leave_streamed, _leave_whole])
def test_disconnect_frees_slot(server, client, leave):
  """A client that goes away mid-answer has its request cancelled, freeing the engine for the next."""
  engine = server['engine']
  before = engine.stats()['cancelled']
  engine.gate.clear()
  try:
    gone = leave(client)
    _wait_for(lambda: engine.stats()['active'] == 1, 'the request did not start')
    gone()
    time.sleep(0.5)  # the server sees the connection close while the engine holds the request
  finally:
    engine.gate.set()
  _wait_for(lambda: engine.stats()['cancelled'] == before + 1 and engine.stats()['active'] == 0,
            f'the request was not cancelled: {engine.stats()}')
  health = httpx.get(server['url'] + '/health').json()
  assert health['active'] == 0 and health['cancelled'] == before + 1
  assert _ask(client, [{'role': 'user', 'content': HELLO}], max_tokens=2).choices[0].message.content is not None


def test_metrics(server, client):
  """GET /metrics: Prometheus text with the queue depth, rows in use, tokens and latency histograms."""
  def scrape() -> dict[str, float]:
    text = httpx.get(server['url'] + '/metrics').text
    return {line.split(' ')[0]: float(line.split(' ')[1]) for line in text.splitlines()
            if line and not line.startswith('#')}
  before = scrape()
  answer = _ask(client, [{'role': 'user', 'content': HELLO}], max_tokens=3)
  after = scrape()
  assert after['qwenvl_queue_depth'] == 0 and after['qwenvl_active_rows'] == 0
  assert after['qwenvl_output_tokens_total'] - before['qwenvl_output_tokens_total'] == \
      answer.usage.completion_tokens
  for name in ('qwenvl_time_to_first_token_seconds_count', 'qwenvl_request_latency_seconds_count'):
    assert after[name] == before[name] + 1


def test_answer_at_max_tokens_keeps_last_token(server, client):
  """An answer cut by max_tokens keeps its last token. The original's `_decode_chatml` drops it (with no
  end-of-turn token its loop leaves the end index at the last token, and it decodes up to that index)."""
  tok, engine = server['tok'], server['engine']
  engine.script = tok.encode(' one two three')
  try:
    answer = _ask(client, [{'role': 'user', 'content': HELLO}], max_tokens=len(engine.script))
  finally:
    engine.script = None
  assert answer.choices[0].message.content == 'one two three' and answer.choices[0].finish_reason == 'length'
  context = [tok.im_start_id] + tok.encode('assistant\n')
  tokens = context + tok.encode(' one two three')
  assert decode_response(tokens, tok, len(context)) == 'one two three'
  original_end = len(tokens) - 1  # what the original's loop leaves without an end-of-turn token
  assert tok.decode(tokens[len(context):original_end]).strip() == 'one two'


def test_streamed_text_is_incremental(server, monkeypatch):
  """Each token is decoded once (not the whole answer again at every token), and the deltas are
  byte-exact: characters split across tokens come out whole, an image span once it closes."""
  from qwenvl_jax.chat_format import partial_response
  from serve.text import Answer
  tok = server['tok']
  text = 'Über 🐱 and 猫 <img>a/b.jpg</img> then <ref>x</ref><box>(1,2),(3,4)</box> ✓✓'
  tokens = tok.encode(text)
  pieces = [tok.decode_bytes([t], strict_images=False) for t in tokens]
  assert any(p and not _utf8(p) for p in pieces)  # some character is split across tokens
  partials = [partial_response(tokens[:n], tok, 0) for n in range(1, len(tokens) + 1)]
  decoded = []
  real = tok.decode_bytes
  monkeypatch.setattr(tok, 'decode_bytes', lambda ids, *a, **k: (decoded.append(len(ids)), real(ids, *a, **k))[1])
  answer, shown = Answer(tok), ''
  for t, partial in zip(tokens, partials):
    shown += answer.add(t)
    assert shown == partial
  shown += answer.finish()
  assert sum(decoded) == len(tokens)
  assert shown == decode_response(tokens, tok, 0) == text


def _utf8(data: bytes) -> bool:
  try:
    data.decode('utf-8')
    return True
  except UnicodeDecodeError:
    return False


def _png_claiming(width: int, height: int) -> bytes:
  """A 1x1 PNG whose header claims width x height: a decompression bomb as far as the header goes."""
  out = io.BytesIO()
  Image.new('RGB', (1, 1)).save(out, 'PNG')
  data = bytearray(out.getvalue())
  ihdr = struct.pack('>II', width, height) + bytes(data[24:29])
  data[16:29] = ihdr
  data[29:33] = struct.pack('>I', zlib.crc32(b'IHDR' + ihdr))
  return bytes(data)


def _image_part(data: bytes, kind: str = 'png') -> dict:
  return {'type': 'image_url', 'image_url': {'url': f'data:image/{kind};base64,' + base64.b64encode(data).decode()}}


TINY_PNG = _png_claiming(1, 1)
REFUSALS = {  # name -> (request body changes, status, error code or param, words of the message)
    'malformed JSON': ('{"model": "tiny", "messages": [', 400, 'invalid_json', 'not valid JSON'),
    'unknown role': ({'messages': [{'role': 'wizard', 'content': 'hi'}]}, 400, 'messages[0].role', 'wizard'),
    'unknown field': ({'best_of': 3}, 400, 'best_of', 'unrecognized'),
    'bad temperature': ({'temperature': -1}, 400, 'temperature', '>= 0'),
    'bad base64 image': ({'messages': [{'role': 'user', 'content': [
        {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,@@not base64@@'}}]}]},
        400, 'invalid_image', 'base64'),
    'undecodable image': ({'messages': [{'role': 'user', 'content': [_image_part(b'not an image at all')]}]},
                          400, 'invalid_image', 'cannot decode'),
    'decompression bomb': ({'messages': [{'role': 'user', 'content': [_image_part(_png_claiming(5000, 5000))]}]},
                           400, 'invalid_image', 'max_pixels'),
    'image too large': ({'messages': [{'role': 'user', 'content': [
        {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,' + 'A' * 2**18}}]}]},
        400, 'image_too_large', 'max_image_bytes=131072'),
    'image path longer than its span': (
        {'messages': [{'role': 'user', 'content': '<img>../golden.safetensors</img>'}]}, 400, 'messages',
        'longer than the image span'),
    'image part outside the root': ({'messages': [{'role': 'user', 'content': [
        {'type': 'image_url', 'image_url': {'url': '../x.png'}}]}]}, 400, 'invalid_image', 'outside the allowed root'),
    'not an image data URL': ({'messages': [{'role': 'user', 'content': [
        {'type': 'image_url', 'image_url': {'url': 'data:text/plain;base64,aGk='}}]}]}, 400, 'invalid_image',
        'not an image'),
    'content part of unknown type': ({'messages': [{'role': 'user', 'content': [{'type': 'audio'}]}]}, 400,
                                     'messages[0].content[0].type', 'audio'),
    'last message not from the user': ({'messages': [{'role': 'user', 'content': 'hi'},
                                                     {'role': 'assistant', 'content': 'yes'}]},
                                       400, 'messages', 'last message'),
    'n > 1': ({'n': 2}, 400, 'n', 'not supported'),
    'too many images': ({'messages': [{'role': 'user', 'content': [_image_part(TINY_PNG)] * 3}]},
                        400, 'too_many_images', 'max_images=2'),
    'path outside the root': ({'messages': [{'role': 'user', 'content': '<img>../x.png</img>'}]},
                              400, 'invalid_image', 'outside the allowed root'),
    'url refused': ({'messages': [{'role': 'user', 'content': [
        {'type': 'image_url', 'image_url': {'url': 'http://127.0.0.1:9/a.png'}}]}]}, 400, 'invalid_image',
        'URLs are disabled'),
    'over-long prompt': ({'messages': [{'role': 'user', 'content': 'word ' * 9000}]}, 400,
                         'context_length_exceeded', 'model window'),
    'prompt + max_tokens past a row': ({'max_tokens': 250}, 400, 'context_length_exceeded', '--max-len 256'),
    'request too large': ({'messages': [{'role': 'user', 'content': 'x' * 2**21}]}, 413, 'request_too_large',
                          'max_request_bytes'),
    'unknown model': ({'model': 'gpt-4'}, 404, 'model_not_found', 'gpt-4'),
    'wrong API key': ({'_key': 'wrong'}, 401, 'invalid_api_key', 'Bearer'),
}


@pytest.mark.parametrize('name', list(REFUSALS))
def test_refusals_then_serves(server, client, name):
  """Each refusal is OpenAI's error JSON naming the problem, and the server answers the next request."""
  change, status, code, words = REFUSALS[name]
  headers = {'Authorization': f'Bearer {KEY}'}
  if isinstance(change, str):
    r = httpx.post(server['url'] + '/v1/chat/completions', content=change, headers=headers)
  else:
    change = dict(change)
    headers['Authorization'] = f'Bearer {change.pop("_key", KEY)}'
    body = {'model': NAME, 'messages': [{'role': 'user', 'content': HELLO}], 'max_tokens': 2, **change}
    r = httpx.post(server['url'] + '/v1/chat/completions', json=body, headers=headers, timeout=30)
  error = r.json()['error']
  assert r.status_code == status and code in (error['code'], error['param']) and words in error['message'], error
  assert _ask(client, [{'role': 'user', 'content': HELLO}], max_tokens=2).choices[0].finish_reason


def test_full_queue_gets_429(server, client):
  """One request decoding (held) and QUEUE waiting: the next gets 429 with Retry-After, and once they
  finish the server answers again."""
  engine = server['engine']
  engine.gate.clear()
  results = []
  ask = lambda: results.append(_ask(client, [{'role': 'user', 'content': HELLO}], max_tokens=3))
  threads = [threading.Thread(target=ask) for _ in range(1 + QUEUE)]
  try:
    threads[0].start()
    _wait_for(lambda: engine.stats()['active'] == 1, 'the first request did not start')
    for t in threads[1:]:
      t.start()
    _wait_for(lambda: engine.stats()['queued'] == QUEUE, 'the other requests were not queued')
    with pytest.raises(openai.RateLimitError) as e:
      _ask(client, [{'role': 'user', 'content': HELLO}], max_tokens=3)
    assert int(e.value.response.headers['retry-after']) >= 1 and 'queue is full' in e.value.message
  finally:
    engine.gate.set()
    for t in threads:
      t.join(60)
  assert len(results) == len(threads)
  assert _ask(client, [{'role': 'user', 'content': HELLO}], max_tokens=2).choices[0].message.content is not None


def test_models_health_key_and_page(server, client):
  assert [m.id for m in client.models.list()] == [NAME]
  assert httpx.get(server['url'] + '/health').json()['status'] == 'ok'  # no key needed for probes
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=server['url'] + '/v1', api_key='wrong', max_retries=0).models.list()
  missing = httpx.get(server['url'] + '/v1/nope', headers={'Authorization': f'Bearer {KEY}'})
  assert missing.status_code == 404 and '/v1/nope' in missing.json()['error']['message']
  page = httpx.get(server['url'] + '/')
  assert page.status_code == 200 and '/v1/chat/completions' in page.text
  assert 'http' not in page.text  # works offline: nothing fetched from elsewhere


@pytest.mark.slow
def test_serve_command_drains_on_sigterm(ckpt, vocab_file, tmp_path):
  """`qwenvl-jax serve` on a checkpoint: SIGTERM during a streamed answer lets it finish, then exits."""
  port = free_port()
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  log = open(tmp_path / 'serve.log', 'w')
  command = [sys.executable, '-m', 'qwenvl_jax.cli', 'serve', '--ckpt', str(ckpt), '--vocab', str(vocab_file),
             '--port', str(port), '--model-name', NAME, '--no-compile-cache']
  proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    url = f'http://127.0.0.1:{port}'
    end = time.monotonic() + 120
    while True:
      assert proc.poll() is None and time.monotonic() < end, (tmp_path / 'serve.log').read_text()[-3000:]
      try:
        httpx.get(url + '/health')
        break
      except httpx.TransportError:
        time.sleep(0.2)
    client = openai.OpenAI(base_url=url + '/v1', api_key='none', max_retries=0, timeout=120)
    stream = _ask(client, [{'role': 'user', 'content': HELLO}], stream=True, max_tokens=12, temperature=0)
    chunks = [next(iter(stream))]
    proc.send_signal(signal.SIGTERM)
    chunks += list(stream)  # the answer goes on to its end
    assert chunks[-1].choices[0].finish_reason in ('stop', 'length')
    assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn ends by its signal once drained
    assert 'engine stopped' in (tmp_path / 'serve.log').read_text()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log.close()


def test_serve_command_errors(tmp_path, capsys):
  """Bad flags exit 2 and a missing checkpoint 1, each naming the problem, before any model work."""
  from serve.cli import main
  with pytest.raises(SystemExit) as e:
    main(['--ckpt', str(tmp_path), '--max-queue', '0'])
  assert e.value.code == 2 and '--max-queue' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main(['--ckpt', str(tmp_path), '--image-root', str(tmp_path / 'nope')])
  assert 'not a directory' in capsys.readouterr().err
  for flags, words in ((['--max-len', '8'], '--max-len must be >= 64'), (['--mesh', 'rows=2'], 'unknown axes'),
                       (['--warm', '64', '0'], '--warm prompt lengths must be >= 1')):
    with pytest.raises(SystemExit) as e:
      main(['--ckpt', str(tmp_path)] + flags)
    assert e.value.code == 2 and words in capsys.readouterr().err
  assert main(['--ckpt', str(tmp_path / 'missing')]) == 1
  assert 'checkpoint directory not found' in capsys.readouterr().err


def small_vocab_config():
  """test_chat's tiny model with a 512-token vocabulary: the engine-only tests compile in seconds."""
  cfg = tiny_chat_config()
  return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=512),
                             vision=dataclasses.replace(cfg.vision, image_start_id=500))


@pytest.mark.slow
def test_engine_compiles_once_per_bucket(compiles):
  """The engine alone, warmed for a prompt-length bucket: the prefill compiles once per power of two of
  prompts prefilled together, the step once per power of two of rows and slot bucket (128 and the
  row's 160 here), the token choice once per row count (after a prefill and at a step). Then prompts of
  other lengths in the bucket, token budgets, temperatures, top_k (up to 256: past it, once per power of
  two, test_serve_choice), top_p, stop lists and seeds, arriving alone or together, compile nothing;
  another bucket compiles its prefills only. Each answer equals `generate` alone (greedy, and sampled
  with its seed)."""
  import asyncio
  import numpy as np
  from qwenvl_jax.decode import generate
  from serve.engine import EngineRequest
  cfg = small_vocab_config()
  model, params = QwenVL(cfg), decode_params(random_params(cfg, seed=1))
  engine = BatchEngine(model, params, max_batch=4, max_queue=8, max_len=160)
  rng = np.random.default_rng(0)
  kinds = [dict(do_sample=False), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_k=5),
           dict(temperature=0.5, top_p=0.8, top_k=200)]
  done = []

  async def wave(n, lengths):
    asks = []
    for _ in range(n):
      g = BASE.replace(max_new_tokens=int(rng.integers(2, 10)), stop_ids=tuple(int(t) for t in rng.integers(0, 500, 3)),
                       **kinds[int(rng.integers(0, 4))])
      asks.append((tuple(int(t) for t in rng.integers(0, 500, int(rng.integers(*lengths)))), g, int(rng.integers(2**32))))
    handles = [engine.submit(EngineRequest(p, None, g, seed)) for p, g, seed in asks]
    done.extend(zip(asks, [[t async for t in h] for h in handles]))
  ours = lambda: sorted(c for c in compiles
                        if c in ('jit(_prefill_rows)', 'jit(_step)', 'jit(_choose)', 'jit(_choose_step)'))
  try:
    engine.warm(40)
    assert ours() == (['jit(_choose)'] * 3 + ['jit(_choose_step)'] * 3 + ['jit(_prefill_rows)'] * 3
                      + ['jit(_step)'] * 6), ours()  # rows 1, 2, 4 (x slots 128, 160)
    compiles.clear()
    for n in (1, 3, 2):
      asyncio.run(wave(n, (33, 65)))
    assert compiles == [], compiles
    engine.warm(100)
    assert ours() == ['jit(_prefill_rows)'] * 3, ours()
    compiles.clear()
    asyncio.run(wave(3, (65, 129)))
    assert compiles == [], compiles
  finally:
    engine.close()
  for (prompt, g, seed), answer in done:
    alone = generate(model, params, [prompt], generation_config=g, seed=seed)
    assert answer == alone[0, len(prompt):].tolist()


MESH_CHECK = """
import asyncio
from qwenvl_jax import GenerationConfig, QwenVL, sharding
from qwenvl_jax.decode import decode_params, generate
from serve.batch_engine import BatchEngine
from serve.engine import EngineRequest
from test_chat import random_params
from test_serve import small_vocab_config
cfg = small_vocab_config()
model, params = QwenVL(cfg), decode_params(random_params(cfg))
g = GenerationConfig(max_new_tokens=6, do_sample=False, stop_ids=())
prompts = [tuple(range(100 + n, 100 + 2 * n)) for n in (20, 33, 41)]
alone = [generate(model, params, [p], generation_config=g)[0, len(p):].tolist() for p in prompts]
mesh = sharding.make_mesh('data=2')
rules = sharding.default_rules(dict(mesh.shape))
engine = BatchEngine(model, sharding.shard_params(mesh, params, rules), max_batch=2, max_len=128, mesh=mesh,
                     rules=rules)
assert engine.slots.cache[0].k.sharding.shard_shape(engine.slots.cache[0].k.shape)[0] == 1

async def run():
  handles = [engine.submit(EngineRequest(p, None, g, 0)) for p in prompts]
  return [[t async for t in h] for h in handles]
together = asyncio.run(run())
engine.close()
assert together == alone, (together, alone)
print('mesh ok')
"""


@pytest.mark.slow
def test_engine_on_a_mesh():
  """--mesh data=2 on two CPU devices: the cache split by rows, each request's tokens those of generate
  alone (a third request takes a row another left)."""
  env = dict(os.environ, PYTHONPATH=f'{ROOT}:{ROOT / "tests"}', JAX_PLATFORMS='cpu',
             XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=2'))
  out = subprocess.run([sys.executable, '-c', MESH_CHECK], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and 'mesh ok' in out.stdout, out.stderr[-3000:]
