"""`qwenvl-jax chat` end to end on a tiny random checkpoint written in the released layout."""
import io
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import qwenvl_jax
from qwenvl_jax import cli
from qwenvl_jax.chat import chat
from qwenvl_jax.checkpoint import load_pretrained
from qwenvl_jax.generate import GenerationConfig
from qwenvl_jax.images import ImageLoader
from qwenvl_jax.params import params_to_hf
from qwenvl_jax.tokenizer import QwenVLTokenizer
from test_chat import random_params, tiny_chat_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp('ckpt')
  cfg = tiny_chat_config()
  save_file(dict(params_to_hf(random_params(cfg, seed=1), cfg)), str(root / 'model.safetensors'))
  (root / 'config.json').write_text(json.dumps(cfg.to_dict()))
  (root / 'generation_config.json').write_text(json.dumps(
      {'chat_format': 'chatml', 'eos_token_id': 151643, 'pad_token_id': 151643, 'max_window_size': 6144,
       'max_new_tokens': 512, 'do_sample': True, 'top_k': 0, 'top_p': 0.5}))
  return root


@pytest.fixture
def images(tmp_path, golden_dir, monkeypatch):
  """A working directory holding pic.jpg, so image paths are short relative ones."""
  (tmp_path / 'pic.jpg').write_bytes((golden_dir / 'img' / 'poster.jpg').read_bytes())
  monkeypatch.chdir(tmp_path)
  return tmp_path


def _args(ckpt, vocab_file, *extra):
  return ['chat', '--ckpt', str(ckpt), '--vocab', str(vocab_file), '--no-compile-cache',
          '--max-new-tokens', '6', *extra]


@pytest.fixture(scope='module')
def answer(ckpt, vocab_file):
  """The greedy answers the CLI must print, from the library."""
  model, params = load_pretrained(ckpt)
  tok = QwenVLTokenizer(vocab_file, image_span_length=model.config.vision.n_queries)
  g = GenerationConfig.from_pretrained(ckpt, max_new_tokens=6, do_sample=False)
  return lambda query, history=None: chat(model, params, tok, query, history, generation_config=g,
                                          image_loader=ImageLoader('.'))


def test_chat_one_prompt(ckpt, vocab_file, images, answer, capsys):
  assert cli.main(_args(ckpt, vocab_file, '--greedy', '--image', 'pic.jpg', 'What is this?')) == 0
  response, _ = answer('Picture 1:<img>pic.jpg</img>\nWhat is this?')
  assert capsys.readouterr().out == response + '\n'


def test_chat_interactive(ckpt, vocab_file, images, answer, capsys, monkeypatch):
  monkeypatch.setattr(sys, 'stdin', io.StringIO('Hello\n\nWho are you?\n:clear\nHello\n:exit\n'))
  assert cli.main(_args(ckpt, vocab_file, '--greedy', '--image', str(images / 'pic.jpg'))) == 0
  out = capsys.readouterr().out
  first, history = answer('Picture 1:<img>pic.jpg</img>\nHello')
  second, _ = answer('Who are you?', history)
  assert out.startswith(cli.INTERACTIVE_HELP)
  assert out.split('Qwen-VL> ')[1:] == [f'{first}\nUser> User> ', f'{second}\nUser> User> ',
                                        f'{first}\nUser> ']


def test_url_refused_by_default(ckpt, vocab_file, images, capsys):
  assert cli.main(_args(ckpt, vocab_file, '--image', 'http://x/a.jpg', 'hi')) == 1
  assert 'URLs are disabled' in capsys.readouterr().err


def test_image_outside_root_refused(ckpt, vocab_file, images, capsys):
  (images / 'sub').mkdir()
  assert cli.main(_args(ckpt, vocab_file, '--image-root', 'sub', '--image', 'pic.jpg', 'hi')) == 1
  assert 'outside the image root' in capsys.readouterr().err


def test_boxes_saved_on_latest_image(ckpt, vocab_file, images, capsys, monkeypatch):
  answer = '<ref>poster</ref><box>(100,100),(900,500)</box>'
  monkeypatch.setattr(sys.modules['qwenvl_jax.chat'], 'chat_stream', lambda *a, **k: iter([answer[:10], answer]))
  assert cli.main(_args(ckpt, vocab_file, '--image', 'pic.jpg', '--save-dir', 'out', 'Where?')) == 0
  saved = images / 'out' / 'turn1_pic_boxes.png'
  assert f'1 box(es) drawn on pic.jpg: {saved.relative_to(images)}' in capsys.readouterr().out
  drawn = np.asarray(Image.open(saved).convert('RGB'), np.int16)
  plain = np.asarray(Image.open(images / 'pic.jpg').convert('RGB'), np.int16)
  h, w = plain.shape[:2]
  changed = np.abs(drawn - plain).sum(-1) > 60
  assert changed[int(0.3 * h), int(0.1 * w)] and not changed[int(0.8 * h), int(0.5 * w)]


def test_plan_is_imported_only_when_asked(monkeypatch):
  calls = []
  fake = types.SimpleNamespace(add_arguments=lambda p: p.add_argument('--devices', type=int),
                               run=lambda args: calls.append(args.devices) or 7)
  monkeypatch.setitem(sys.modules, 'qwenvl_jax.plan', fake)
  monkeypatch.setattr(qwenvl_jax, 'plan', fake, raising=False)
  assert cli.main(['plan', '--devices', '4']) == 7 and calls == [4]


def test_missing_checkpoint(vocab_file, tmp_path, capsys):
  assert cli.main(['chat', '--ckpt', str(tmp_path / 'nope'), '--no-compile-cache', 'hi']) == 1
  assert 'checkpoint directory not found' in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_fills_compile_cache(ckpt, vocab_file, tmp_path):
  """A separate process, as a user runs it; the persistent compilation cache is on by default."""
  env = dict(os.environ, HOME=str(tmp_path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  cmd = [sys.executable, '-m', 'qwenvl_jax.cli', 'chat', '--ckpt', str(ckpt), '--vocab', str(vocab_file),
         '--max-new-tokens', '3', '--seed', '1', 'Hi']
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip()
  assert any((tmp_path / '.cache' / 'qwenvl_jax' / 'jax').iterdir())
