"""Frozen weights held in the compute dtype (train/frozen.py): which leaves, the step unchanged bit for bit,
and the export's frozen tensors equal to the source's, byte for byte."""
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qwenvl_jax import load_pretrained, param_layout
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.model import QwenVL, init_params, param_shapes
from test_train_resume import MODEL
from test_train_step import _cfg, _golden_batch
from train import world
from train.config import TrainConfig
from train.errors import TrainError
from train.frozen import held_paths
from train.optim import make_optimizer
from train.state import base_config, from_params
from train.step import make_train_step
from train.trainer import export, initial_weights, on_one_device, run, run_model_config


def test_held_frozen_weights_change_no_bit_of_the_qlora_step(golden_dir, golden):
  """Int4 Q-LoRA in bfloat16 on the golden tiny model: the frozen kernels, token table and ViT proj are
  held in bfloat16, the trained LoRA leaves, norms, position tables and scales in float32; one step's loss,
  gradient norm and updated LoRA are bit-identical to the same step over float32 masters (the model casts
  those leaves to bfloat16 where it uses them)."""
  model, params = load_pretrained(golden_dir / 'checkpoint')
  cfg = _cfg(model, stage=3, lora=True, lora_rank=4, weights='int4', dtype='bfloat16', peak_lr=1e-2,
             min_lr=1e-2, warmup_steps=0)
  base = base_config(cfg, run_model_config(cfg, model.config))
  optimizer = make_optimizer(cfg, params)
  state = jax.jit(from_params(cfg, optimizer, base))(params)
  flat, source = param_layout.flatten(state.params), param_layout.flatten(params)
  held = held_paths(cfg, state.params)
  assert ('wte', 'embedding') in held and ('visual', 'proj') in held
  assert any(p[:2] == ('visual', 'blocks') and p[-1] == 'kernel' for p in held)
  for path, leaf in flat.items():
    want = jnp.bfloat16 if path in held else (jnp.uint8 if path[-1] == 'q' else jnp.float32)
    assert leaf.dtype == want, path
  assert {p[-1] for p in flat if p not in held and flat[p].dtype == jnp.float32} == {'scale', 'bias',
                                                                                    'positional_embedding',
                                                                                    'pos_embed', 'query'}
  masters = state._replace(params=jax.tree_util.tree_map_with_path(
      lambda path, x: source[tuple(k.key for k in path)] if x.dtype == jnp.bfloat16 else x, state.params))
  step = jax.jit(make_train_step(QwenVL(base), optimizer, cfg))
  batch = _golden_batch(golden, golden_dir)
  (after, got), (want_state, want) = step(state, batch), step(masters, batch)
  assert float(got['loss']) == float(want['loss']) and float(got['grad_norm']) == float(want['grad_norm'])
  for a, b in zip(jax.tree.leaves(after.lora), jax.tree.leaves(want_state.lora)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.fixture(scope='module')
def source_run(tmp_path_factory, vocab_file):
  """A float checkpoint (random values, as a real one: float32) and a chat data set for a Q-LoRA run."""
  root = tmp_path_factory.mktemp('frozen')
  scenes, _ = world.make_world(root, 4, 0, seed=0, cfg=world.WorldConfig(size=56, grid=3, max_objects=2))
  data = world.write_json(world.chat_records(scenes, random.Random(0)), root / 'chat.json')
  (root / 'model.json').write_text(json.dumps(MODEL))
  config = QwenVLConfig.from_json(root / 'model.json')
  params = jax.jit(lambda: init_params(QwenVL(config), jax.random.key(7)))()
  export(params, config, root / 'source')
  cfg = TrainConfig(
      stage=3, init_from=str(root / 'source'), vocab=str(vocab_file), data=str(data), data_format='chat',
      image_size=28, dtype='bfloat16', seq_buckets=(96,), target_step=16, max_images=1, batch_size=2,
      grad_accum=1, steps=1, warmup_steps=0, peak_lr=1e-2, min_lr=1e-2, save_every=1, keep=1, log_every=1,
      seed=0, peak_tflops=1.0, lora=True, lora_rank=4, weights='int4', out_dir=str(root / 'run'),
      export_dir=str(root / 'chat'))
  return root, cfg


@pytest.mark.slow
def test_export_takes_the_frozen_weights_from_the_source(source_run):
  """A bfloat16 Q-LoRA run over an int4 base (frozen ViT, token table and lm_head held in bfloat16): its
  exported chat checkpoint's frozen tensors are the source checkpoint's byte for byte, not bfloat16-rounded
  copies; the LoRA targets are the dequantized base plus the update. A source changed since the run
  started is refused by name, not exported."""
  root, cfg = source_run
  _, final, _ = run(cfg, progress=False)
  source, exported = (load_file(str(root / d / 'model.safetensors')) for d in ('source', 'chat'))
  assert source.keys() == exported.keys()
  quantized = [n for n in source if n.startswith('transformer.h.') and n.endswith('.weight') and 'ln' not in n]
  quantized.append('lm_head.weight')  # int4 from a float source: the decoder's kernels and lm_head
  assert len(quantized) == 6  # exported dequantized (plus the LoRA update on c_attn, attn.c_proj, w1, w2)
  same = [n for n in source if n not in quantized]
  assert 'transformer.wte.weight' in same and any('visual' in n for n in same)
  for name in same:
    assert exported[name].dtype == source[name].dtype == np.float32, name
    assert exported[name].tobytes() == source[name].tobytes(), name
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(final))
  # A LoRA run over the float base: the next stage starting from its out_dir gets the source's frozen
  # weights, not the bfloat16 ones its checkpoint holds.
  lora = cfg.replace(weights='float', out_dir=str(root / 'lora'), export_dir='')
  run(lora, progress=False)
  model_config = run_model_config(lora, QwenVLConfig.from_json(root / 'lora' / 'config.json'))
  next_stage = lora.replace(init_from=str(root / 'lora'), out_dir=str(root / 'next'))
  started = param_layout.flatten(initial_weights(next_stage, None, on_one_device(
      param_shapes(QwenVL(model_config)))))
  original = param_layout.flatten(load_pretrained(root / 'source')[1])
  merged = lambda path: path[-2] in ('c_attn', 'w1', 'w2') or path[-3:-1] == ('attn', 'c_proj')  # LoRA's
  for path, leaf in original.items():
    if not merged(path):
      assert np.asarray(started[path]).tobytes() == np.asarray(leaf).tobytes(), path
  source['transformer.wte.weight'] = source['transformer.wte.weight'] * 1.5
  save_file(source, str(root / 'source' / 'model.safetensors'))
  with pytest.raises(TrainError, match='wte/embedding is not the value the run started from'):
    run(cfg.replace(export_dir=str(root / 'again')), resume=True, progress=False)  # the export again
  assert not (root / 'again').exists()
