"""The benchmarks: prompt, decoding budget, metric and input layout of each, as the original's
`eval_mm/evaluate_*.py` define them.

Families and their data files (one JSON object per line unless said otherwise):
  grounding        {"image", "sent", "bbox" [x1, y1, x2, y2] pixels, "width", "height"}
  vqa              {"image", "question", "question_id", "answer"}  ("answer": the annotation(s); not read
                   for VQA score, which takes the official annotation file)
  caption          the original's COCO-format JSON: {"images": [{"id", "image"}], "annotations": [...]}
  multiple_choice  {"image", "hint", "question", "choices" [str], "answer" (index of the right choice)}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

GROUNDING_PROMPT = '<img>{}</img><ref>{}</ref><box>'
VQA_PROMPT = '<img>{}</img>{} Answer:'
CAPTION_PROMPT = '<img>{}</img>Describe the image in English:'
CHOICE_PROMPT = '<img>{}</img>Context: {}\nQuestion: {}\nOptions: {}\nAnswer:'
CHOICE_LETTERS = 'ABCDE'


@dataclasses.dataclass(frozen=True)
class Task:
  """One benchmark. `metric` names a function of `qwenvl_eval.scoring`; `id_key` is the key under which
  the original's merged predictions file holds the question id (None: it holds none)."""
  name: str
  family: str  # grounding | vqa | caption | multiple_choice
  metric: str  # precision_at_1 | vqa_score | anls | relaxed_accuracy | accuracy | gqa_accuracy | cider | choice_accuracy
  prompt: str
  max_new_tokens: int = 0  # 0: no generation (multiple choice scores the options' losses)
  min_new_tokens: int = 0
  strip: bool = True  # the original strips VQA answers and captions, not grounding answers
  id_key: str | None = None
  source: str = ''  # where the data files come from (README)

  def __post_init__(self):
    if self.family not in ('grounding', 'vqa', 'caption', 'multiple_choice'):
      raise ValueError(f'task {self.name}: unknown family {self.family!r}')

  def replace(self, **changes: Any) -> 'Task':
    return dataclasses.replace(self, **changes)

  @property
  def needs_annotations(self) -> bool:
    """Scoring reads an official annotation file besides the predictions."""
    return self.metric == 'vqa_score'


_QWEN = 'https://ofasys-wlcb.oss-cn-wulanchabu.aliyuncs.com/Qwen-VL/evaluation/'


def _grounding(name: str, folder: str) -> Task:
  return Task(name, 'grounding', 'precision_at_1', GROUNDING_PROMPT, 28, 10, strip=False,
              source=f'{_QWEN}{folder}/{name}.jsonl; COCO train2014 images')


def _vqa(name: str, metric: str, max_new: int, id_key: str | None, source: str) -> Task:
  return Task(name, 'vqa', metric, VQA_PROMPT, max_new, 1, id_key=id_key, source=source)


_TASKS = [
    *[_grounding(f'refcoco_{s}', 'refcoco') for s in ('val', 'testA', 'testB')],
    *[_grounding(f'refcoco+_{s}', 'refcoco+') for s in ('val', 'testA', 'testB')],
    *[_grounding(f'refcocog_{s}', 'refcocog') for s in ('val', 'test')],
    _vqa('vqav2_val', 'vqa_score', 10, 'question_id',
         f'{_QWEN}vqav2/vqav2_val.jsonl; questions/annotations v2_*_mscoco_val2014 from visualqa.org'),
    _vqa('okvqa_val', 'vqa_score', 10, 'question_id',
         f'{_QWEN}okvqa/okvqa_val.jsonl; OpenEnded_mscoco_val2014_questions.json and '
         'mscoco_val2014_annotations.json from okvqa.allenai.org'),
    _vqa('textvqa_val', 'vqa_score', 10, 'question_id',
         f'{_QWEN}textvqa/textvqa_val.jsonl, textvqa_val_questions.json, textvqa_val_annotations.json'),
    _vqa('vizwiz_val', 'vqa_score', 10, 'question_id',
         f'{_QWEN}vizwiz/vizwiz_val.jsonl, vizwiz_val_questions.json, vizwiz_val_annotations.json'),
    _vqa('docvqa_val', 'anls', 100, 'questionId',
         f'{_QWEN}docvqa/val.jsonl; val/val_v1.0.json and images from docvqa.org'),
    _vqa('infographicsvqa_val', 'anls', 100, 'questionId',
         'jsonl converted as docvqa from infographicVQA_val_v1.0.json (docvqa.org); that file is the gt'),
    _vqa('chartqa_test_human', 'relaxed_accuracy', 100, None, f'{_QWEN}chartqa/test_human.jsonl'),
    _vqa('chartqa_test_augmented', 'relaxed_accuracy', 100, None, f'{_QWEN}chartqa/test_augmented.jsonl'),
    _vqa('gqa_testdev', 'gqa_accuracy', 10, 'questionId', f'{_QWEN}gqa/testdev_balanced.jsonl'),
    _vqa('ocrvqa_val', 'accuracy', 100, 'questionId', f'{_QWEN}ocrvqa/ocrvqa_val.jsonl'),
    _vqa('ocrvqa_test', 'accuracy', 100, 'questionId', f'{_QWEN}ocrvqa/ocrvqa_test.jsonl'),
    _vqa('ai2diagram_test', 'accuracy', 10, 'image', f'{_QWEN}ai2diagram/test.jsonl; ai2d-all.zip images'),
    Task('flickr30k', 'caption', 'cider', CAPTION_PROMPT, 30, 8, id_key='image_id',
         source=f'{_QWEN}flickr30k/flickr30k_karpathy_test.json; Flickr30k images'),
    Task('nocaps_val', 'caption', 'cider', CAPTION_PROMPT, 30, 8, id_key='image_id',
         source=f'{_QWEN}nocaps/nocaps_val.json; nocaps.org validation images'),
    Task('scienceqa_img', 'multiple_choice', 'choice_accuracy', CHOICE_PROMPT,
         source=f'{_QWEN}scienceqa/scienceqa_test_img.jsonl; ScienceQA test images'),
]
TASKS: Mapping[str, Task] = {t.name: t for t in _TASKS}


def get_task(task: str | Task) -> Task:
  if isinstance(task, Task):
    return task
  if task not in TASKS:
    raise KeyError(f'unknown task {task!r}; known: {", ".join(TASKS)}')
  return TASKS[task]
