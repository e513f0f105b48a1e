"""Metrics against the golden outputs of the original evaluation code (../shared/golden/eval), per item
and overall, through the library and through `qwenvl-eval score`; plus the inputs they refuse."""
import io
import json
import shutil

import pytest

from qwenvl_eval import cli, scoring
from qwenvl_eval.metrics import anls, cider, exact, grounding, relaxed, vqa
from qwenvl_eval.metrics.common import MetricInputError

TOL = 1e-9


@pytest.fixture(scope='module')
def golden_eval(golden_dir):
  def load(name):
    return json.loads((golden_dir / 'eval' / f'{name}.json').read_text())
  return load


def test_vqa_score_matches_golden(golden_eval):
  d = golden_eval('vqa_score')
  got = vqa.score(d['annotations'], d['results'], d['questions'])
  assert got['overall'] == d['expected']['overall']
  assert got['per_answer_type'] == d['expected']['per_answer_type']
  assert got['per_question'] == d['expected']['per_question']


def test_vqa_normalisation_corner_cases():
  assert vqa.normalize_prediction(' Two dogs.\n') == '2 dogs'
  assert vqa.normalize_prediction('the cat, dog') == 'cat dog'  # ', ' touches a space: deleted
  assert vqa.normalize_prediction('cat,dog') == 'cat dog'  # else a space
  assert vqa.normalize_prediction('1,000') == '1000'  # a digit,digit anywhere deletes every mark
  assert vqa.normalize_prediction('3.5') == '3.5'  # a period before a digit stays
  assert vqa.normalize_prediction('dont know') == "don't know"
  # 10 answers: 'red' x3 -> each leave-one-out subset that drops a 'red' has 2 matches (2/3), else 1
  answers = [{'answer': 'red', 'answer_id': i} for i in range(3)] + [
      {'answer': 'blue', 'answer_id': i} for i in range(3, 10)]
  assert vqa.question_accuracy('Red', answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)


def test_vqa_score_requires_every_question_unless_subset(golden_eval):
  d = golden_eval('vqa_score')
  with pytest.raises(MetricInputError, match='1 unanswered'):
    vqa.score(d['annotations'], d['results'][1:])
  part = vqa.score(d['annotations'], d['results'][:5], subset=True)
  assert list(part['per_question']) == [str(r['question_id']) for r in d['results'][:5]]
  with pytest.raises(MetricInputError, match='1 not annotated'):
    vqa.score(d['annotations'], d['results'] + [{'question_id': -1, 'answer': 'x'}])


def test_anls_matches_golden(golden_eval):
  d = golden_eval('anls')
  got = anls.score(d['gt'], d['submission'])
  assert abs(got['score'] - d['expected']['score']) < TOL
  assert got['per_sample'].keys() == d['expected']['per_sample'].keys()
  for k, v in d['expected']['per_sample'].items():
    assert abs(got['per_sample'][k] - v) < TOL, k


def test_anls_without_gt_file_uses_the_rows_annotations(golden_eval):
  """`run` writes [{questionId, answer, annotation}]; scored without --annotations they are the gt."""
  d = golden_eval('anls')
  answers = {g['questionId']: g['answers'] for g in d['gt']['data']}
  rows = [{**s, 'annotation': answers[s['questionId']]} for s in d['submission']]
  got = scoring.score('docvqa_val', rows)
  assert abs(got['score'] - d['expected']['score']) < TOL


def test_levenshtein():
  assert anls.levenshtein('kitten', 'sitting') == 3
  assert anls.levenshtein('', 'abc') == 3
  assert anls.levenshtein('flaw', 'lawn') == 2


def test_relaxed_accuracy_matches_golden(golden_eval):
  d = golden_eval('relaxed_accuracy')
  got = relaxed.score(d['entries'])
  assert abs(got['relaxed_accuracy'] - d['expected']['relaxed_accuracy']) < TOL
  assert got['per_entry'] == d['expected']['per_entry']


def test_relaxed_accuracy_measures_against_the_answer():
  # The original passes the answer as the target: 100 vs annotation 95 is a 5% change of 100 (correct),
  # 95 vs annotation 100 is 5.26% of 95 (wrong).
  assert relaxed.relaxed_correct('100', '95') and not relaxed.relaxed_correct('95', '100')
  assert not relaxed.relaxed_correct('0', '0.0')  # a zero answer needs string equality


def test_exact_match_and_gqa_match_golden(golden_eval):
  d = golden_eval('exact_match')
  assert abs(exact.score(d['entries'])['accuracy'] - d['expected']['accuracy']) < TOL
  g = golden_eval('gqa')
  got = exact.score(g['entries'], gqa=True)
  assert got['processed_answers'] == g['expected']['processed_answers']
  assert abs(got['accuracy'] - g['expected']['accuracy']) < TOL


def test_grounding_matches_golden(golden_eval):
  d = golden_eval('grounding')
  got = grounding.score(d['items'])
  assert abs(got['precision_at_1'] - d['expected']['precision_at_1']) < TOL
  for mine, want in zip(got['per_item'], d['expected']['per_item'], strict=True):
    assert mine['correct'] == want['correct']
    assert abs(mine['iou'] - want['iou']) < TOL


