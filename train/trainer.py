"""One training run (one stage): model, data, optimiser, checkpoints, logging; for the CLI and the demo."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from qwenvl_jax.checkpoint import load_pretrained
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax import param_layout, sharding
from qwenvl_jax.model import QwenVL, init_params
from qwenvl_jax.params import params_to_hf
from qwenvl_jax import quant
from qwenvl_jax.tokenizer import QwenVLTokenizer, check_tokenizer, find_vocab
from train.checkpointing import Checkpointer
from train.config import TrainConfig
from train.inputs import open_data
from train.lora import merge_lora
from train.metrics import MetricsLog, measure_peak_flops, step_flops
from train.run_dir import (CHECKPOINT_DIR, METRICS_FILE, MODEL_CONFIG, RUN_CONFIG, SKIPPED_FILE, TrainError,
                           check_resume, is_run_dir, run_weights, write_configs)
from train import frozen
from train.frozen import MASTER_DTYPE
from train.state import base_config, create, make_layout, run_optimizer
from train.step import make_train_step


def say(message: str) -> None:
  """A notice for the user on stderr (beside the progress bar), once per pod."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def base_model_config(cfg: TrainConfig, model_config: QwenVLConfig | None = None) -> QwenVLConfig:
  """The architecture to train, before any weights are read: `model_config` given, else the config.json of
  cfg.init_from (a checkpoint, or a training out_dir), else cfg.model_config."""
  if model_config is not None:
    return model_config
  source = cfg.init_from or cfg.model_config
  if not source:
    raise TrainError('no model: set init_from (a checkpoint directory or a training out_dir) or '
                     'model_config (a config.json for a random init)')
  path = pathlib.Path(source)
  if not path.exists():
    key = 'init_from' if cfg.init_from else 'model_config'
    raise TrainError(f'{key}={source}: no such file or directory')
  if cfg.init_from and path.is_dir() and not (path / 'config.json').is_file():
    raise TrainError(f'init_from={source} holds no config.json: expected a released or converted checkpoint '
                     'directory, or the out_dir of a training run')
  return QwenVLConfig.from_json(path)


def run_model_config(cfg: TrainConfig, model_config: QwenVLConfig) -> QwenVLConfig:
  """The architecture with this run's numerics and image size."""
  return model_config.replace(dtype=cfg.dtype, param_dtype='float32', remat=cfg.remat,
                              vision={'image_size': cfg.image_size})


def on_one_device(params_like: Any) -> Any:
  """Shardings placing every leaf of a params tree on this process's first device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda _: device, params_like)


def initial_weights(cfg: TrainConfig, params: Any, shardings: Any) -> Any:
  """The weights to start from, on `shardings` (a tree of them matching the params): `params` given
  (placed there), else cfg.init_from (a checkpoint or a training out_dir) read straight onto them in
  float32, each host reading only its devices' slices; else None (a random init with cfg.seed, made by
  `state.create` on the state's shardings)."""
  if params is not None:
    if cfg.weights != 'float' and not quant.is_quantized(params):
      return params  # quantized when the state is made, which places it
    return sharding.put(params, shardings)
  if not cfg.init_from:
    return None
  if cfg.weights != 'float':  # Q-LoRA: `shardings` are the quantized base's
    return quantized_base_weights(cfg, shardings)
  if is_run_dir(cfg.init_from):
    return run_weights(cfg.init_from, shardings, say, run_dir_frozen)
  return load_pretrained(cfg.init_from, dtype=MASTER_DTYPE, shardings=shardings)[1]


def frozen_source(cfg: TrainConfig, model: QwenVL, params: Any, abstract: Any) -> frozen.Source:
  """Where the frozen weights the state holds in the compute dtype (train/frozen.py) take their float
  values from when the run ends: `params` given (copied to the host now), else init_from read again onto
  this host's CPU, else the seed's init made again on it."""
  held = frozen.held_paths(cfg, abstract)
  if params is not None:
    return frozen.kept(params, held & set(param_layout.flatten(params)))
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  if cfg.init_from:
    return lambda: param_layout.flatten(initial_weights(cfg, None, jax.tree.map(lambda _: cpu, abstract)))
  init = jax.jit(lambda: init_params(model, jax.random.key(cfg.seed)), out_shardings=cpu)
  return lambda: param_layout.flatten(init())


