"""Training configuration: one frozen dataclass, per-stage defaults in `train/configs/stage{1,2,3}.json`.

The stage files hold the paper's hyper-parameters (Qwen-VL, Bai et al. 2023, appendix Table 8); any field
can be overridden on the command line as `key=value`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import pathlib
import typing
from typing import Any, Mapping, Sequence

from qwenvl_jax import jsonfile
from qwenvl_jax.jsonfile import ConfigFileError
from train import stages

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / 'configs'
STAGES = tuple(stages.STAGES)  # (1, 2, 3)
DATA_FORMATS = ('caption', 'multitask', 'chat')
CHAT_LABELS = ('official', 'assistant')
ON_OVERLONG = ('truncate', 'skip', 'error')
ON_BAD_RECORD = ('error', 'skip')
BASE_WEIGHTS = ('float', 'int8', 'int4')  # of the base model (`qwenvl_jax.quant`)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything one training run needs; see README 'Training' for the meaning of each stage."""
  stage: int = 2
  # Model: a released-layout checkpoint to start from, or a config.json for a random init.
  init_from: str = ''
  model_config: str = ''
  vocab: str = ''  # qwen.tiktoken (or a folder holding it); default: init_from's folder, then $QWENVL_VOCAB
  image_size: int = 448  # the ViT position table is resized to this grid at run time
  dtype: str = 'bfloat16'  # compute dtype; parameters and optimizer state stay float32
  remat: str = 'none'  # 'none', 'full', 'dots', 'dots_no_batch'
  # Data.
  data: str = ''
  data_root: str = ''  # image paths are relative to it; default: the data file's folder
  data_format: str = 'multitask'  # 'caption' (stage 1), 'multitask' (stage 2), 'chat' (stage 3)
  chat_labels: str = 'official'  # 'official': as finetune.py; 'assistant': assistant turns only
  seq_buckets: tuple[int, ...] = (2048,)  # padded lengths; longer samples are handled by on_overlong
  # A sample over the longest bucket: 'truncate' cuts it (never inside an image span) and skips it only when
  # no target token is left; 'skip' leaves every such sample out; 'error' refuses to start. Cut and
  # skipped samples are counted in the run's summary, skipped ones listed in out_dir/skipped.jsonl.
  on_overlong: str = 'truncate'
  target_step: int = 256  # logits are computed at a multiple of this many positions per row
  max_images: int = 1  # image slots per row; a sample with more images is refused
  bucket_window: int = 8  # batches whose samples are sorted by length together
  # Sequence packing: a batch's samples travel in batch_size / samples_per_row rows of up to the longest
  # bucket, each sample with its own positions and attention (train/rows.py); 1: one sample per row.
  # Rows then hold max_images x samples_per_row image slots. Samples that find no room in their window's
  # rows wait for the next window (nothing is dropped), so a batch holds up to batch_size samples: choose
  # it at or below longest bucket / mean sample length.
  samples_per_row: int = 1
  worker_count: int = 0  # grain processes decoding and tokenizing ahead of the step; 0: a thread
  # A record that fails when its batch is made (an image that does not decode, a packed record that cannot
  # be encoded): 'error' stops the run (with a checkpoint), naming the record; 'skip' blanks its row (no
  # loss), appends it to out_dir/skipped.jsonl, counts it in the metrics, and stops the run when an epoch
  # holds more than max_bad_fraction of bad records. On several processes, image failures (known to their
  # process only) are summed once every bucket_window batches: the stop comes there (train/loader.py).
  on_bad_record: str = 'error'
  max_bad_fraction: float = 0.001
  # Optimisation.
  batch_size: int = 4096  # global, all hosts together
  grad_accum: int = 8
  steps: int = 19000
  warmup_steps: int = 400
  peak_lr: float = 5e-5
  min_lr: float = 1e-5
  weight_decay: float = 0.05
  b1: float = 0.9
  b2: float = 0.98
  eps: float = 1e-6
  clip_norm: float = 1.0
  vit_lr_decay: float = 0.95
  visual_lr_scale: float = 1.0  # lr factor of the whole visual tower (ViT and adapter), times the decay
  # LoRA (official finetune.py defaults).
  lora: bool = False
  lora_rank: int = 64
  lora_alpha: float = 16.0
  lora_dropout: float = 0.05
  lora_targets: tuple[str, ...] = ('c_attn', 'attn.c_proj', 'w1', 'w2')
  # Q-LoRA: 'int8' / 'int4' hold the frozen base weight-only quantized (LoRA only); an Int4 init_from with
  # 'int4' stays packed as released, anything else is quantized when the run starts.
  weights: str = 'float'
  # Run.
  seed: int = 0
  out_dir: str = 'out/train'
  save_every: int = 1000
  keep: int = 3
  log_every: int = 10
  export_dir: str = ''  # released-layout export (LoRA merged) at the end, when set
  peak_tflops: float = 0.0  # per device, for MFU; 0 measures a matmul once at start

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    problems = []
    if self.stage not in STAGES:
      problems.append(f'stage must be one of {STAGES}, got {self.stage}')
    if self.data_format not in DATA_FORMATS:
      problems.append(f'data_format must be one of {DATA_FORMATS}, got {self.data_format!r}')
    if self.chat_labels not in CHAT_LABELS:
      problems.append(f'chat_labels must be one of {CHAT_LABELS}, got {self.chat_labels!r}')
    if self.on_overlong not in ON_OVERLONG:
      problems.append(f'on_overlong must be one of {ON_OVERLONG}, got {self.on_overlong!r}')
    if self.on_bad_record not in ON_BAD_RECORD:
      problems.append(f'on_bad_record must be one of {ON_BAD_RECORD}, got {self.on_bad_record!r}')
    if not 0 <= self.max_bad_fraction < 1:
      problems.append(f'max_bad_fraction must lie in [0, 1), got {self.max_bad_fraction}')
    if self.worker_count < 0:
      problems.append(f'worker_count must be >= 0, got {self.worker_count}')
    if not self.seq_buckets or any(b < 2 for b in self.seq_buckets):
      problems.append(f'seq_buckets must be lengths >= 2, got {self.seq_buckets}')
    if list(self.seq_buckets) != sorted(set(self.seq_buckets)):
      problems.append(f'seq_buckets must be strictly increasing, got {self.seq_buckets}')
    for name in ('batch_size', 'grad_accum', 'steps', 'target_step', 'bucket_window', 'save_every',
                 'keep', 'log_every', 'lora_rank', 'image_size', 'samples_per_row'):
      if getattr(self, name) < 1:
        problems.append(f'{name} must be positive, got {getattr(self, name)}')
    if self.max_images < 0:
      problems.append(f'max_images must be >= 0, got {self.max_images}')
    if self.samples_per_row >= 1 and self.batch_size % (self.grad_accum * self.samples_per_row):
      problems.append(f'batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum} x '
                      f'samples_per_row {self.samples_per_row} (rows of each micro-batch)')
    if not 0 <= self.warmup_steps <= self.steps:
      problems.append(f'warmup_steps must lie in [0, steps={self.steps}], got {self.warmup_steps}')
    if not 0 <= self.min_lr <= self.peak_lr:
      problems.append(f'need 0 <= min_lr <= peak_lr, got min_lr={self.min_lr}, peak_lr={self.peak_lr}')
    if not 0 <= self.vit_lr_decay <= 1:
      problems.append(f'vit_lr_decay must lie in [0, 1], got {self.vit_lr_decay}')
    if self.visual_lr_scale < 0:
      problems.append(f'visual_lr_scale must be >= 0, got {self.visual_lr_scale}')
    if self.weights not in BASE_WEIGHTS:
      problems.append(f'weights must be one of {BASE_WEIGHTS}, got {self.weights!r}')
    elif self.weights != 'float' and not self.lora:
      problems.append(f'weights={self.weights} needs lora=true (a quantized base is frozen: only LoRA trains '
                      'over it)')
    if not 0 <= self.lora_dropout < 1:
      problems.append(f'lora_dropout must lie in [0, 1), got {self.lora_dropout}')
    if problems:
      raise ValueError('invalid training config: ' + '; '.join(problems))

  def replace(self, **kw: Any) -> 'TrainConfig':
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str = 'training config') -> 'TrainConfig':
    """From JSON-like values (lists for tuples); `source` names where they came from in errors."""
    check_keys(d, source)
    return cls(**{k: _typed(d, k, source) for k in d})

  @classmethod
  def from_json(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> 'TrainConfig':
    """A JSON file (or a packaged name: 'stage1', 'stage2', 'stage3'), then `key=value` overrides.

    Errors name the file and the key, or the command line's `key=value`.
    """
    file = resolve_config_path(path)
    d = load_json(file)
    check_keys(d, str(file))
    typed = {k: _typed(d, k, str(file)) for k in d}
    typed.update(parse_overrides(overrides))
    return cls(**typed)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
# Keys that fix the structure of the saved training state: a resumed run must agree on them.
STRUCTURAL_KEYS = ('stage', 'lora', 'lora_rank', 'lora_targets', 'weights')


def check_keys(d: Mapping[str, Any], source: str) -> None:
  """Refuses unknown keys by name, with the closest known key when one is close."""
  for key in d:
    if key not in FIELDS:
      close = difflib.get_close_matches(key, FIELDS, n=1)
      hint = f"; did you mean '{close[0]}'?" if close else f'; known keys: {", ".join(sorted(FIELDS))}'
      raise ConfigFileError(source, 'unknown training config key' + hint, key)


def _typed(d: Mapping[str, Any], key: str, source: str) -> Any:
  """d[key] checked against the field's type (ConfigFileError naming source and key); lists to tuples."""
  hint = _HINTS[key]
  if typing.get_origin(hint) is tuple:
    (item, _) = typing.get_args(hint)
    values = jsonfile.get({key: list(d[key]) if isinstance(d[key], tuple) else d[key]}, key, list, source)
    return tuple(jsonfile.get({f'[{i}]': v}, f'[{i}]', item, source, prefix=key)
                 for i, v in enumerate(values))
  return jsonfile.get(d, key, hint, source)


def resolve_config_path(name: str | os.PathLike) -> pathlib.Path:
  """A path as given, else a config shipped in train/configs ('stage2' or 'stage2.json')."""
  path = pathlib.Path(name)
  if path.is_file():
    return path
  packaged = CONFIG_DIR / (path.name if path.suffix == '.json' else f'{path.name}.json')
  if packaged.is_file():
    return packaged
  shipped = sorted(p.stem for p in CONFIG_DIR.glob('*.json'))
  raise FileNotFoundError(f'config {name!r} not found: neither a file nor one of the packaged {shipped}')


def load_json(name: str | os.PathLike) -> dict[str, Any]:
  """The JSON object of a config file (a path or a packaged name), without its '_comment' keys."""
  d = jsonfile.read_object(resolve_config_path(name))
  return {k: v for k, v in d.items() if not k.startswith('_')}  # '_comment' keys document the file


def stage_config(stage: int, **overrides: Any) -> TrainConfig:
  """The packaged defaults of a stage, with Python overrides."""
  if stage not in STAGES:
    raise ValueError(f'stage must be one of {STAGES}, got {stage}')
  d = load_json(f'stage{stage}')
  d.update(overrides)
  return TrainConfig.from_dict(d)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """['steps=10', 'seq_buckets=[64,128]'] -> typed values; strings stay as written, other values parse as
  JSON, lists also as comma-separated items ('seq_buckets=64,128')."""
  out = {}
  for item in items:
    key, sep, text = item.partition('=')
    key = key.strip()
    source = f'command line {item!r}'
    if not sep or not key:
      raise ConfigFileError('command line', f'{item!r} is not of the form key=value')
    check_keys({key: None}, 'command line')
    hint = _HINTS[key]
    if hint is str:
      value: Any = text
    elif typing.get_origin(hint) is tuple and not text.lstrip().startswith('['):
      value = [_json_or_text(v) for v in text.split(',')] if text else []
    else:
      value = _json_or_text(text)
    out[key] = _typed({key: value}, key, source)
  return out


def _json_or_text(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text
