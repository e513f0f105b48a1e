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

import train
from qwenvl_jax import cli
from qwenvl_jax.chat_session import chat
from qwenvl_jax.checkpoint import load_pretrained
from qwenvl_jax.decode import GenerationConfig
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


@pytest.fixture
def no_loading(monkeypatch):
  """Fails the test if the weights are loaded: for errors that must come first."""
  def load(*a, **k):
    raise AssertionError('the checkpoint was loaded')
  monkeypatch.setattr(sys.modules['qwenvl_jax.checkpoint'], 'load_pretrained', load)


def _error(capsys) -> str:
  """The one line a refused command prints."""
  captured = capsys.readouterr()
  assert captured.out == '' and captured.err.count('\n') == 1, captured
  assert captured.err.startswith('qwenvl-jax: error: ') and 'Traceback' not in captured.err
  return captured.err


def test_image_outside_root_refused(ckpt, vocab_file, images, capsys, no_loading):
  (images / 'sub').mkdir()
  assert cli.main(_args(ckpt, vocab_file, '--image-root', 'sub', '--image', '../pic.jpg', 'hi')) == 1
  assert 'outside the image root' in _error(capsys)
  assert cli.main(_args(ckpt, vocab_file, '--image-root', 'sub', '--image', str(images / 'pic.jpg'), 'hi')) == 1
  assert 'outside the image root' in _error(capsys)


def test_image_paths_are_relative_to_the_image_root(ckpt, vocab_file, images, capsys, monkeypatch):
  """--image PATH is taken relative to --image-root when given (as the help says), else to the cwd."""
  (images / 'sub').mkdir()
  (images / 'sub' / 'inner.jpg').write_bytes((images / 'pic.jpg').read_bytes())
  queries = []
  monkeypatch.setattr(sys.modules['qwenvl_jax.chat_session'], 'chat_stream',
                      lambda model, params, tok, query, *a, **k: queries.append(query) or iter(['ok']))
  assert cli.main(_args(ckpt, vocab_file, '--image-root', 'sub', '--image', 'inner.jpg', 'hi')) == 0
  assert cli.main(_args(ckpt, vocab_file, '--image', 'sub/inner.jpg', 'hi')) == 0
  assert queries == ['Picture 1:<img>inner.jpg</img>\nhi', 'Picture 1:<img>sub/inner.jpg</img>\nhi']
  capsys.readouterr()
  with pytest.raises(SystemExit):
    cli.main(['chat', '--help'])
  assert 'relative to --image-root when given, else to the working directory' in ' '.join(
      capsys.readouterr().out.split())


@pytest.mark.parametrize('flags, message', [
    (['--image', 'nope.jpg'], '--image nope.jpg: no such file'),
    (['--image', 'bad.jpg'], "cannot decode image 'bad.jpg'"),
])
def test_bad_images_refused_before_loading(ckpt, vocab_file, images, capsys, no_loading, flags, message):
  (images / 'bad.jpg').write_bytes(b'not a jpeg')
  assert cli.main(_args(ckpt, vocab_file, *flags, 'hi')) == 1
  assert message in _error(capsys)


@pytest.mark.parametrize('flags, message', [
    (['--temperature', 'inf'], '--temperature inf: must be finite'),
    (['--temperature', 'nan'], '--temperature nan: must be finite'),
    (['--temperature', '-1'], '--temperature -1.0: must be >= 0'),
    (['--top-p', '0'], '--top-p 0.0: must be in (0, 1]'),
    (['--top-k', '-2'], '--top-k -2: must be >= 0'),
    (['--max-new-tokens', '0'], '--max-new-tokens 0: must be >= 1'),
    (['--max-new-tokens', '100000'], '--max-new-tokens 100000: max_new_tokens=100000 alone exceeds the '
                                     'model window of 8192 tokens'),
    (['--image-root', 'nowhere'], '--image-root nowhere: not a directory'),
    (['--compile-cache', ''], '--compile-cache is empty'),
])
def test_bad_flag_values_refused_before_loading(ckpt, vocab_file, images, capsys, no_loading, flags, message):
  argv = [a for a in _args(ckpt, vocab_file, 'hi') if a != '--no-compile-cache' or '--compile-cache' not in flags]
  assert cli.main(argv + flags) == 2
  assert message in _error(capsys)


