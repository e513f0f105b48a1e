"""chat / chat_stream on a tiny random model with the real 152k vocabulary and tokenizer."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import qwenvl_jax as q
from qwenvl_jax.chat_session import DEFAULT_SYSTEM, chat, chat_config, chat_stream, latest_image
from qwenvl_jax.chat_format import decode_response, make_context, partial_response
from qwenvl_jax.decode import GenerationConfig, generate
from qwenvl_jax.images import ImageLoader
from qwenvl_jax.param_layout import leaf_shapes
from qwenvl_jax.params import set_path
from qwenvl_jax.tokenizer import QwenVLTokenizer

from qwenvl_jax import chat_session as chat_lib
N_QUERIES = 16
SAMPLED = GenerationConfig(max_new_tokens=8)  # the released sampling settings (top_p 0.5)
GREEDY = GenerationConfig(max_new_tokens=8, do_sample=False)


def tiny_chat_config() -> q.QwenVLConfig:
  """Real vocabulary and special-token ids, everything else tiny (hidden 128 is the resampler's least)."""
  return q.QwenVLConfig(
      text=q.TextConfig(vocab_size=151936, hidden_size=128, num_layers=2, num_heads=2, kv_channels=64,
                        intermediate_size=256, seq_length=64),
      vision=q.VisionConfig(image_size=28, width=32, layers=1, heads=2, output_dim=128,
                            n_queries=N_QUERIES))


def random_params(cfg: q.QwenVLConfig, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  params: dict = {}
  for path, shape in leaf_shapes(cfg).items():
    scale = 0.02 if len(shape) > 1 and path[-1] != 'scale' else 1.0
    set_path(params, path, jnp.asarray(rng.normal(0, scale, shape).astype(np.float32)))
  return params


@pytest.fixture(scope='module')
def model_params():
  cfg = tiny_chat_config()
  return q.QwenVL(cfg), random_params(cfg)


@pytest.fixture(scope='module')
def tok(vocab_file):
  return QwenVLTokenizer(vocab_file, image_span_length=N_QUERIES)


@pytest.fixture(scope='module')
def loader(golden_dir):
  return ImageLoader(allowed_root=golden_dir / 'img')


def _expected(model, params, tok, query, history, loader, images=()):
  """What chat must answer: ChatML context -> generate with the chat stops -> decoded answer."""
  g = chat_config(tok, GREEDY)
  _, tokens = make_context(tok, query, history, DEFAULT_SYSTEM)
  pixels = [loader.load(p) for p in images] or None
  out = generate(model, params, [tokens], pixels, generation_config=g)
  return decode_response(out[0], tok, len(tokens))


def test_chat_with_history(model_params, tok, loader):
  model, params = model_params
  query = 'Picture 1:<img>poster.jpg</img>\nWhat is written here?'
  response, history = chat(model, params, tok, query, generation_config=GREEDY, image_loader=loader)
  assert response and history == [(query, response)]
  assert response == _expected(model, params, tok, query, None, loader, ['poster.jpg'])
  follow_up = 'And the colour?'
  response2, history2 = chat(model, params, tok, follow_up, history, generation_config=GREEDY,
                             image_loader=loader)
  assert history == [(query, response)]  # the caller's history is left alone
  assert history2 == [(query, response), (follow_up, response2)]
  assert response2 == _expected(model, params, tok, follow_up, history, loader, ['poster.jpg'])


def test_chat_stream_ends_with_chat_response(model_params, tok, loader):
  model, params = model_params
  query = 'Picture 1:<img>menu.jpg</img>\nTranslate the menu.'
  response, _ = chat(model, params, tok, query, generation_config=SAMPLED, image_loader=loader, seed=4)
  texts = list(chat_stream(model, params, tok, query, generation_config=SAMPLED, image_loader=loader,
                           seed=4))
  assert len(texts) > 1 and texts[-1] == response


def test_images_as_objects(model_params, tok, loader, golden_dir):
  """A reference mapped to bytes, a PIL image or an array answers as the file it stands for."""
  model, params = model_params
  path = golden_dir / 'img' / 'radar.png'
  pil = Image.open(path).convert('RGB')
  by_path, _ = chat(model, params, tok, '<img>radar.png</img>', generation_config=GREEDY, image_loader=loader)
  for obj in (path.read_bytes(), pil, np.asarray(pil)):
    answer, _ = chat(model, params, tok, '<img>figure</img>', images={'figure': obj},
                     generation_config=GREEDY, image_loader=loader)
    assert answer == by_path


def test_untrusted_image_references_refused(model_params, tok, loader):
  model, params = model_params
  with pytest.raises(PermissionError, match='URLs are disabled'):
    chat(model, params, tok, '<img>http://a/b.png</img>', generation_config=GREEDY, image_loader=loader)
  with pytest.raises(PermissionError, match='outside the allowed root'):
    chat(model, params, tok, '<img>../checkpoint</img>', generation_config=GREEDY, image_loader=loader)


def test_chat_config_and_mismatches(model_params, tok, vocab_file):
  model, params = model_params
  g = chat_config(tok, None)
  assert set(g.stop_ids) == {tok.eod_id, tok.im_start_id, tok.im_end_id}
  assert g.vocab_limit == tok.vocab_size < model.config.text.vocab_size
  with pytest.raises(ValueError, match='image_span_length=16'):
    chat(model, params, QwenVLTokenizer(vocab_file), 'hi', generation_config=GREEDY)
  with pytest.raises(ValueError, match='chatml'):
    chat(model, params, tok, 'hi', generation_config=GREEDY.replace(chat_format='raw'))


def test_latest_image():
  history = [('Picture 1:<img>a.png</img>\nhi', 'hello'), ('Picture 2:<img>b.png</img>\nand?', 'x'),
             ('no image', 'y')]
  assert latest_image('<ref>cat</ref><box>(1,2),(3,4)</box>', history) == 'b.png'
  assert latest_image('see <img>c.png</img>', history) == 'c.png'
  assert latest_image('none', [('plain', 'text')]) is None


HELLO, WORLD, SPACES = 9707, 1879, 256  # 'Hello', ' world', two spaces
E4, B8, AD, CONT = 160, 116, 255, 222  # single-byte tokens: b'\xe4', b'\xb8', b'\xad' (中 = e4 b8 ad), b'\x80'
EXTRA_3 = 151649  # <|extra_3|>


def _streamed(monkeypatch, model_params, tok, tokens):
  """chat_stream's texts when the model generates `tokens`."""
  model, params = model_params
  monkeypatch.setattr(chat_lib, 'generate_stream', lambda *a, **k: iter(np.array([t]) for t in tokens))
  return list(chat_stream(model, params, tok, 'hi', generation_config=GREEDY))


@pytest.mark.parametrize('tokens', [
    [HELLO, CONT, WORLD, E4, B8, AD, WORLD, E4, B8],  # a stray byte, a character in three, an unfinished one
    [HELLO, E4, WORLD, SPACES, EXTRA_3, E4],  # an interrupted character, a special token
    [HELLO, 151857, 97, 98, WORLD],  # an <img> never closed
    [151857, 97, 151859, 151858, WORLD, 151645],  # a closed span (padded), then <|im_end|>
    [151645],  # an empty answer
])
def test_stream_texts_extend_to_the_final_answer(monkeypatch, model_params, tok, tokens):
  """Each streamed text extends the last, so printing the new parts prints the final answer once."""
  texts = _streamed(monkeypatch, model_params, tok, tokens)
  final = decode_response(tokens, tok, 0)
  assert texts and texts[-1] == final
  for before, after in zip([''] + texts, texts):
    assert after.startswith(before), (before, after)
  if tokens[-1] == B8:
    assert final.endswith('\ufffd') and '中' in final and final.count('\ufffd') == 2


def test_partial_response_is_always_a_prefix(tok):
  """Random answers from bytes that make and break characters, image tags and special tokens."""
  pool = [HELLO, WORLD, SPACES, E4, B8, AD, CONT, 97, 98, EXTRA_3, tok.img_start_id, tok.img_end_id,
          tok.img_pad_id, tok.ref_start_id, tok.box_start_id]
  rng = np.random.default_rng(0)
  for _ in range(300):
    ids = [int(i) for i in rng.choice(pool, size=12)]
    final = decode_response(ids, tok, 0)
    shown = ''
    for n in range(len(ids) + 1):
      text = partial_response(ids[:n], tok, 0)
      assert text.startswith(shown) and final.startswith(text), (ids[:n], shown, text, final)
      shown = text
