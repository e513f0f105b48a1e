"""One training run (one stage): model, data, optimiser, checkpoints, logging; for the CLI and the demo."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qwenvl_jax.checkpoint import load_pretrained
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.model import QwenVL, init_params
from qwenvl_jax.params import params_to_hf
from qwenvl_jax.tokenizer import QwenVLTokenizer, check_tokenizer, find_vocab
from train.checkpointing import Checkpointer
from train.config import TrainConfig
from train.data import LoaderConfig, make_loader, read_records
from train.lora import init_lora, merge_lora
from train.metrics import MetricsLog, measure_peak_flops, step_flops
from train.optim import make_optimizer
from train.step import TrainState, init_state, make_train_step

METRICS_FILE = 'metrics.jsonl'
CHECKPOINT_DIR = 'checkpoints'


def model_and_params(cfg: TrainConfig, model_config: QwenVLConfig | None = None,
                     params: Any = None) -> tuple[QwenVLConfig, Any]:
  """The architecture with this run's numerics and image size, and float32 master weights.

  Sources, first match: `params` given (with `model_config`), cfg.init_from (released layout),
  cfg.model_config (config.json, random init with cfg.seed).
  """
  if params is not None:
    if model_config is None:
      raise ValueError('params were given without their model_config')
  elif cfg.init_from:
    model, params = load_pretrained(cfg.init_from)
    model_config = model.config
  elif cfg.model_config or model_config is not None:
    model_config = model_config or QwenVLConfig.from_json(cfg.model_config)
  else:
    raise ValueError('no model: set init_from (a released-layout checkpoint) or model_config (config.json '
                     'for a random init)')
  model_config = model_config.replace(dtype=cfg.dtype, param_dtype='float32', remat=cfg.remat,
                                      vision={'image_size': cfg.image_size})
  if params is None:
    params = init_params(QwenVL(model_config), jax.random.key(cfg.seed))
  return model_config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def vocab_path(cfg: TrainConfig) -> pathlib.Path:
  """cfg.vocab, else the vocabulary inside init_from, else $QWENVL_VOCAB."""
  if cfg.vocab:
    return find_vocab(cfg.vocab)
  if cfg.init_from and (pathlib.Path(cfg.init_from) / 'qwen.tiktoken').is_file():
    return pathlib.Path(cfg.init_from) / 'qwen.tiktoken'
  return find_vocab(None)


def export(params: Any, config: QwenVLConfig, directory: str | os.PathLike,
           vocab: str | os.PathLike | None = None) -> pathlib.Path:
  """Released layout: config.json + model.safetensors (+ qwen.tiktoken), loadable by `load_pretrained`."""
  from safetensors.numpy import save_file
  out = pathlib.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / 'config.json', 'w') as f:
    json.dump(config.to_dict(), f, indent=2)
  save_file(dict(params_to_hf(jax.device_get(params), config)), str(out / 'model.safetensors'))
  if vocab is not None:
    shutil.copyfile(vocab, out / 'qwen.tiktoken')
  return out


class _Throughput:
  """Loss, lr, grad norm, tokens/s and MFU over each logging interval."""

  def __init__(self, cfg: TrainConfig, config: QwenVLConfig, log: MetricsLog, bar: tqdm):
    self.cfg, self.config, self.log, self.bar = cfg, config, log, bar
    devices = jax.device_count()
    per_device = cfg.peak_tflops * 1e12 if cfg.peak_tflops > 0 else measure_peak_flops(config.compute_dtype)
    self.peak = per_device * devices
    self.pending: list[tuple[int, dict, float]] = []
    self.start = time.perf_counter()

  def add(self, step: int, metrics: Mapping[str, jax.Array], batch_shapes: Mapping[str, tuple]) -> None:
    flops = step_flops(self.config, batch_shapes, self.cfg.stage, self.cfg.lora)
    self.pending.append((step, metrics, flops))

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
    }
    self.log.write(record)
    self.bar.set_postfix(loss=f'{record["loss"]:.4f}', lr=f'{record["lr"]:.2e}',
                         gnorm=f'{record["grad_norm"]:.3f}', tok_s=f'{record["tokens_per_s"]:.0f}',
                         mfu=f'{record["mfu"]:.1%}', refresh=False)
    self.pending, self.start = [], time.perf_counter()
    return record


def _place(mesh_spec: str, rules: str, state: TrainState):
  """(state placed on the mesh, function placing a host batch, jit for the step); single device when
  mesh_spec is empty."""
  if not mesh_spec:
    return state, lambda batch: batch, lambda fn: jax.jit(fn, donate_argnums=0)
  from qwenvl_jax import sharding
  mesh = sharding.make_mesh(mesh_spec)
  rules = rules or sharding.default_rules(dict(mesh.shape))
  state_sh = sharding.state_shardings(mesh, state, rules)
  state = sharding.put(state, state_sh)

  def place_batch(batch):
    return {k: jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, rules, (v.shape[0] * jax.process_count(),) + v.shape[1:]), v)
        for k, v in batch.items()}

  def jit(fn):
    return sharding.sharded_jit(fn, mesh, rules, out_shardings=(state_sh, None), donate_argnums=0)
  return state, place_batch, jit


def run(cfg: TrainConfig, *, model_config: QwenVLConfig | None = None, params: Any = None,
        tokenizer: QwenVLTokenizer | None = None, records: Sequence[Any] | None = None,
        resume: bool = False, mesh: str = '', rules: str = '', progress: bool = True,
        desc: str | None = None, stop_after: int | None = None) -> tuple[QwenVLConfig, Any, list[dict]]:
  """Trains up to cfg.steps; returns (model config, final params with LoRA merged, logged metrics).

  `records` replaces reading cfg.data; `resume` continues from the latest checkpoint in cfg.out_dir;
  `stop_after` ends the run (with a checkpoint) after that many steps in all, as a preempted job would
  stop, while the lr schedule still spans cfg.steps.
  """
  model_config, params = model_and_params(cfg, model_config, params)
  model = QwenVL(model_config)
  tokenizer = tokenizer or QwenVLTokenizer(vocab_path(cfg), image_span_length=model_config.vision.n_queries)
  check_tokenizer(tokenizer, model_config)
  if records is None:
    if not cfg.data:
      raise ValueError('no training data: set data=<.json or .jsonl file>')
    records = read_records(cfg.data)
  root = cfg.data_root or (str(pathlib.Path(cfg.data).resolve().parent) if cfg.data else os.getcwd())
  loader = make_loader(
      records, tokenizer, cfg.data_format, cfg.chat_labels,
      LoaderConfig(cfg.batch_size, cfg.seq_buckets, cfg.target_step, cfg.max_images, cfg.image_size,
                   cfg.seed, cfg.bucket_window),
      root, jax.process_index(), jax.process_count(), source=cfg.data or 'records')

  lora = None
  if cfg.lora:
    lora = init_lora(params, cfg.lora_targets, cfg.lora_rank, jax.random.key(cfg.seed + 1))
  optimizer = make_optimizer(cfg, params, lora)
  state = init_state(params, optimizer, lora)
  out_dir = pathlib.Path(cfg.out_dir)
  checkpointer = Checkpointer(out_dir / CHECKPOINT_DIR, cfg.save_every, cfg.keep)
  if checkpointer.latest_step() is not None:
    if not resume:
      raise FileExistsError(f'{out_dir / CHECKPOINT_DIR} already holds checkpoints: pass --resume to '
                            'continue that run, or choose another out_dir')
    state, loader_state = checkpointer.restore(state)
    loader.restore(loader_state)
  state, place_batch, jit = _place(mesh, rules, state)
  train_step = jit(make_train_step(model, optimizer, cfg))
  first = int(state.step)

  log = MetricsLog(out_dir / METRICS_FILE)
  bar = tqdm(total=cfg.steps, initial=first, desc=desc or f'stage {cfg.stage}', disable=not progress,
             dynamic_ncols=True)
  meter = _Throughput(cfg, model_config, log, bar)
  logged = []
  step = first
  last = min(cfg.steps, stop_after or cfg.steps)
  batches = iter(loader)
  try:
    while step < last:
      batch = next(batches)
      shapes = {k: (v.shape[0] * jax.process_count(),) + v.shape[1:] for k, v in batch.items()}
      state, metrics = train_step(state, place_batch(batch))
      step += 1
      meter.add(step, metrics, shapes)
      checkpointer.save(step, state, loader.state())
      bar.update(1)
      if step % cfg.log_every == 0 or step == last:
        logged.append(meter.flush())
    checkpointer.save(step, state, loader.state(), force=True)
  finally:
    batches.close()
    bar.close()
    log.close()
    checkpointer.close()
  final = merge_lora(state.params, state.lora, cfg.lora_alpha) if cfg.lora else state.params
  if cfg.export_dir:
    export(final, model_config, cfg.export_dir, tokenizer.vocab_file)
  return model_config, final, logged