def test_bad_generation_config_file(ckpt, vocab_file, tmp_path, capsys, no_loading):
  broken = tmp_path / 'ckpt'
  broken.mkdir()
  for f in ('config.json', 'model.safetensors'):
    (broken / f).symlink_to(ckpt / f)
  (broken / 'generation_config.json').write_text('{"top_p": "0.5"}')
  assert cli.main(_args(broken, vocab_file, 'hi')) == 1
  assert f"{broken / 'generation_config.json'}: key 'top_p': expected a number" in _error(capsys)


def test_prompt_longer_than_the_window(ckpt, vocab_file, images, capsys):
  assert cli.main(_args(ckpt, vocab_file, 'hello ' * 9000)) == 1
  assert 'exceeds the model window of 8192 tokens' in _error(capsys)


def test_answer_with_broken_utf8_printed_once(ckpt, vocab_file, images, capsys, monkeypatch):
  """A stray byte mid-answer and an unfinished character at its end: printed once, as the final text."""
  tokens = [9707, 222, 1879, 160, 116, 255, 1879, 160, 116]  # Hello \x80 world 中 world \xe4\xb8
  monkeypatch.setattr(sys.modules['qwenvl_jax.chat_session'], 'generate_stream',
                      lambda *a, **k: iter(np.array([t]) for t in tokens))
  assert cli.main(_args(ckpt, vocab_file, 'hi')) == 0
  assert capsys.readouterr().out == 'Hello\ufffd world中 world\ufffd\n'


def test_boxes_drawn_when_the_answer_holds_a_special_token(ckpt, vocab_file, images, capsys, monkeypatch):
  answer = '<ref>poster</ref><box>(100,100),(900,500)</box><|extra_3|>'
  monkeypatch.setattr(sys.modules['qwenvl_jax.chat_session'], 'chat_stream', lambda *a, **k: iter([answer]))
  assert cli.main(_args(ckpt, vocab_file, '--image', 'pic.jpg', '--save-dir', 'out', 'Where?')) == 0
  assert '1 box(es) drawn on pic.jpg' in capsys.readouterr().out
  assert (images / 'out' / 'turn1_pic_boxes.png').is_file()


def test_boxes_saved_on_latest_image(ckpt, vocab_file, images, capsys, monkeypatch):
  answer = '<ref>poster</ref><box>(100,100),(900,500)</box>'
  monkeypatch.setattr(sys.modules['qwenvl_jax.chat_session'], 'chat_stream', lambda *a, **k: iter([answer[:10], answer]))
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
  monkeypatch.setitem(sys.modules, 'train.plan', fake)
  monkeypatch.setattr(train, 'plan', fake, raising=False)
  assert cli.main(['plan', '--devices', '4']) == 7 and calls == [4]


def test_missing_checkpoint(vocab_file, tmp_path, capsys):
  assert cli.main(['chat', '--ckpt', str(tmp_path / 'nope'), '--no-compile-cache', 'hi']) == 1
  assert 'checkpoint directory not found' in _error(capsys)


@pytest.mark.parametrize('flags, message', [
    (['--seq', '0'], 'seq must be an integer >= 1, got 0'),
    (['--batch', '0'], 'batch must be an integer >= 1, got 0'),
    (['--batch', '-4'], 'batch must be an integer >= 1, got -4'),
    (['--devices', '0'], 'devices must be an integer >= 1, got 0'),
    (['--images', '-1'], 'images must be an integer >= 0, got -1'),
    (['--image-size', '0'], '--image-size must be an integer >= 14, got 0'),
    (['--config', 'nowhere.json'], 'nowhere.json'),
    (['--mesh', 'data=-1,fsdp=4'], 'with --devices'),
])
def test_plan_refuses_values_instead_of_defaulting(capsys, flags, message):
  assert cli.main(['plan'] + flags) == 2
  err = capsys.readouterr().err
  assert err.startswith('qwenvl-jax plan: error: ') and message in err and err.count('\n') == 1


def test_bare_plan_works(capsys):
  """The default mesh data=-1 takes this machine's device count."""
  import jax
  assert cli.main(['plan']) == 0
  assert f'({jax.device_count()} devices)' in capsys.readouterr().out


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
