"""The demo's pieces that need no training: the grounding world, its records, IoU, finding the vocabulary."""
import random
import shlex

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.grounding import extract_boxes
from qwenvl_jax.tokenizer import QwenVLTokenizer
from train import world
from train.config import load_json
from train.data import Encoder
from train.demo import demo_vocab


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
  root = tmp_path_factory.mktemp('world')
  train, test = world.make_world(root, 12, 3, seed=4, cfg=world.WorldConfig(size=90, grid=3, max_objects=3))
  return root, train, test


def test_boxes_cover_the_drawn_shapes(scenes):
  root, train, test = scenes
  assert len(train) == 12 and len(test) == 3
  for s in train + test:
    assert 2 <= len(s.things) <= 3
    assert len({t.colour for t in s.things}) == len(s.things)  # "the red ..." is unambiguous
    pixels = np.asarray(Image.open(root / s.image).convert('RGB')).astype(int)
    for t in s.things:
      x1, y1, x2, y2 = (int(v / 1000 * 90) for v in t.box)
      below_letter = pixels[y1 + round(0.9 * (y2 - y1)), (x1 + x2) // 2]  # triangles are wide there
      assert np.abs(below_letter - world.COLOURS[t.colour]).max() < 30
      outside = pixels[max(0, y1 - 2), max(0, x1 - 2)]
      assert outside.min() >= 200  # background just outside the box
      assert t.letter in world.LETTERS and len(t.letter) == 1
      assert (letter_area(pixels, t.box, 90).min(-1) > 240).sum() >= 4  # the white letter


def letter_area(pixels, box, size):
  """Where the letter is written: inside every shape, whatever its form."""
  x1, y1, x2, y2 = (int(v / 1000 * size) for v in box)
  h, w = y2 - y1, x2 - x1
  return pixels[y1 + round(0.55 * h):y1 + round(0.8 * h), x1 + round(0.35 * w):x1 + round(0.65 * w)]


def test_letters_can_be_left_out(tmp_path):
  scenes, _ = world.make_world(tmp_path, 4, 0, seed=1, cfg=world.WorldConfig(size=90, letters=''))
  for s in scenes:
    assert all(t.letter == '' for t in s.things) and s.text() == '' and 'marked' not in s.caption()
    pixels = np.asarray(Image.open(tmp_path / s.image).convert('RGB')).astype(int)
    for t in s.things:
      assert (np.abs(letter_area(pixels, t.box, 90) - world.COLOURS[t.colour]).max(-1) < 30).all()


def test_stage2_mix_is_mostly_grounding(scenes):
  _, train, _ = scenes
  shapes = sum(len(s.things) for s in train)
  only = world.multitask_records(train, random.Random(0), other_tasks=0.0)
  assert len(only) == shapes and {r['task'] for r in only} == {'ref_grounding'}
  every = world.multitask_records(train, random.Random(0), other_tasks=1.0)
  assert len(every) == shapes + len(train)
  many = world.multitask_records(train * 20, random.Random(0), other_tasks=1.0)
  assert {r['task'] for r in many} == {'ref_grounding', 'caption', 'vqa', 'ocr', 'caption_grounding',
                                       'grounded_caption'}
  by_image = {s.image: s for s in train}
  for r in many:
    if r['task'] == 'ocr':
      assert r['text'] == by_image[r['image']].text()


def test_records_of_every_stage_are_valid(scenes, vocab_file):
  root, train, _ = scenes
  tok = QwenVLTokenizer(vocab_file, image_span_length=16)
  rng = random.Random(0)
  for fmt, records in [('caption', world.caption_records(train)),
                       ('multitask', world.multitask_records(train, rng)),
                       ('chat', world.chat_records(train, rng))]:
    encoder = Encoder(tok, fmt, max_images=1)
    for i, r in enumerate(records):
      encoder.check(r, f'record {i}')
      ex = encoder(r)
      assert ex.images and (root / ex.images[0]).is_file() and ex.target.any()
  chats = world.chat_records(train, rng)
  grounding = [c for c in chats if c['conversations'][0]['value'].endswith('?')
               and 'Where is' in c['conversations'][0]['value']]
  assert len(grounding) == sum(len(s.things) for s in train)
  by_image = {s.image: s for s in train}
  for c in grounding:
    user, answer = c['conversations'][0]['value'], c['conversations'][1]['value']
    image = user.split('<img>')[1].split('</img>')[0]
    (box,) = extract_boxes(answer)
    thing = next(t for t in by_image[image].things if f'the {t.name}' == box['ref'])
    assert box['box'] == list(thing.box) and thing.name in user
  letters = [c for c in chats if 'What letter' in c['conversations'][0]['value']]
  assert letters
  for c in letters:
    user, answer = c['conversations'][0]['value'], c['conversations'][1]['value']
    image = user.split('<img>')[1].split('</img>')[0]
    (thing,) = [t for t in by_image[image].things if world.letter_question(t) in user]
    assert answer == world.letter_answer(thing) and thing.letter in answer


def test_demo_vocab_from_environment(monkeypatch, vocab_file):
  monkeypatch.setenv('QWENVL_VOCAB', str(vocab_file))
  assert demo_vocab() == vocab_file


def test_demo_config_describes_three_stages():
  demo = load_json('demo')
  assert set(demo['stages']) == {'1', '2', '3'}
  sizes = [demo['stages'][s]['image_size'] for s in '123']
  assert sizes[0] < sizes[1] == sizes[2]
  assert demo['model']['vocab_size'] == 151936


@pytest.mark.slow
def test_demo_end_to_end_leaves_a_chat_checkpoint(tmp_path, monkeypatch, capsys, vocab_file):
  """`make demo` on a tiny budget: three stages, the evaluation, and demo_out/chat loadable for chat."""
  import json

  import qwenvl_jax as qv
  from train.demo import main
  monkeypatch.setenv('QWENVL_VOCAB', str(vocab_file))
  demo = load_json('demo')
  demo['world'].update(train_images=16, test_images=2)
  model = demo['model']
  model.update(num_hidden_layers=1, intermediate_size=256)
  model['visual'].update(layers=1, width=32, heads=2, n_queries=16)
  for stage in demo['stages'].values():
    stage.update(steps=1, warmup_steps=0, batch_size=4)
  demo['eval'].update(batch=2, max_new_tokens=4, save_images=1)
  config = tmp_path / 'tiny.json'
  config.write_text(json.dumps(demo))
  monkeypatch.chdir(tmp_path)  # a relative --out, as `make demo` runs it
  assert main(['--config', str(config), '--out', 'out']) == 0
  printed = capsys.readouterr().out
  assert 'grounding accuracy (refcoco Precision@1, IoU>=0.5, through qwenvl_eval): ' in printed
  assert (tmp_path / 'out' / 'answers' / 'grounding_eval' / 'metrics.json').is_file()
  chat = tmp_path / 'out' / 'chat'
  model, params = qv.load_pretrained(chat)
  assert model.config.vision.n_queries == 16 and model.config.vision.image_size == 84
  assert qv.QwenVLTokenizer.from_pretrained(chat).vocab_file == chat / 'qwen.tiktoken'
  # The printed chat command works as printed.
  command = shlex.split(printed.split('chat with the trained model:')[1].strip().splitlines()[0])
  assert command[:4] == ['qwenvl-jax', 'chat', '--ckpt', 'out/chat']
  from qwenvl_jax import cli
  assert cli.main(command[1:] + ['--max-new-tokens', '2', '--no-compile-cache']) == 0
