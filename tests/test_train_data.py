"""Training data: each format's tokens and loss mask, truncation around image spans, the loader."""
import json
import random

import numpy as np
import pytest

from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.model import check_image_spans
from train import world
from train.data import Encoder, format_box, truncate
from train.loader import LoaderConfig
from train.validate import make_loader, read_records

from conftest import SHORT_SPAN as SPAN


def _parts(tok, ex):
  """(text without loss, text with loss), each decoded from its tokens in order."""
  return tok.decode(ex.ids[~ex.target]), tok.decode(ex.ids[ex.target])


def test_caption_format(tok):
  ex = Encoder(tok, 'caption')({'image': 'a.png', 'caption': 'two red circles'})
  expected = tok.encode('<img>a.png</img>') + tok.encode('two red circles') + [tok.eod_id]
  assert ex.ids.tolist() == expected
  assert ex.target.tolist() == [False] * (SPAN + 2) + [True] * (len(expected) - SPAN - 2)
  assert ex.images == ('a.png',)
  assert _parts(tok, ex) == ('<img>a.png</img>', 'two red circles<|endoftext|>')


MULTITASK = [
    ({'task': 'caption', 'image': 'a.png', 'caption': 'a dog.'},
     '<img>a.png</img>Generate the caption in English:', ' a dog.'),
    ({'task': 'vqa', 'image': 'a.png', 'question': 'What is it?', 'answer': 'a dog'},
     '<img>a.png</img> What is it? Answer:', ' a dog'),
    ({'task': 'caption_grounding', 'image': 'a.png',
      'caption': '<ref>a dog</ref><box>(1,2),(3,4)</box> runs'},
     '<img>a.png</img>Generate the caption in English with grounding:',
     ' <ref>a dog</ref><box>(1,2),(3,4)</box> runs'),
    ({'task': 'ref_grounding', 'image': 'a.png', 'ref': 'the dog', 'box': [10, 20, 300, 999]},
     '<img>a.png</img><ref>the dog</ref>', '<box>(10,20),(300,999)</box>'),
    ({'task': 'grounded_caption', 'image': 'a.png', 'box': [0, 0, 500, 500], 'caption': 'a brown dog'},
     '<img>a.png</img><ref>This</ref><box>(0,0),(500,500)</box> is', ' a brown dog'),
    ({'task': 'ocr', 'image': 'a.png', 'text': 'OPEN 24 HOURS'}, '<img>a.png</img>OCR:', ' OPEN 24 HOURS'),
    ({'task': 'text', 'text': 'Plain text, all of it learned.'}, '', 'Plain text, all of it learned.'),
]


@pytest.mark.parametrize('record,prompt,answer', MULTITASK, ids=[r['task'] for r, _, _ in MULTITASK])
def test_multitask_formats(tok, record, prompt, answer):
  ex = Encoder(tok, 'multitask')(record)
  no_loss, loss = _parts(tok, ex)
  if prompt:
    assert (no_loss, loss) == (prompt, answer + '<|endoftext|>')
    assert ex.ids.tolist() == tok.encode(prompt) + tok.encode(answer) + [tok.eod_id]
  else:  # text only: everything but the first token (nothing predicts it) is learned
    assert ex.target.tolist() == [False] + [True] * (len(ex.ids) - 1)
    assert tok.decode(ex.ids) == answer + '<|endoftext|>'
  assert ex.images == (('a.png',) if 'image' in record else ())


CHAT = {'id': 'x', 'conversations': [
    {'from': 'user', 'value': 'Picture 1: <img>a.png</img>\nWhat is this?'},
    {'from': 'assistant', 'value': 'A dog.'},
    {'from': 'user', 'value': 'Where?'},
    {'from': 'assistant', 'value': '<ref>the dog</ref><box>(1,2),(3,4)</box>'},
]}


def _chat_reference(tok, conversations, official):
  """finetune.py's preprocess written out piece by piece: (ids, labelled) pairs."""
  S, E, nl = tok.im_start_id, tok.im_end_id, tok.encode('\n')
  pieces = [([S], official), (tok.encode('system') + nl + tok.encode('You are a helpful assistant.'), False),
            ([E], official), (nl, official)]
  for turn in conversations:
    content = tok.encode(turn['value'])
    is_assistant = turn['from'] == 'assistant'
    pieces += [([S], official), (tok.encode(turn['from']) + nl, False), (content, is_assistant),
               ([E], official or is_assistant), (nl, official)]
  ids = [i for p, _ in pieces for i in p]
  labels = [lab for p, lab in pieces for _ in p]
  labels[0] = False
  return ids, labels


