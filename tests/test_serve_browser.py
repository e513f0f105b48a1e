"""The chat page at `/` in headless Chromium: upload an image, ask, watch the answer stream in, see its
boxes drawn as `draw_boxes` draws them; the history goes back with the next question; regenerate, clear,
and a refused request.

The browser is Debian's `chromium`, driven through its own `chromium-driver` with Selenium: the two come
from one Debian source at one version, so a Chromium update cannot break the pairing (a driver library
speaking the browser's internal protocol is built against one browser version). The app is the real one;
a scripted engine (tests/serving.py) answers in the real vocabulary, so no model runs and a reply can be
held half-streamed until the test has seen it.

Outside CI a missing browser, driver or `selenium` skips these tests with the reason; in CI (CI=true) it
fails them (`.ci/run` installs the browser, the test extra `selenium`).
"""
import base64
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('fastapi', reason='the serve tests need the test extra (fastapi, uvicorn)')

from qwenvl_jax import GenerationConfig, QwenVL  # noqa: E402
from qwenvl_jax.grounding import box_to_pixels, draw_boxes, extract_boxes  # noqa: E402
from serve.app import Service, create_app  # noqa: E402
from serve.limits import Limits  # noqa: E402
from serve.prompt import Preparer  # noqa: E402
from serving import Reply, ScriptedEngine, live_server  # noqa: E402
from test_chat import tiny_chat_config  # noqa: E402

CHROMIUM = os.environ.get('QWENVL_CHROMIUM', '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('QWENVL_CHROMEDRIVER', '/usr/bin/chromedriver')
KEY, NAME = 'page-key', 'tiny'
WAIT = 10  # seconds any one thing may take to show


def _unavailable(why: str):
  message = f'{why}: the browser test needs Debian\'s chromium and chromium-driver (apt-get install chromium ' \
            f'chromium-driver) and selenium (pip install -e ".[test]")'
  if os.environ.get('CI', '').lower() == 'true':
    pytest.fail(message)
  pytest.skip(message)


@pytest.fixture(scope='module')
def browser():
  try:
    from selenium import webdriver
  except ImportError:
    _unavailable('selenium is not installed')
  for path in (CHROMIUM, CHROMEDRIVER):
    if shutil.which(path) is None:
      _unavailable(f'{path} not found')
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM  # with the driver's path given too, nothing is looked up or downloaded
  for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--window-size=1000,1000'):
    options.add_argument(arg)  # --no-sandbox: CI runs as root
  options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
  driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
  yield driver
  driver.quit()


@pytest.fixture(scope='module')
def server(tok):
  engine = ScriptedEngine(tok)
  limits = Limits()
  preparer = Preparer(QwenVL(tiny_chat_config()), None, tok, limits)  # checks and images; the engine answers
  app = create_app(Service(name=NAME, tokenizer=tok, generation_config=GenerationConfig(max_new_tokens=64),
                           preparer=preparer, engine=engine, limits=limits, api_key=KEY))
  with live_server(app) as url:
    yield url, engine


@pytest.fixture
def page(browser, server):
  """The page freshly loaded, the API key entered (the server wants one), the model's name shown."""
  from selenium.webdriver.common.keys import Keys
  url, _ = server
  browser.get(url)
  browser.execute_script('localStorage.clear()')  # no key kept from an earlier test
  browser.refresh()
  _until(browser, 'the page names the missing key', lambda: 'API key' in _text(browser, '#model'))
  browser.find_element('id', 'key').send_keys(KEY + Keys.TAB)  # the key is taken on change
  _until(browser, 'the model name', lambda: _text(browser, '#model') == NAME)
  return browser


def _until(driver, what: str, condition, seconds: float = WAIT):
  from selenium.common.exceptions import TimeoutException
  from selenium.webdriver.support.wait import WebDriverWait
  try:
    WebDriverWait(driver, seconds, poll_frequency=0.02).until(lambda _: condition())
  except TimeoutException:
    pytest.fail(f'waited {seconds} s for {what}; the log shows {_turns(driver)}')


def _text(driver, selector: str) -> str:
  return driver.execute_script('return document.querySelector(arguments[0]).textContent', selector)


def _turns(driver) -> list[tuple[str, str]]:
  """(class, text) of each turn in the log."""
  return [tuple(t) for t in driver.execute_script(
      "return [...document.querySelectorAll('#log .turn')].map(d => [d.className, d.textContent])")]


def _answers(driver) -> list[str]:
  return [text for cls, text in _turns(driver) if cls == 'turn assistant']


def _ask(driver, words: str, files=()) -> None:
  from selenium.webdriver.common.keys import Keys
  for path in files:
    driver.find_element('id', 'files').send_keys(str(path))
  _until(driver, 'the upload shown', lambda: len(driver.find_elements('css selector', '#pending img')) == len(files))
  # an answer's last text shows before its stream has closed; Send is enabled again once it has
  _until(driver, 'Send enabled', lambda: driver.find_element('id', 'send').is_enabled())
  driver.find_element('id', 'text').send_keys(words + Keys.ENTER)


def _scene(path) -> Image.Image:
  """A 400x300 PNG (lossless: the browser's pixels are the file's) with a gradient, so that a shifted or
  flipped drawing shows."""
  x, y = np.meshgrid(np.arange(400), np.arange(300))
  image = Image.fromarray(np.stack([x * 255 // 399, y * 255 // 299, np.full_like(x, 90)], -1).astype(np.uint8))
  image.save(path)
  return image


def _canvas(driver) -> np.ndarray:
  url = driver.execute_script("return document.querySelector('#log .assistant canvas.boxes').toDataURL('image/png')")
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(',', 1)[1]))).convert('RGB'))


