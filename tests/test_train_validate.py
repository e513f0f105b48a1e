"""Training data checked before step 1: every problem of every record at once, and overlong samples."""
import json
import random

import pytest

from train import world
from train.loader import LoaderConfig
from train.validate import MAX_LISTED, DataError, make_loader, read_records, tag_problems

from conftest import SHORT_SPAN as SPAN


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
  root = tmp_path_factory.mktemp('world')
  train, _ = world.make_world(root, 12, 0, seed=2, cfg=world.WorldConfig(size=56, grid=3, max_objects=2))
  return root, train


def _cfg(buckets=(96,), batch=4):
  return LoaderConfig(batch_size=batch, seq_buckets=buckets, target_step=8, max_images=1, image_size=28,
                      seed=0)


def _load(tok, root, records, fmt='chat', lines=None, buckets=(96,), on_overlong='truncate'):
  return make_loader(records, tok, fmt, 'assistant', _cfg(buckets), root, source='train.jsonl',
                     lines=lines, on_overlong=on_overlong)


def _chat(user, answer='<ref>it</ref><box>(1,2),(3,4)</box>'):
  return {'conversations': [{'from': 'user', 'value': user}, {'from': 'assistant', 'value': answer}]}


def test_every_problem_is_listed_before_training(tok, scenes, tmp_path):
  """A missing image in the LAST record used to crash the run at the step that loaded it; now it and every
  other problem of the file are listed at once, by record, line, field and reason."""
  root, train = scenes
  good = world.chat_records(train, random.Random(0))
  (root / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  bad = [
      _chat('Picture 1: <img>1.png</img>\nWhere?', '<ref>it</ref><box>(1,2),(3,1000)</box>'),  # box range
      _chat('Picture 1: <img>1.png</img>\n<ref>unclosed?'),
      _chat('Picture 1: <img>1.png</img>\nWhere?', '<ref>a<box>(1,2),(3,4)</box></ref>'),  # nested
      _chat('Picture 1: <img>1.png</img>\nWhere?', '<box>(1,2)</box>'),  # one corner
      _chat('Picture 1: <img>broken.png</img>\nWhat is it?'),  # a header PIL cannot read
      _chat('Picture 1: <img>http://a/b.png</img>\nWhat is it?'),
      {'conversations': [{'from': 'user', 'value': 7}]},  # a field of the wrong type
      _chat('Picture 1: <img>nowhere.png</img>\nWhat is it?'),  # the last record: a missing image
  ]
  records = good + bad
  lines = [10 + i for i in range(len(records))]
  with pytest.raises(DataError) as e:
    _load(tok, root, records, lines=lines)
  message = str(e.value)
  assert f'{len(bad)} problem(s) in {len(records)} records' in message
  n = len(good)
  expected = [
      (n, 'conversations[1].value', 'outside [0, 1000)'),
      (n + 1, 'conversations[0].value', '<ref> is never closed'),
      (n + 2, 'conversations[1].value', '<box> inside <ref>'),
      (n + 3, 'conversations[1].value', 'is not (x1,y1),(x2,y2)'),
      (n + 4, 'conversations[0].value', 'cannot read image broken.png'),
      (n + 5, 'conversations[0].value', 'is a URL'),
      (n + 6, '', '"value" must be a string'),
      (n + 7, 'conversations[0].value', 'image not found: nowhere.png'),
  ]
  listed = message.splitlines()[1:]
  assert len(listed) == len(expected)
  for line, (i, field, reason) in zip(listed, expected):
    assert line.startswith(f'  train.jsonl record {i} (line {10 + i}): {field}') and reason in line, line


def test_multitask_and_caption_records_are_checked_too(tok, scenes):
  root, train = scenes
  records = world.multitask_records(train, random.Random(0))
  records[3] = {'task': 'caption_grounding', 'image': '1.png',
                'caption': '<ref>x</ref><box>(5,5),(2000,9)</box>'}
  records[5] = {'task': 'ref_grounding', 'image': 'missing.png', 'ref': 'x', 'box': [1, 2, 3, 4]}
  with pytest.raises(DataError) as e:
    _load(tok, root, records, fmt='multitask')
  lines = str(e.value).splitlines()[1:]
  assert 'record 3: caption: <box>(5,5),(2000,9)</box> has coordinates outside' in lines[0]
  assert 'record 5: image: image not found: missing.png' in lines[1]
  caption = world.caption_records(train)
  caption[-1]['image'] = 'gone.png'
  with pytest.raises(DataError, match=rf'record {len(caption) - 1}: image: image not found: gone.png'):
    _load(tok, root, caption, fmt='caption')


def test_listing_is_capped(tok, scenes):
  root, train = scenes
  records = world.chat_records(train, random.Random(0))
  records += [_chat(f'Picture 1: <img>m{i}.png</img>\nWhat?') for i in range(MAX_LISTED + 7)]
  with pytest.raises(DataError) as e:
    _load(tok, root, records)
  lines = str(e.value).splitlines()
  assert len(lines) == 1 + MAX_LISTED + 1 and lines[-1] == '  ... and 7 more'
  assert len(e.value.problems) == MAX_LISTED + 7


def test_tag_problems():
  assert tag_problems('<img>a<ref>.png</img><ref>x</ref><box>(0,0),(999,999)</box> and <quad>'
                      '(1,2),(3,4),(5,6),(7,8)</quad>') == []
  assert tag_problems('</box>') == ['</box> without an open <box>']
  assert tag_problems('<box>(1,2),(3,x)</box>')[0].endswith('is not (x1,y1),(x2,y2) with integer coordinates')
  assert tag_problems('<img>a.png') == ['<img> is never closed']


def _long_chat(question_words, answer):
  return _chat('Picture 1: <img>1.png</img>\n' + ' '.join(['word'] * question_words), answer)


@pytest.mark.parametrize('policy', ['truncate', 'skip', 'error'])
def test_overlong_samples(tok, scenes, policy):
  """A sample over the longest bucket: its answer used to be cut away silently, so it trained on nothing."""
  root, train = scenes
  records = world.chat_records(train, random.Random(0))[:8]
  lost = _long_chat(150, 'The answer.')  # the answer lies beyond the cut
  kept = _chat('Picture 1: <img>1.png</img>\nWhere?', ' '.join(['long answer'] * 60))  # cut inside it
  records += [lost, kept]
  if policy == 'error':
    with pytest.raises(DataError) as e:
      _load(tok, root, records, on_overlong=policy)
    assert e.value.problems[0].where.endswith('record 8') and 'over the longest bucket (96)' in str(e.value)
    assert len(e.value.problems) == 2
    return
  loader, report = _load(tok, root, records, on_overlong=policy)
  assert [s['record'] for s in report.skipped] == ([8] if policy == 'truncate' else [8, 9])
  assert report.truncated == ((9,) if policy == 'truncate' else ())
  assert ('leaves no token to train on' if policy == 'truncate' else 'on_overlong=skip') in \
      report.skipped[0]['reason']
  assert len(loader.source) == len(report.used) == len(records) - len(report.skipped)
  summary = report.summary(96, 'out/skipped.jsonl')
  assert f'{len(report.truncated)} truncated to the longest bucket (96 tokens), {len(report.skipped)} ' \
         'skipped (listed in out/skipped.jsonl)' in summary
  batches = iter(loader)
  seen = [(next(batches), loader.last_truncated)[1] for _ in range(12)]  # truncated rows of each batch
  assert (sum(seen) > 0 and max(seen) == 1) if policy == 'truncate' else sum(seen) == 0


def test_a_sample_without_targets_is_refused(tok, scenes):
  root, train = scenes
  records = world.chat_records(train, random.Random(0))[:8]
  records.append({'conversations': [{'from': 'user', 'value': 'Picture 1: <img>1.png</img>\nhello'}]})
  with pytest.raises(DataError, match='record 8: no token to train on'):
    _load(tok, root, records)


def test_records_that_are_not_objects(tok, scenes, tmp_path):
  root, train = scenes
  path = tmp_path / 'data.jsonl'
  good = world.chat_records(train, random.Random(0))[:8]
  path.write_text('\n'.join(json.dumps(r) for r in good[:4] + [[1, 2]] + good[4:]) + '\n')
  records, lines = read_records(path)
  with pytest.raises(DataError, match=r'record 4 \(line 5\): not a JSON object'):
    make_loader(records, tok, 'chat', 'assistant', _cfg(), root, source=str(path), lines=lines)
