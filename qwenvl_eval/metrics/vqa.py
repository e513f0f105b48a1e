"""VQA accuracy (VQAv2, OK-VQA, TextVQA, VizWiz) as the official `VQAEval` computes it.

The prediction is normalised (whitespace, punctuation, number words, articles, contractions); the ten
ground-truth answers get only the punctuation step, and only when they are not all the same. Each of the
ten leave-one-out subsets scores min(1, matches / 3); a question scores their mean. Figures are percent,
rounded to 2 places (`VQAEval(n=2)`), and the overall figure is the rounded mean over questions.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from qwenvl_eval.metrics.common import MetricInputError, as_list

# Spelling variants -> the official contraction. Words are lower-cased before the lookup, so the
# official table's capitalised keys (Id've, Im, Ive) never match; they are left out. "somebody'd" ->
# "somebodyd" is the official table's own entry and kept as is, since scores must match it.
_CONTRACTIONS = """
ain't: aint | aren't: arent | can't: cant | could've: couldve | couldn't: couldnt
couldn't've: couldn'tve couldnt've | didn't: didnt | doesn't: doesnt | don't: dont | hadn't: hadnt
hadn't've: hadnt've hadn'tve | hasn't: hasnt | haven't: havent | he'd: hed | he'd've: hed've he'dve
he's: hes | how'd: howd | how'll: howll | how's: hows | isn't: isnt | it'd: itd | it'd've: itd've it'dve
it'll: itll | let's: let's | ma'am: maam | mightn't: mightnt | mightn't've: mightnt've mightn'tve
might've: mightve | mustn't: mustnt | must've: mustve | needn't: neednt | not've: notve | o'clock: oclock
oughtn't: oughtnt | 'ow's'at: ow's'at 'ows'at 'ow'sat | shan't: shant | she'd've: shed've she'dve
she's: she's | should've: shouldve | shouldn't: shouldnt | shouldn't've: shouldnt've shouldn'tve
somebodyd: somebody'd | somebody'd've: somebodyd've somebody'dve | somebody'll: somebodyll
somebody's: somebodys | someone'd: someoned | someone'd've: someoned've someone'dve
someone'll: someonell | someone's: someones | something'd: somethingd
something'd've: somethingd've something'dve | something'll: somethingll | that's: thats
there'd: thered | there'd've: thered've there'dve | there're: therere | there's: theres | they'd: theyd
they'd've: theyd've they'dve | they'll: theyll | they're: theyre | they've: theyve | 'twas: twas
wasn't: wasnt | we'd've: wed've we'dve | we've: weve | weren't: werent | what'll: whatll
what're: whatre | what's: whats | what've: whatve | when's: whens | where'd: whered | where's: wheres
where've: whereve | who'd: whod | who'd've: whod've who'dve | who'll: wholl | who's: whos
who've: whove | why'll: whyll | why're: whyre | why's: whys | won't: wont | would've: wouldve
wouldn't: wouldnt | wouldn't've: wouldnt've wouldn'tve | y'all: yall | y'all'll: yall'll y'allll
y'all'd've: yall'd've y'alld've y'all'dve | you'd: youd | you'd've: youd've you'dve | you'll: youll
you're: youre | you've: youve
"""
CONTRACTIONS = {variant: canonical.strip()
                for entry in _CONTRACTIONS.replace('\n', ' | ').split('|') if entry.strip()
                for canonical, variants in [entry.split(':')]
                for variant in variants.split()}
NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = frozenset({'a', 'an', 'the'})
PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
               '?', '!')
# The official pattern: its "(?!<=\d)" is a (mistyped) lookahead, so in effect any '.' not followed by a
# digit goes. The official call passes re.UNICODE (32) where `count` goes, so at most 32 are removed.
_PERIOD = re.compile(r'(?!<=\d)(\.)(?!\d)')
_PERIOD_COUNT = int(re.UNICODE)
_DIGIT_COMMA_DIGIT = re.compile(r'(\d)(,)(\d)')


def normalize_punctuation(text: str) -> str:
  """Each mark is deleted when it touches a space (or the text has a digit,digit), else becomes a space."""
  out = text
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  for p in PUNCTUATION:
    out = out.replace(p, '' if delete_all or p + ' ' in text or ' ' + p in text else ' ')
  return _PERIOD.sub('', out, count=_PERIOD_COUNT)


def normalize_digits_articles(text: str) -> str:
  """Lower case, number words to digits, articles dropped, contractions restored."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return ' '.join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_prediction(answer: str) -> str:
  answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
  return normalize_digits_articles(normalize_punctuation(answer))


