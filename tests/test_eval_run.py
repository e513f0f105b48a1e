"""`qwenvl-eval run` on a tiny random checkpoint with the real vocabulary: batch independence, resuming a
stopped run, errors naming the data line, multiple choice, captions, and the in-memory `evaluate`."""
import io
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from qwenvl_eval import cli, evaluate, harness, predict, score
from qwenvl_eval.data import DataError
from qwenvl_jax.checkpoint import load_pretrained
from qwenvl_jax.params import params_to_hf
from qwenvl_jax.tokenizer import QwenVLTokenizer
from test_chat import random_params, tiny_chat_config

IMAGES = ('poster.jpg', 'menu.jpg', 'radar.png')
REFCOCO = [{'image': im, 'sent': s, 'bbox': [10.5, 20, 100, 200.25], 'width': 300, 'height': 400}
           for im, s in [('poster.jpg', 'the red word'), ('menu.jpg', 'a dish'), ('radar.png', 'the chart'),
                         ('poster.jpg', 'the top left corner of the poster'), ('menu.jpg', 'prices')]]
GQA = [{'image': im, 'question': q, 'question_id': 100 + i, 'answer': a}
       for i, (im, q, a) in enumerate([('poster.jpg', 'What color is it?', 'red'),
                                       ('menu.jpg', 'Is it a menu?', 'yes'),
                                       ('radar.png', 'What is shown in the chart, if anything?', 'radar')])]
SCIENCEQA = [{'image': im, 'hint': h, 'question': q, 'choices': c, 'answer': a}
             for im, h, q, c, a in [('poster.jpg', '', 'Which word?', ['red', 'blue', 'green'], 0),
                                    ('radar.png', 'A chart.', 'Which kind?', ['radar', 'bar'], 1),
                                    ('menu.jpg', None, 'What is it?', ['menu', 'map', 'book', 'toy'], 2)]]


def _jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


@pytest.fixture(scope='module')
def world(tmp_path_factory, golden_dir):
  root = tmp_path_factory.mktemp('eval')
  cfg = tiny_chat_config()
  (root / 'ckpt').mkdir()
  save_file(dict(params_to_hf(random_params(cfg, seed=1), cfg)), str(root / 'ckpt' / 'model.safetensors'))
  (root / 'ckpt' / 'config.json').write_text(json.dumps(cfg.to_dict()))
  (root / 'img').mkdir()
  for name in IMAGES:
    shutil.copy(golden_dir / 'img' / name, root / 'img' / name)
  _jsonl(root / 'refcoco.jsonl', REFCOCO)
  _jsonl(root / 'gqa.jsonl', GQA)
  _jsonl(root / 'scienceqa.jsonl', SCIENCEQA)
  return root


@pytest.fixture(scope='module')
def loaded(world, vocab_file):
  model, params = load_pretrained(world / 'ckpt')
  return model, params, QwenVLTokenizer(vocab_file, image_span_length=model.config.vision.n_queries)


def _run(loaded, world, task, data, out, **kw):
  model, params, tok = loaded
  return harness.run(task, model, params, tok, world / data, image_root=world / 'img', out_dir=world / out,
                     progress=False, **kw)


def _files(world, out):
  return {name: (world / out / name).read_text() for name in ('predictions.jsonl', 'predictions.json',
                                                              'metrics.json')}


@pytest.mark.slow  # two CLI runs, each loading and compiling (~60 s on 2 busy cores)
def test_cli_run_batch_4_equals_batch_1(world, vocab_file, capsys):
  """Same predictions and metrics files whatever the batch (5 records: a full batch and a partial one)."""
  for batch in (1, 4):
    argv = ['run', 'refcoco_val', '--ckpt', str(world / 'ckpt'), '--vocab', str(vocab_file),
            '--data', str(world / 'refcoco.jsonl'), '--image-root', str(world / 'img'),
            '--out', str(world / f'ref_b{batch}'), '--batch', str(batch), '--no-progress']
    out = io.StringIO()
    assert cli.main(argv, out=out) == 0
    assert json.loads(out.getvalue()) == {'task': 'refcoco_val', 'metric': 'precision_at_1',
                                          'score': json.loads((world / f'ref_b{batch}' / 'metrics.json')
                                                              .read_text())['score'], 'count': 5}
  assert _files(world, 'ref_b1') == _files(world, 'ref_b4')
  rows = json.loads((world / 'ref_b1' / 'predictions.json').read_text())
  assert [set(r) for r in rows] == [{'answer', 'gt_bbox', 'hw'}] * 5  # the original's merged layout
  assert rows[0]['hw'] == [400, 300] and rows[0]['gt_bbox'] == REFCOCO[0]['bbox']