def test_grounding_box_parsing():
  assert grounding.parse_box('<ref>x</ref><box>(1,2),(3,4)</box> (5,6),(7,8)') == (1, 2, 3, 4)
  assert grounding.parse_box('(1 2),(3,4)') == (0, 0, 0, 0)  # a point without a comma
  assert grounding.parse_box('(1,2,3),(3,4)') == (0, 0, 0, 0)  # three numbers in a point
  assert grounding.parse_box('nothing') == (0, 0, 0, 0)
  # 999 on the grid is the image's far edge
  assert grounding.item_iou('(0,0),(999,999)', [0, 0, 640, 480], [480, 640]) == 1.0


def _java_or_skip():
  if shutil.which('java') is None:
    pytest.skip('CIDEr needs Java (pycocoevalcap runs the Stanford tokenizer jar); no java on PATH')
  pytest.importorskip('pycocoevalcap')


def test_cider_matches_golden(golden_eval):
  _java_or_skip()
  d = golden_eval('caption_cider')
  got = cider.score(d['annotations'], d['results'])
  assert abs(got['CIDEr'] - d['expected']['CIDEr']) < TOL
  assert got['per_image'].keys() == d['expected']['per_image'].keys()
  for k, v in d['expected']['per_image'].items():
    assert abs(got['per_image'][k] - v) < TOL, k


def test_cider_without_java_says_so(golden_eval, monkeypatch):
  pytest.importorskip('pycocoevalcap')
  d = golden_eval('caption_cider')
  monkeypatch.setattr(shutil, 'which', lambda name: None)
  with pytest.raises(RuntimeError, match='CIDEr needs Java'):
    cider.score(d['annotations'], d['results'])


# `qwenvl-eval score` on files in the original's merged layouts: (task, golden file, files to write
# {flag: key}, expected score key path)
CASES = [
    ('vqav2_val', 'vqa_score', {'predictions': 'results', 'annotations': 'annotations',
                                'questions': 'questions'}, ('overall',)),
    ('docvqa_val', 'anls', {'predictions': 'submission', 'annotations': 'gt'}, ('score',)),
    ('chartqa_test_human', 'relaxed_accuracy', {'predictions': 'entries'}, ('relaxed_accuracy',)),
    ('ocrvqa_test', 'exact_match', {'predictions': 'entries'}, ('accuracy',)),
    ('ai2diagram_test', 'exact_match', {'predictions': 'entries'}, ('accuracy',)),
    ('gqa_testdev', 'gqa', {'predictions': 'entries'}, ('accuracy',)),
    ('refcoco_val', 'grounding', {'predictions': 'items'}, ('precision_at_1',)),
    ('flickr30k', 'caption_cider', {'predictions': 'results', 'annotations': 'annotations'}, ('CIDEr',)),
]


@pytest.mark.parametrize('task,name,files,key', CASES, ids=[c[0] for c in CASES])
def test_score_cli_prints_the_golden_figure(task, name, files, key, golden_eval, tmp_path, capsys):
  if name == 'caption_cider':
    _java_or_skip()
  d = golden_eval(name)
  argv = ['score', task]
  for flag, field in files.items():
    (tmp_path / f'{flag}.json').write_text(json.dumps(d[field]))
    argv += [f'--{flag}', str(tmp_path / f'{flag}.json')]
  out = io.StringIO()
  assert cli.main(argv, out=out) == 0
  printed = json.loads(out.getvalue())  # stdout is exactly one JSON object
  want = d['expected']
  for k in key:
    want = want[k]
  assert printed['task'] == task and printed['metric'] == scoring.get_task(task).metric
  assert abs(printed['score'] - want) < TOL


def test_score_reads_json_lines_and_names_bad_lines(golden_eval, tmp_path, capsys):
  items = golden_eval('grounding')['items']
  file = tmp_path / 'p.jsonl'
  file.write_text(''.join(json.dumps({'line': i + 1, **x}) + '\n' for i, x in enumerate(items)))
  out = io.StringIO()
  assert cli.main(['score', 'refcoco_val', '--predictions', str(file)], out=out) == 0
  assert abs(json.loads(out.getvalue())['score'] - golden_eval('grounding')['expected']['precision_at_1']) < TOL
  file.write_text(json.dumps(items[0]) + '\n{"answer": \n')
  assert cli.main(['score', 'refcoco_val', '--predictions', str(file)], out=io.StringIO()) == 1
  assert f'{file}: line 2: not valid JSON' in capsys.readouterr().err
  file.write_text(json.dumps([{'answer': 'x', 'hw': [1, 2]}]))
  assert cli.main(['score', 'refcoco_val', '--predictions', str(file)], out=io.StringIO()) == 1
  assert "items[0] has no 'gt_bbox'" in capsys.readouterr().err


def test_score_needs_the_annotation_file_where_the_metric_does(golden_eval, tmp_path, capsys):
  file = tmp_path / 'p.json'
  file.write_text(json.dumps(golden_eval('vqa_score')['results']))
  assert cli.main(['score', 'vqav2_val', '--predictions', str(file)], out=io.StringIO()) == 1
  assert 'pass --annotations' in capsys.readouterr().err
