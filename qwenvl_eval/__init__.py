"""Qwen-VL benchmarks with the original's prompts, decoding and metrics: `qwenvl-eval run` / `score`.

Library use: `evaluate(task, model, params, tokenizer, records, image_root=...)` scores a model in memory;
`score(task, predictions, annotations)` scores predictions in the original's merged layout.
"""
from qwenvl_eval.harness import Result, evaluate, run
from qwenvl_eval.metrics.common import MetricInputError
from qwenvl_eval.scoring import score
from qwenvl_eval.tasks import TASKS, Task, get_task

__all__ = ['MetricInputError', 'Result', 'TASKS', 'Task', 'evaluate', 'get_task', 'run', 'score']