class _Stop(Exception):
  pass


def test_stopped_run_resumes_to_the_same_metrics(world, loaded, monkeypatch):
  full = _run(loaded, world, 'gqa_testdev', 'gqa.jsonl', 'gqa_full')
  assert full['count'] == 3 and 0 <= full['score'] <= 1
  calls = []
  real = predict.Predictor.__call__

  def stop_after_two_batches(self, records):
    if len(calls) == 2:
      raise _Stop
    calls.append([r.line for r in records])
    return real(self, records)

  monkeypatch.setattr(predict.Predictor, '__call__', stop_after_two_batches)
  with pytest.raises(_Stop):
    _run(loaded, world, 'gqa_testdev', 'gqa.jsonl', 'gqa_resumed')
  own = world / 'gqa_resumed' / 'predictions.jsonl'
  assert [json.loads(x)['line'] for x in own.read_text().splitlines()] == [1, 2]
  with open(own, 'a') as f:  # a kill in the middle of writing a line
    f.write('{"line": 3, "questionId": 10')
  monkeypatch.setattr(predict.Predictor, '__call__', lambda self, records: (
      calls.append([r.line for r in records]), real(self, records))[1])
  again = _run(loaded, world, 'gqa_testdev', 'gqa.jsonl', 'gqa_resumed')
  assert calls == [[1], [2], [3]]  # only the missing record was predicted again
  assert again == full
  assert _files(world, 'gqa_resumed') == _files(world, 'gqa_full')
  assert not (world / 'gqa_resumed' / 'predictions.json.tmp').exists()


def test_rerun_with_other_data_is_refused(world, loaded):
  _jsonl(world / 'gqa_other.jsonl', GQA[:2])
  with pytest.raises(DataError, match='holds predictions of another run'):
    _run(loaded, world, 'gqa_testdev', 'gqa_other.jsonl', 'gqa_full')


@pytest.mark.parametrize('line,want', [
    ('{"image": "poster.jpg", "sent": "x", "bbox": [1, 2, 3], "width": 3, "height": 4}',
     r"line 2: key 'bbox': expected \[x1, y1, x2, y2\]"),
    ('{"image": "poster.jpg", "bbox": [1, 2, 3, 4], "width": 3, "height": 4}', "line 2: key 'sent': missing"),
    ('{"image": "poster.jpg", ', 'line 2: not valid JSON'),
    ('["poster.jpg"]', 'line 2: expected a JSON object'),
    ('{"image": "gone.jpg", "sent": "x", "bbox": [1, 2, 3, 4], "width": 3, "height": 4}',
     "line 2: image 'gone.jpg' not found under the image root"),
    ('{"image": "../refcoco.jsonl", "sent": "x", "bbox": [1, 2, 3, 4], "width": 3, "height": 4}',
     'line 2: image .* points outside'),
])
def test_bad_lines_are_reported_with_their_number(world, loaded, line, want):
  (world / 'bad.jsonl').write_text(json.dumps(REFCOCO[0]) + '\n' + line + '\n')
  with pytest.raises(DataError, match=want):
    _run(loaded, world, 'refcoco_val', 'bad.jsonl', 'bad_out')


def test_undecodable_image_is_reported_with_its_line(world, loaded):
  (world / 'img' / 'broken.jpg').write_bytes(b'not a jpeg')
  _jsonl(world / 'broken.jsonl', [REFCOCO[0], {**REFCOCO[0], 'image': 'broken.jpg'}])
  with pytest.raises(DataError, match=r'broken.jsonl: line 2: cannot decode image'):
    _run(loaded, world, 'refcoco_val', 'broken.jsonl', 'broken_out', batch_size=2)