def run_dir_frozen(path: pathlib.Path, params: Any) -> Any:
  """A run's restored params with the frozen weights it held in the compute dtype back at their float
  values, taken from the run's own source (its init_from, or its seed's init)."""
  if not (path / RUN_CONFIG).is_file():  # not written by a trainer that holds frozen weights in bfloat16
    return params
  cfg = TrainConfig.from_json(path / RUN_CONFIG)
  if not frozen.held_paths(cfg, params):
    return params
  model = QwenVL(run_model_config(cfg, QwenVLConfig.from_json(path / MODEL_CONFIG)))
  return frozen.restore(cfg, params, frozen_source(cfg, model, None, params), f'init_from={path}: its source')


def quantized_base_weights(cfg: TrainConfig, shardings: Any) -> Any:
  """cfg.init_from for a LoRA run over a quantized base, on `shardings` (the quantized base's): an Int4
  checkpoint with weights=int4 packed as released (`quant.load`); else the float weights quantized as they are read
  onto the shardings (`quant.load`), each host reading and quantizing only its devices' blocks, one
  kernel at a time: neither a host nor a device holds the float base."""
  if is_run_dir(cfg.init_from):
    raise TrainError(f'weights={cfg.weights} with init_from={cfg.init_from} (a training out_dir): start from '
                     'a checkpoint; export that run (export_dir) and use the export as init_from')
  return quant.load(cfg.init_from, cfg.weights, MASTER_DTYPE, shardings=shardings)[0]


def vocab_path(cfg: TrainConfig) -> pathlib.Path:
  """cfg.vocab, else the vocabulary inside init_from (a run's out_dir holds a copy), else $QWENVL_VOCAB."""
  if cfg.vocab:
    return find_vocab(cfg.vocab)
  if cfg.init_from and (pathlib.Path(cfg.init_from) / 'qwen.tiktoken').is_file():
    return pathlib.Path(cfg.init_from) / 'qwen.tiktoken'
  return find_vocab(None)