def test_answer_streams_and_boxes_are_drawn(page, server, tok, tmp_path):
  """The answer shows token by token (held twice mid-way: each time the page shows exactly the text so
  far), then without its tags beside the image with its boxes drawn: every pixel outside the boxes'
  insides equals draw_boxes' rendering of the same answer (the outlines in their colours and places, the
  image untouched), and inside each box a label tag sits top left with nothing else drawn."""
  url, engine = server
  reply = Reply('The dog sits on the grass: <ref>the dog</ref><box>(100,200),(500,800)</box> and '
                '<ref>a cat</ref><box>(600,100),(900,500)</box>', holds=(2, 5))
  engine.replies.append(reply)
  image = _scene(tmp_path / 'scene.png')
  _ask(page, 'Where are the animals?', [tmp_path / 'scene.png'])
  tokens = engine.tokens(reply)
  for n in reply.holds:
    so_far = tok.decode(tokens[:n]).strip()
    _until(page, f'the answer so far: {so_far!r}', lambda: _answers(page) == [so_far])
    engine.go()
  _until(page, 'the boxes drawn', lambda: page.find_elements('css selector', '#log .assistant canvas.boxes'))
  assert _answers(page) == ['The dog sits on the grass: the dog and a cat']
  # the settings left empty on the page are the server's generation config's
  assert engine.requests[-1].config.max_new_tokens == 64
  user = page.find_element('css selector', '#log .user img')
  assert user.get_property('naturalWidth') == 400 and 'Where are the animals?' in _turns(page)[0][1]

  drawn, want = _canvas(page), np.asarray(draw_boxes(image, reply.text))
  assert drawn.shape == want.shape == (300, 400, 3)
  line = max(2, round(min(image.size) / 200))  # draw_boxes' outline width
  inside = np.zeros(drawn.shape[:2], bool)
  for box in extract_boxes(reply.text):
    left, top, right, bottom = box_to_pixels(box['box'], *image.size)
    inside[top + line:bottom - line + 1, left + line:right - line + 1] = True
    # Pillow's label text bleeds a pixel into the outline: its band along the tag is not compared
    inside[top + line - 1:top + line + 20, left + line - 1:right - line + 2] = True
    tag = drawn[top + line:top + line + 12, left + line:left + line + 30].reshape(-1, 3)
    colour = want[top, (left + right) // 2]  # the outline's
    assert (tag == colour).all(-1).any() and (tag >= 200).all(-1).any(), f'no label tag for {box}'  # white text
    lower = slice((top + bottom) // 2, bottom - line + 1), slice(left + line, right - line + 1)
    assert (drawn[lower] == np.asarray(image)[lower]).all(), f'something drawn inside {box}'
  assert (want[~inside] != np.asarray(image)[~inside]).any()  # draw_boxes drew outlines there
  mismatch = (drawn != want).any(-1) & ~inside
  assert not mismatch.any(), f'{mismatch.sum()} pixels differ from draw_boxes, first at {np.argwhere(mismatch)[:3]}'

  canvas = page.find_element('css selector', '#log .assistant canvas.boxes')
  assert canvas.is_displayed() and canvas.size['width'] > 100 and canvas.size['height'] > 50
  # offline: every resource the page loaded came from the server itself
  assert all(r.startswith(url) for r in page.execute_script(
      "return performance.getEntriesByType('resource').map(r => r.name).filter(n => !n.startsWith('data:'))"))
  assert not [e for e in page.get_log('browser') if 'Uncaught' in e['message']]


def _context(engine) -> str:
  return engine.tokenizer.decode(engine.requests[-1].tokens)


def test_history_regenerate_errors_and_clear(page, server, tmp_path):
  """The second question carries the first exchange (image and answer); Regenerate asks the same again
  and replaces the answer; an answer failing mid-way shows the error and Regenerate retries it without the
  partial text; a refused request shows the server's reason and the next question takes its place; Clear
  stops an answer under way (the server cancels it) and starts a new conversation."""
  _, engine = server
  _scene(tmp_path / 'scene.png')
  first = 'A dog on the <ref>grass</ref><box>(0,500),(999,999)</box>.'
  engine.replies.extend([Reply(first), Reply('It is brown.'), Reply('It is dark brown.')])
  _ask(page, 'What is here?', [tmp_path / 'scene.png'])
  _until(page, 'the first answer', lambda: page.find_elements('css selector', '#log .assistant canvas.boxes'))
  _ask(page, 'What colour is the dog?')
  _until(page, 'the second answer', lambda: _answers(page)[1:] == ['It is brown.'])
  context = _context(engine)
  assert f'Picture 1:<img>upload1</img>\nWhat is here?<|im_end|>\n<|im_start|>assistant\n{first}<|im_end|>' \
         in context and context.endswith('What colour is the dog?<|im_end|>\n<|im_start|>assistant\n')

  asked = engine.requests[-1].tokens
  page.find_element('id', 'regen').click()
  _until(page, 'the regenerated answer', lambda: _answers(page)[1:] == ['It is dark brown.'])
  assert engine.requests[-1].tokens == asked and len(_answers(page)) == 2

  engine.replies.extend([Reply('Half of it and', fails_after=3), Reply('Whole.')])
  _ask(page, 'How big is it?')
  _until(page, 'the failure', lambda: _turns(page)[-1][0] == 'turn error')
  assert 'scripted failure' in _turns(page)[-1][1]
  page.find_element('id', 'regen').click()
  _until(page, 'the answer retried', lambda: _answers(page)[-1:] == ['Whole.'])
  assert engine.requests[-1].tokens == engine.requests[-2].tokens  # the partial answer was not kept
  assert [cls for cls, _ in _turns(page)].count('turn error') == 0

  (tmp_path / 'notes.png').write_bytes(b'not an image at all')
  _ask(page, 'And this one?', [tmp_path / 'notes.png'])
  _until(page, 'the refusal', lambda: _turns(page)[-1][0] == 'turn error')
  assert 'messages[6].content' in _turns(page)[-1][1] and 'error: ' in _turns(page)[-1][1]
  engine.replies.append(Reply('Fine.'))
  _ask(page, 'Then just say fine.')
  _until(page, 'the answer after the refusal', lambda: _answers(page)[-1:] == ['Fine.'])
  assert 'And this one?' not in _context(engine) and 'It is dark brown.' in _context(engine)
  assert [cls for cls, _ in _turns(page)][-4:] == ['turn user dropped', 'turn error dropped', 'turn user',
                                                   'turn assistant']

  cancelled = engine.stats()['cancelled']
  engine.replies.append(Reply('word ' * 60, holds=(2,)))
  _ask(page, 'Talk for long.')
  _until(page, 'the long answer started', lambda: _answers(page)[-1:] == ['word word'])
  assert not page.find_element('id', 'send').is_enabled() and not page.find_element('id', 'regen').is_enabled()
  page.find_element('id', 'clear').click()
  assert _turns(page) == []
  engine.go()
  _until(page, 'the server cancelling the cleared answer', lambda: engine.stats()['cancelled'] == cancelled + 1)
  engine.replies.append(Reply('New start.'))
  _ask(page, 'Hello again.')
  _until(page, 'the answer after clearing', lambda: _answers(page) == ['New start.'])
  assert 'What is here?' not in _context(engine) and 'Talk for long.' not in _context(engine)