@pytest.mark.slow  # compiles the model twice (~35 s on 2 busy cores)
def test_multiple_choice_picks_the_lowest_mean_loss_option(world, loaded):
  """A batch of 3 records (9 option rows, left-padded) chooses as each record's options scored alone."""
  model, params, tok = loaded
  metrics = _run(loaded, world, 'scienceqa_img', 'scienceqa.jsonl', 'sqa', batch_size=3)
  rows = json.loads((world / 'sqa' / 'predictions.json').read_text())
  assert [r['answer'] for r in rows] == [d['answer'] for d in SCIENCEQA]
  assert metrics['score'] == np.mean([r['prediction'] == r['answer'] for r in rows])
  import jax
  import jax.numpy as jnp
  from qwenvl_jax.model import lm_loss
  from qwenvl_jax.preprocess import preprocess_images
  from qwenvl_eval.data import Record
  from qwenvl_eval.tasks import TASKS
  d = SCIENCEQA[2]  # 4 options, the hint null -> 'N/A'
  prompt = tok.encode(predict.prompt_text(TASKS['scienceqa_img'], Record(1, d['image'], d)))
  assert 'Context: N/A' in tok.decode(prompt)
  ids = jnp.asarray([prompt + tok.encode(' ' + letter) for letter in 'ABCD'])  # one length: no padding
  pixels = preprocess_images([world / 'img' / d['image']] * 4, model.config.vision.image_size)
  forward = jax.jit(lambda p, i, x: model.apply({'params': p}, i, x))  # every position's logits
  logits = jnp.pad(forward(params, ids[:, :-1], pixels), ((0, 0), (0, 1), (0, 0)))
  last = jnp.zeros(ids.shape[1:], bool).at[-1].set(True)
  losses = [float(lm_loss(logits[k:k + 1], ids[k:k + 1], last[None])) for k in range(4)]
  assert rows[2]['prediction'] == int(np.argmin(losses))


def test_evaluate_in_memory_for_grounding(world, loaded):
  """The API `make demo` calls: records as dicts, metrics and the original's rows back."""
  model, params, tok = loaded
  got = evaluate('refcoco_val', model, params, tok, REFCOCO[:2], image_root=world / 'img', batch_size=2)
  assert [(r['gt_bbox'], r['hw']) for r in got.predictions] == [(d['bbox'], [400, 300]) for d in REFCOCO[:2]]
  assert all(isinstance(r['answer'], str) for r in got.predictions)
  assert got.metrics == {**score('refcoco_val', got.predictions), 'count': 2}
  with pytest.raises(DataError, match=r"records\[1\]: key 'bbox': missing"):
    evaluate('refcoco_val', model, params, tok, [REFCOCO[0], {'image': 'poster.jpg', 'sent': 'x'}],
             image_root=world / 'img')


def test_caption_run_scores_cider_against_the_data_file(world, loaded):
  """Captions read the original's COCO-format file: its images are the records, its captions the refs."""
  if shutil.which('java') is None:
    pytest.skip('CIDEr needs Java (pycocoevalcap runs the Stanford tokenizer jar); no java on PATH')
  pytest.importorskip('pycocoevalcap')
  coco = {'images': [{'id': i, 'image': im} for i, im in enumerate(IMAGES, 7)],
          'annotations': [{'image_id': i, 'id': 2 * i + k, 'caption': c}
                          for i in range(7, 10) for k, c in enumerate(['A red poster.', 'A chart on a wall.'])]}
  (world / 'captions.json').write_text(json.dumps(coco))
  metrics = _run(loaded, world, 'flickr30k', 'captions.json', 'captions', batch_size=2)
  rows = json.loads((world / 'captions' / 'predictions.json').read_text())
  assert [r['image_id'] for r in rows] == [7, 8, 9] and all(isinstance(r['caption'], str) for r in rows)
  assert metrics == {**score('flickr30k', rows, coco), 'count': 3}
  del coco['images'][1]['image']
  (world / 'captions.json').write_text(json.dumps(coco))
  with pytest.raises(DataError, match=r"captions.json: images\[1\]: key 'image': missing"):
    _run(loaded, world, 'flickr30k', 'captions.json', 'captions_bad')


def test_vqa_score_run_needs_the_annotation_file(world, loaded):
  with pytest.raises(DataError, match='pass --annotations'):
    _run(loaded, world, 'vqav2_val', 'gqa.jsonl', 'vqa_out')


def test_missing_or_unreadable_data_file_is_named(tmp_path):
  from qwenvl_eval.data import read_records
  from qwenvl_eval.tasks import TASKS
  with pytest.raises(DataError, match='gone.jsonl: data file not found'):
    read_records(TASKS['refcoco_val'], tmp_path / 'gone.jsonl')
  with pytest.raises(DataError, match='gone.json: file not found'):
    read_records(TASKS['flickr30k'], tmp_path / 'gone.json')
  (tmp_path / 'empty.jsonl').write_text('\n')
  with pytest.raises(DataError, match='empty.jsonl: holds no records'):
    read_records(TASKS['refcoco_val'], tmp_path / 'empty.jsonl')