def export(params: Any, config: QwenVLConfig, directory: str | os.PathLike,
           vocab: str | os.PathLike | None = None,
           generation_config: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Released layout: config.json + model.safetensors (+ qwen.tiktoken, generation_config.json), loadable
  by `load_pretrained`, `QwenVLTokenizer.from_pretrained` and `qwenvl-jax chat --ckpt`.

  On several hosts every process calls this (each leaf is gathered from all of them) and process 0 alone
  writes; the others hold one leaf at a time."""
  from safetensors.numpy import save_file
  params = _gathered(params)
  out = pathlib.Path(directory)
  if jax.process_index():
    return out
  out.mkdir(parents=True, exist_ok=True)
  with open(out / 'config.json', 'w') as f:
    json.dump(config.to_dict(), f, indent=2)
  save_file(dict(params_to_hf(params, config)), str(out / 'model.safetensors'))
  if vocab is not None:
    shutil.copyfile(vocab, out / 'qwen.tiktoken')
  if generation_config is not None:
    (out / 'generation_config.json').write_text(json.dumps(dict(generation_config), indent=2) + '\n')
  return out


def _gathered(params: Any) -> Any:
  """Host arrays of a params tree; across processes gathered leaf by leaf, kept on process 0 only."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  from jax.experimental import multihost_utils

  def one(x):
    whole = multihost_utils.process_allgather(x, tiled=True)
    return None if jax.process_index() else whole
  return jax.tree.map(one, params)


class _Throughput:
  """Loss, lr, grad norm, tokens/s and MFU over each logging interval."""

  def __init__(self, cfg: TrainConfig, config: QwenVLConfig, log: MetricsLog | None, bar: tqdm):
    self.cfg, self.config, self.log, self.bar = cfg, config, log, bar
    devices = jax.device_count()
    per_device = cfg.peak_tflops * 1e12 if cfg.peak_tflops > 0 else measure_peak_flops(config.dtype)
    self.peak = per_device * devices
    self.pending: list[tuple[int, dict, float]] = []
    self.truncated = self.skipped = 0
    self.start = time.perf_counter()

  def add(self, step: int, metrics: Mapping[str, jax.Array], batch_shapes: Mapping[str, tuple],
          truncated: int, skipped: int) -> None:
    flops = step_flops(self.config, batch_shapes, self.cfg.stage, self.cfg.lora)
    self.pending.append((step, metrics, flops))
    self.truncated += truncated
    self.skipped += skipped

  def flush(self) -> dict[str, float] | None:
    if not self.pending:
      return None
    fetched = jax.device_get([m for _, m, _ in self.pending])
    elapsed = time.perf_counter() - self.start
    record = {
        'step': self.pending[-1][0],
        'loss': float(np.mean([m['loss'] for m in fetched])),
        'lr': float(fetched[-1]['lr']),
        'grad_norm': float(np.mean([m['grad_norm'] for m in fetched])),
        'tokens_per_s': float(sum(m['tokens'] for m in fetched) / elapsed),
        'mfu': float(sum(f for _, _, f in self.pending) / elapsed / self.peak),
        'step_time_s': elapsed / len(self.pending),
        'truncated': self.truncated,  # samples of these steps' batches cut to the longest bucket
        'skipped': self.skipped,  # bad records of these steps' batches left out (on_bad_record=skip)
    }
    if self.log is not None:  # process 0's
      self.log.write(record)
    self.bar.set_postfix(loss=f'{record["loss"]:.4f}', lr=f'{record["lr"]:.2e}',
                         gnorm=f'{record["grad_norm"]:.3f}', tok_s=f'{record["tokens_per_s"]:.0f}',
                         mfu=f'{record["mfu"]:.1%}', refresh=False)
    self.pending, self.truncated, self.skipped, self.start = [], 0, 0, time.perf_counter()
    return record


def run(cfg: TrainConfig, *, model_config: QwenVLConfig | None = None, params: Any = None,
        tokenizer: QwenVLTokenizer | None = None, records: Sequence[Any] | None = None,
        resume: bool = False, mesh: str = '', rules: str = '', progress: bool = True,
        desc: str | None = None, stop_after: int | None = None) -> tuple[QwenVLConfig, Any, list[dict]]:
  """Trains up to cfg.steps; returns (model config, final params with LoRA merged, logged metrics); the
  params are None when a resumed run has nothing left to do and no export_dir.

  `records` replaces reading cfg.data; `resume` continues from the latest readable checkpoint in
  cfg.out_dir; `stop_after` ends the run (with a checkpoint) after that many steps in all, as a preempted
  job would stop, while the lr schedule still spans cfg.steps. Everything that can be checked is checked
  before the model is loaded: the out_dir, the settings a resume must share, every data record.
  """
  out_dir = pathlib.Path(cfg.out_dir)
  checkpointer = Checkpointer(out_dir / CHECKPOINT_DIR, cfg.save_every, cfg.keep)
  try:
    return _run(cfg, checkpointer, model_config, params, tokenizer, records, resume, mesh, rules, progress,
                desc, stop_after)
  finally:
    checkpointer.close()


def _run(cfg, checkpointer, model_config, params, tokenizer, records, resume, mesh, rules, progress, desc,
         stop_after):
  out_dir = pathlib.Path(cfg.out_dir)
  resuming = checkpointer.latest_step() is not None
  if resuming and not resume:
    raise TrainError(f'{out_dir / CHECKPOINT_DIR} already holds checkpoints: pass --resume to continue '
                     'that run, or choose another out_dir')
  model_config = base_model_config(cfg, model_config)
  last = min(cfg.steps, stop_after or cfg.steps)
  if resuming:
    check_resume(out_dir, cfg, model_config)
    if checkpointer.latest_step() >= last and not cfg.export_dir:  # known without loading anything
      _nothing_to_do(out_dir, checkpointer.latest_step(), last)
      return model_config, None, []
  tokenizer = tokenizer or QwenVLTokenizer(vocab_path(cfg), image_span_length=model_config.vision.n_queries)
  check_tokenizer(tokenizer, model_config)
  loader, report = open_data(cfg, tokenizer, records, jax.process_index(), jax.process_count())

  model_config = run_model_config(cfg, model_config)
  model = QwenVL(model_config)
  if jax.process_index() == 0:
    write_configs(out_dir, cfg, model_config, tokenizer.vocab_file)
    if report.skipped and not resuming:  # a resumed run appends the records it skips while training
      report.write_skipped(out_dir / SKIPPED_FILE)
  loader.skipped_file = out_dir / SKIPPED_FILE
  say(report.summary(cfg.seq_buckets[-1], out_dir / SKIPPED_FILE))
  optimizer = run_optimizer(cfg, model)
  layout = make_layout(cfg, model, optimizer, mesh, rules)
  source = frozen_source(cfg, model, params, layout.abstract.params)  # before the params are donated
  if resuming:  # into the abstract state: nothing is initialised or loaded first
    state, loader_state = checkpointer.restore(layout.abstract, say)
    loader.restore(loader_state)
  else:
    targets = layout.param_shardings() if layout.mesh else on_one_device(layout.abstract.params)
    weights = initial_weights(cfg, params, targets)
    if weights is not None:  # the leaves the state holds in the compute dtype (read float32), cast one by one
      weights = frozen.cast_each(weights, frozen.held_paths(cfg, layout.abstract.params), cfg.dtype)
    state = create(layout, cfg, model, optimizer, weights)
    del weights
  del params
  place_batch, jit = layout.place_batch, layout.jit
  first = int(state.step)
  logged: list[dict] = []
  if first >= last:
    _nothing_to_do(out_dir, first, last)
  else:
    state = _loop(cfg, model, model_config, optimizer, state, loader, checkpointer, place_batch, jit,
                  first, last, progress, desc, logged)
  params = frozen.restore(cfg, state.params, source, f'the source of {out_dir}')  # float, as the user gave
  final = merge_lora(params, state.lora, cfg.lora_alpha) if cfg.lora else params
  if cfg.export_dir:
    export(final, model_config, cfg.export_dir, tokenizer.vocab_file)
  return model_config, final, logged


def _nothing_to_do(out_dir: pathlib.Path, step: int, last: int) -> None:
  say(f'{out_dir}: already at step {step} >= steps={last}: nothing to do; to train further, raise steps '
      f'(e.g. steps={step + max(1, last // 10)}) and resume')


def _loop(cfg, model, model_config, optimizer, state, loader, checkpointer, place_batch, jit, first, last,
          progress, desc, logged):
  """Steps first+1 .. last; a batch that fails to load stops the run with the last step saved."""
  out_dir = pathlib.Path(cfg.out_dir)
  train_step = jit(make_train_step(QwenVL(base_config(cfg, model.config)), optimizer, cfg))
  main = jax.process_index() == 0  # one metrics file and one progress bar per pod
  log = MetricsLog(out_dir / METRICS_FILE) if main else None
  bar = tqdm(total=cfg.steps, initial=first, desc=desc or f'stage {cfg.stage}',
             disable=not (progress and main), dynamic_ncols=True)
  meter = _Throughput(cfg, model_config, log, bar)
  step = first
  batches = iter(loader)
  try:
    while step < last:
      try:
        batch = next(batches)
      except (ValueError, OSError) as e:  # a record that passed validation but fails to decode
        bar.close()
        if meter.pending:
          logged.append(meter.flush())  # the metrics of the steps done since the last log line
        checkpointer.save(step, state, loader.state(), force=True)
        raise TrainError(
            f'stopped before step {step + 1} of {cfg.steps}: {e}. The state after step {step} is saved in '
            f'{out_dir / CHECKPOINT_DIR}; fix the data and run the same command with --resume to continue '
            'from there') from e
      shapes = {k: (v.shape[0] * jax.process_count(),) + v.shape[1:] for k, v in batch.items()}
      state, metrics = train_step(state, place_batch(batch))
      step += 1
      meter.add(step, metrics, shapes, loader.last_truncated, loader.last_skipped)
      checkpointer.save(step, state, loader.state())
      bar.update(1)
      if step % cfg.log_every == 0 or step == last:
        logged.append(meter.flush())
    checkpointer.save(step, state, loader.state(), force=True)
  finally:
    batches.close()
    bar.close()
    if log is not None:
      log.close()
  return state
