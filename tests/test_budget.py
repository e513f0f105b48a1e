"""Requests checked before any work: prompt plus max_new_tokens against the model window, and the
memory estimate against what is free, for generate, generate_stream, chat and chat_stream."""

import numpy as np
import pytest

import qwenvl_jax as q
from qwenvl_jax import budget
from qwenvl_jax.chat_session import chat, chat_stream
from qwenvl_jax.decode import GenerationConfig, generate, generate_stream
from qwenvl_jax.images import ImageLoader
from qwenvl_jax.tokenizer import QwenVLTokenizer
from test_chat import N_QUERIES, random_params, tiny_chat_config

from qwenvl_jax import decode as gen


@pytest.fixture(scope='module')
def tiny(golden_dir):
  return q.load_pretrained(golden_dir / 'checkpoint')


def test_window_checked_before_any_work(tiny, golden, compiles):
  """A prompt of window - 5 tokens with 10 new ones: refused with no compile and no image loaded
  (the image named here does not exist)."""
  model, params = tiny
  window = model.config.text.max_position_embeddings
  long = np.resize(golden['long.input_ids'][0], window - 5)
  image_row = golden['batch.input_ids'][0]
  for fn in (generate, generate_stream):
    with pytest.raises(budget.GenerationLimitError, match=f'{window - 5} tokens plus max_new_tokens=10 '
                                                          f'.{window + 5}. exceeds the model window of {window}'):
      fn(model, params, [long], max_new_tokens=10)
    with pytest.raises(budget.GenerationLimitError, match='at most 5 here'):
      fn(model, params, [image_row, long], ['/no/such/image.png'], max_new_tokens=10)
  with pytest.raises(budget.GenerationLimitError, match='max_new_tokens=100000'):
    generate(model, params, [long[:3]], max_new_tokens=100000)
  assert compiles == []
  budget.check_window(model.config, window - 10, 10)  # exactly the window is fine


def test_memory_estimate_refuses_what_does_not_fit(tiny, golden, monkeypatch, compiles):
  model, params = tiny
  prompt = golden['long.input_ids'][0, :20]
  config = model.config
  need = budget.estimate(config, 1, 32, 32 + 512, 0)
  t = config.text
  assert need.kv_cache == t.num_layers * 2 * 544 * t.hidden_size * 4
  monkeypatch.setattr(budget, 'available_bytes', lambda: (need.total - 1, 'test memory'))
  with pytest.raises(budget.GenerationLimitError, match=r'about 0\.\d\d GiB \(KV cache .*GiB\), more than '
                                                         r'the 0\.\d\d GiB free in test memory'):
    generate(model, params, [prompt], max_new_tokens=500)
  monkeypatch.setattr(budget, 'available_bytes', lambda: (need.total, 'test memory'))
  with pytest.raises(budget.GenerationLimitError, match='parameter conversion'):  # the copy counts too
    generate(model, params, [prompt], max_new_tokens=500)
  split = gen.decode_params(params)
  compiles.clear()
  gen.check_request(config, [20], 0, GenerationConfig(max_new_tokens=500), params=split)  # fits exactly
  with pytest.raises(budget.GenerationLimitError):  # every step's logits kept: 512 more rows of logits
    generate(model, split, [prompt], max_new_tokens=500, output_logits=True)
  assert budget.estimate(config, 1, 32, 544, 0, output_logits=True).logits == (2 + 512) * t.vocab_size * 4
  assert compiles == []


def test_estimate_grows_as_the_program_allocates():
  config = q.qwen_vl_7b()
  one = budget.estimate(config, 1, 512, 1024, 1)
  assert budget.estimate(config, 2, 512, 1024, 1).kv_cache == 2 * one.kv_cache
  assert budget.estimate(config, 1, 512, 2048, 1).kv_cache == 2 * one.kv_cache
  longer = budget.estimate(config, 1, 1024, 2048, 1)
  assert longer.prefill > 3 * one.prefill  # attention scores: prompt x slots
  # the released model: 32 layers x 2 x 4096 x bf16 is 0.5 MiB per token of KV cache
  bf16 = budget.estimate(config.replace(dtype='bfloat16'), 1, 8192, 8192, 0)
  assert bf16.kv_cache == 8192 * 2 ** 19


def test_available_memory_is_read():
  free, where = budget.available_bytes()
  assert free is None or free > 0
  assert where


@pytest.fixture(scope='module')
def chat_model():
  cfg = tiny_chat_config()  # window 8192 (the default max_position_embeddings)
  return q.QwenVL(cfg), random_params(cfg)


def test_chat_checks_before_loading_images(chat_model, vocab_file, tmp_path, compiles):
  model, params = chat_model
  tok = QwenVLTokenizer(vocab_file, image_span_length=N_QUERIES)
  query = 'Picture 1:<img>missing.png</img>\n' + 'hello ' * 9000
  g = GenerationConfig(max_new_tokens=8)
  loader = ImageLoader(tmp_path)
  for fn in (chat, chat_stream):
    with pytest.raises(budget.GenerationLimitError, match='exceeds the model window of 8192'):
      fn(model, params, tok, query, generation_config=g, image_loader=loader)
  assert compiles == []
  with pytest.raises(FileNotFoundError, match='missing.png'):  # a request that fits gets to the images
    chat(model, params, tok, 'Picture 1:<img>missing.png</img>\nhi', generation_config=g, image_loader=loader)