@pytest.mark.parametrize('labels', ['official', 'assistant'])
def test_chat_format_matches_official_preprocess(tok, labels):
  ex = Encoder(tok, 'chat', labels)(CHAT)
  ids, expected = _chat_reference(tok, CHAT['conversations'], labels == 'official')
  assert ex.ids.tolist() == ids
  assert ex.target.tolist() == expected
  assert ex.images == ('a.png',)
  text = tok.decode(ex.ids)
  assert text.startswith('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n')
  learned = tok.decode(ex.ids[ex.target])
  if labels == 'assistant':
    assert learned == 'A dog.<|im_end|><ref>the dog</ref><box>(1,2),(3,4)</box><|im_end|>'
  else:
    assert 'A dog.<|im_end|>\n' in learned and 'What is this' not in learned


def test_chat_drops_a_leading_assistant_turn(tok):
  record = {'conversations': [{'from': 'assistant', 'value': 'Hello!'}] + CHAT['conversations'][:2]}
  assert Encoder(tok, 'chat')(record).ids.tolist() == _chat_reference(tok, CHAT['conversations'][:2], True)[0]


@pytest.mark.parametrize('fmt,record,message', [
    ('caption', {'image': 'a.png'}, "missing field 'caption'"),
    ('multitask', {'task': 'detect', 'image': 'a.png'}, "unknown task 'detect'"),
    ('multitask', {'task': 'ref_grounding', 'image': 'a.png', 'ref': 'x', 'box': [1, 2, 3, 1000]},
     'box must be'),
    ('multitask', {'task': 'vqa', 'image': 'a.png', 'question': 3, 'answer': 'x'},
     "'question' must be a string"),
    ('chat', {'conversations': [{'from': 'human', 'value': 'hi'}]}, 'needs "from"'),
    ('chat', {'conversations': []}, 'non-empty list'),
    ('chat', {'conversations': [{'from': 'user', 'value': '<img>a.png</img><img>b.png</img>'}]}, '2 images'),
    ('caption', {'image': 'a/very/long/path/to/an/image.png', 'caption': 'x'}, 'longer than the image span'),
])
def test_bad_records_name_the_record(tok, fmt, record, message):
  with pytest.raises(ValueError, match='record 3') as e:
    Encoder(tok, fmt, max_images=1).check(record, 'train.json record 3')
  assert message in str(e.value)


def test_read_records(tmp_path):
  (tmp_path / 'a.json').write_text(json.dumps([{'x': 1}, {'x': 2}]))
  (tmp_path / 'a.jsonl').write_text('{"x": 1}\n\n{"x": 2}\n')
  assert read_records(tmp_path / 'a.json') == ([{'x': 1}, {'x': 2}], None)
  assert read_records(tmp_path / 'a.jsonl') == ([{'x': 1}, {'x': 2}], [1, 3])  # line numbers
  (tmp_path / 'bad.json').write_text('[{"x": 1},')
  with pytest.raises(ValueError, match='bad.json: not valid JSON'):
    read_records(tmp_path / 'bad.json')
  (tmp_path / 'bad.jsonl').write_text('{"x": 1}\n{"x": \n{"x": 2}\n[1,\n')
  with pytest.raises(ValueError, match='2 problem') as e:  # every bad line at once
    read_records(tmp_path / 'bad.jsonl')
  assert 'line 2: not valid JSON' in str(e.value) and 'line 4: not valid JSON' in str(e.value)
  (tmp_path / 'obj.json').write_text('{"x": 1}')
  with pytest.raises(ValueError, match='a JSON list of records'):
    read_records(tmp_path / 'obj.json')
  with pytest.raises(FileNotFoundError, match='data file not found'):
    read_records(tmp_path / 'missing.json')


def test_truncation_never_cuts_an_image_span(tok):
  text = 'Picture 1: <img>a.png</img>\nPicture 2: <img>b.png</img>\nWhat differs between them?'
  ex = Encoder(tok, 'multitask')({'task': 'text', 'text': text})
  config = QwenVLConfig().replace(vision={'n_queries': SPAN})
  starts = np.flatnonzero(ex.ids == tok.img_start_id)
  ends = np.flatnonzero(ex.ids == tok.img_end_id)
  for max_len in range(1, len(ex.ids) + 2):
    cut = truncate(ex, max_len, tok.img_start_id, tok.img_end_id)
    assert len(cut.ids) <= max_len
    assert check_image_spans(cut.ids[None], config) == len(cut.images)  # whole spans only
    assert cut.images == ex.images[:len(cut.images)]
    inside = [s for s, e in zip(starts, ends) if s < max_len <= e]
    assert len(cut.ids) == (inside[0] if inside else min(max_len, len(ex.ids)))
  # A cut inside the second span keeps the first image and drops the second.
  mid = int(starts[1]) + 3
  cut = truncate(ex, mid, tok.img_start_id, tok.img_end_id)
  assert cut.images == ('a.png',) and len(cut.ids) == starts[1]


