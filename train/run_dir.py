"""A run's out_dir: what it holds, what a resumed run must agree with, and starting from one.

At start a run writes `train_config.json` (its TrainConfig), `config.json` (its model) and a copy of the
vocabulary `qwen.tiktoken` into out_dir, next to `checkpoints/`, `metrics.jsonl` and `skipped.jsonl`.
So `--resume` can refuse by name a setting that changes the shape of the saved state (LoRA on or off, its
rank, the stage, the model's dims), and `init_from=<out_dir>` can start the next stage from the run's
latest readable step.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Callable, Mapping

from qwenvl_jax import jsonfile
from qwenvl_jax.config import QwenVLConfig
from train.config import STRUCTURAL_KEYS, TrainConfig
from train.errors import TrainError  # noqa: F401 (re-exported)

CHECKPOINT_DIR = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'
SKIPPED_FILE = 'skipped.jsonl'
RUN_CONFIG = 'train_config.json'
MODEL_CONFIG = 'config.json'
VOCAB_FILE = 'qwen.tiktoken'
# Model config keys that do not change a parameter's shape: the image size resizes the ViT's position
# table at run time, and the precision flags are the run's numerics.
_FREE_MODEL_KEYS = {'visual.image_size', 'bf16', 'fp16', 'fp32'}


def is_run_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is a training out_dir (checkpoints plus the model config saved at start)."""
  p = pathlib.Path(path)
  return (p / CHECKPOINT_DIR).is_dir() and (p / MODEL_CONFIG).is_file()


def write_configs(out_dir: pathlib.Path, cfg: TrainConfig, model_config: QwenVLConfig,
                  vocab: str | os.PathLike) -> None:
  """The run's settings, model and vocabulary, so the out_dir alone can start the next stage."""
  out_dir.mkdir(parents=True, exist_ok=True)
  if not (out_dir / VOCAB_FILE).is_file():
    shutil.copyfile(vocab, out_dir / VOCAB_FILE)
  for name, d in ((RUN_CONFIG, cfg.to_dict()), (MODEL_CONFIG, model_config.to_dict())):
    tmp = out_dir / f'{name}.tmp'
    tmp.write_text(json.dumps(d, indent=2) + '\n')
    tmp.replace(out_dir / name)  # never half a file, even when killed


def _flat(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f'{prefix}{k}.') if isinstance(v, Mapping) else {prefix + k: v})
  return out


def check_resume(out_dir: pathlib.Path, cfg: TrainConfig, model_config: QwenVLConfig) -> None:
  """Refuses, naming every key, a resume whose state would not have the saved run's structure."""
  differ = []
  if (out_dir / RUN_CONFIG).is_file():
    saved = jsonfile.read_object(out_dir / RUN_CONFIG)
    now = cfg.to_dict()
    differ += [(k, saved[k], now[k]) for k in STRUCTURAL_KEYS if k in saved and saved[k] != now[k]]
  if (out_dir / MODEL_CONFIG).is_file():
    saved = _flat(jsonfile.read_object(out_dir / MODEL_CONFIG))
    now = _flat(model_config.to_dict())
    differ += [(f'model {k}', saved.get(k), now.get(k)) for k in sorted(saved.keys() | now.keys())
               if k not in _FREE_MODEL_KEYS and saved.get(k) != now.get(k)]
  if differ:
    listed = '; '.join(f'{k} is {json.dumps(n)} here but {json.dumps(s)} in the saved run'
                       for k, s, n in differ)
    fix = ' '.join(f'{k}={json.dumps(s)}' for k, s, _ in differ if not k.startswith('model '))
    raise TrainError(
        f'cannot resume {out_dir}: {listed}. To continue that run, resume with the saved settings'
        + (f' ({fix})' if fix else ' (the same model_config or init_from)')
        + f'; to start from its weights with the new settings, use a new out_dir and init_from={out_dir}')


def run_weights(path: str | os.PathLike, shardings: Any, say: Callable[[str], None],
                source_frozen: Callable[[pathlib.Path, Any], Any]) -> Any:
  """The params (LoRA merged, float32) of a training out_dir's latest readable step, restored onto
  `shardings` (a tree of them matching the params); `source_frozen(path, params)` puts back the float
  values of the frozen weights the run held in its compute dtype (`trainer.run_dir_frozen`)."""
  import jax  # JAX and Orbax: only when a run starts
  from train.checkpointing import restore_weights
  from train.lora import merge_lora
  path = pathlib.Path(path)
  step, params, lora = restore_weights(path / CHECKPOINT_DIR, shardings, say)
  params = source_frozen(path, params)
  if lora is not None:
    alpha = jsonfile.get(jsonfile.read_object(path / RUN_CONFIG), 'lora_alpha', float, path / RUN_CONFIG)
    merge = jax.jit(lambda p, l: merge_lora(p, l, alpha), out_shardings=shardings, donate_argnums=0)
    params = merge(params, lora)
  say(f'init_from {path}: the weights of its step {step}')
  return params