def question_accuracy(prediction: str, gt_answers: Sequence[Mapping[str, Any]]) -> float:
  """Mean over the leave-one-out subsets of min(1, matches / 3); `gt_answers` are the official dicts."""
  answers = [dict(a) for a in gt_answers]
  if len({a['answer'] for a in answers}) > 1:
    for a in answers:
      a['answer'] = normalize_punctuation(a['answer'])
  pred = normalize_prediction(prediction)
  accs = [min(1.0, sum(1 for other in answers if other != left_out and other['answer'] == pred) / 3)
          for left_out in answers]
  return sum(accs) / len(accs)


def _by_question(annotations: Mapping[str, Any], name: str) -> dict[Any, Mapping[str, Any]]:
  anns = as_list(annotations.get('annotations') if isinstance(annotations, Mapping) else None,
                 f"{name}: 'annotations' (the official VQA annotation layout)")
  out = {}
  for i, ann in enumerate(anns):
    for key in ('question_id', 'answers', 'answer_type'):
      if not isinstance(ann, Mapping) or key not in ann:
        raise MetricInputError(f'{name}: annotations[{i}] has no {key!r}')
    if not ann['answers'] or not all(isinstance(a, Mapping) and isinstance(a.get('answer'), str)
                                     for a in ann['answers']):
      raise MetricInputError(f'{name}: annotations[{i}] needs a list of {{"answer": str}} answers')
    out[ann['question_id']] = ann
  return out


def score(annotations: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
          questions: Mapping[str, Any] | None = None, *, subset: bool = False,
          name: str = 'annotations') -> dict[str, Any]:
  """{'overall', 'per_answer_type', 'per_question'} in percent, as `VQAEval(n=2)`.

  results: [{question_id, answer}] (a later row for the same question wins, as in the official loader).
  As the official loader, the results must answer exactly the annotated questions, unless `subset`: then
  only the answered questions are scored (a partial run). `questions` (the official question file), when
  given, must hold every answered question.
  """
  by_q = _by_question(annotations, name)
  answers: dict[Any, str] = {}
  for i, r in enumerate(as_list(results, 'results')):
    if not isinstance(r, Mapping) or 'question_id' not in r or not isinstance(r.get('answer'), str):
      raise MetricInputError(f'results[{i}]: expected {{"question_id": ..., "answer": str}}, got {r!r}')
    answers[r['question_id']] = r['answer']
  unknown = [q for q in answers if q not in by_q]
  missing = [q for q in by_q if q not in answers]
  if unknown or (missing and not subset):
    raise MetricInputError(f'results do not match the annotated questions: {len(missing)} unanswered '
                           f'(e.g. {missing[:3]}), {len(unknown)} not annotated (e.g. {unknown[:3]})')
  if questions is not None:
    known = {q.get('question_id') for q in as_list(questions.get('questions'), "questions: 'questions'")}
    absent = [q for q in answers if q not in known]
    if absent:
      raise MetricInputError(f'{len(absent)} answered questions are not in the question file (e.g. {absent[:3]})')
  per_q, per_type = {}, {}
  for qid, ann in by_q.items():  # the official order: that of the annotation file
    if qid not in answers:
      continue
    acc = question_accuracy(answers[qid], ann['answers'])
    per_q[qid] = acc
    per_type.setdefault(ann['answer_type'], []).append(acc)
  if not per_q:
    raise MetricInputError('no question to score')
  pct = lambda accs: round(100 * float(sum(accs)) / len(accs), 2)
  return {'overall': pct(list(per_q.values())),
          'per_answer_type': {t: pct(a) for t, a in per_type.items()},
          'per_question': {str(q): round(100 * a, 2) for q, a in per_q.items()}}