def test_box_format():
  assert format_box([0, 5, 999, 120]) == '<box>(0,5),(999,120)</box>'
  for bad in ([0, 0, 0], [0, 0, 0, 1000], [-1, 0, 0, 0], [0.5, 0, 0, 0], 'x'):
    with pytest.raises(ValueError, match='box must be'):
      format_box(bad)


@pytest.fixture(scope='module')
def small_world(tmp_path_factory, tok):
  root = tmp_path_factory.mktemp('world')
  scenes, _ = world.make_world(root, 40, 0, seed=1, cfg=world.WorldConfig(size=56, grid=3, max_objects=3))
  records = world.chat_records(scenes, random.Random(0))
  return root, records


def _loader(tok, root, records, index=0, count=1, seed=0, batch=8):
  cfg = LoaderConfig(batch_size=batch, seq_buckets=(64, 96), target_step=8, max_images=1, image_size=28,
                     seed=seed, window=2)
  return make_loader(records, tok, 'chat', 'official', cfg, root, index, count)[0]


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_loader_batches_are_valid(tok, small_world):
  root, records = small_world
  loader = _loader(tok, root, records)
  encoder = Encoder(tok, 'chat')
  lengths = {}
  for r in records:
    ex = encoder(r)
    lengths.setdefault(len(ex.ids), []).append(ex)
  for k in range(loader.batches_per_epoch + 2):  # runs into the second epoch
    batch = loader.batch(k)
    b, t = batch['input_ids'].shape
    assert b == 8 and t in (64, 96)
    n = batch['targets'].shape[1]
    assert n % 8 == 0 and n <= t
    assert batch['pixel_values'].shape == (8, 1, 28, 28, 3)
    for r in range(b):
      real = int(batch['attention_mask'][r].sum())
      ids = batch['input_ids'][r, :real]
      assert np.all(batch['attention_mask'][r, real:] == 0)
      ex = next(e for e in lengths[real] if np.array_equal(e.ids, ids))  # an encoded record, whole
      pos = batch['targets'][r][batch['target_mask'][r] > 0]
      np.testing.assert_array_equal(pos + 1, np.flatnonzero(ex.target))
      assert np.abs(batch['pixel_values'][r, 0]).sum() > 0  # the image is loaded into the row's slot


def test_loader_is_deterministic_and_resumes(tok, small_world):
  root, records = small_world
  a, b = _loader(tok, root, records), _loader(tok, root, records)
  first = [batch for _, batch in zip(range(7), a)]
  state = a.state()
  assert state['next_batch'] == 7
  b.restore(state)
  resumed = next(iter(b))
  assert _same(resumed, next(iter(a)))
  assert _same(first[2], _loader(tok, root, records).batch(2))
  other = _loader(tok, root, records, seed=1)
  assert not all(_same(x, other.batch(k)) for k, x in enumerate(first))
  with pytest.raises(ValueError, match='seed=0.*seed=1'):
    other.restore(state)
  # Every record appears once per epoch (batches_per_epoch * batch_size records are used).
  epoch = [a.batch(k) for k in range(a.batches_per_epoch)]
  seen = [tuple(r[m > 0]) for x in epoch for r, m in zip(x['input_ids'], x['attention_mask'])]
  assert len(set(seen)) == len(seen) == a.batches_per_epoch * 8


def test_loader_shards_rows_over_processes(tok, small_world):
  root, records = small_world
  whole = _loader(tok, root, records)
  halves = [_loader(tok, root, records, index=i, count=2) for i in range(2)]
  for k in (0, 3):
    parts = [h.batch(k) for h in halves]
    joined = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    assert _same(joined, whole.batch(k))
    assert parts[0]['input_ids'].shape[0] == 4


def test_loader_refuses_too_little_data(tok, small_world):
  root, records = small_world
  with pytest.raises(ValueError, match='fewer than one batch'):
    _loader(tok, root, records[:3])
  with pytest.raises(ValueError, match='record 1'):
    _loader(tok, root, [records[0], {'conversations': 'nope'}] + records[2:])

