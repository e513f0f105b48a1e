"""Q-LoRA from the training config: `weights=int8|int4` with `lora=true` holds the base quantized and
frozen; an Int4 init_from stays packed as released (golden data: ../shared/golden/int4)."""
import json

import jax
import numpy as np
import pytest

from qwenvl_jax import load_pretrained, param_layout
from qwenvl_jax.model import QwenVL
from train.cli import main
from train.config import stage_config
from train.step import make_train_step
from train.state import base_config, create, make_layout, run_optimizer
from train.trainer import base_model_config, initial_weights, on_one_device, run_model_config


def test_quantized_base_needs_lora(capsys):
  """weights=int8 without LoRA is refused by name (a quantized base cannot be trained itself)."""
  assert main(['--config', 'stage3', 'weights=int8', 'lora=false']) == 2
  assert 'weights=int8 needs lora=true' in capsys.readouterr().err
  assert main(['--config', 'stage3', 'weights=int3', 'lora=true']) == 2
  assert "weights must be one of ('float', 'int8', 'int4'), got 'int3'" in capsys.readouterr().err
  assert main(['--config', 'stage3', 'weights=int4', 'lora=true', '--print-config']) == 0
  assert json.loads(capsys.readouterr().out)['weights'] == 'int4'


@pytest.mark.slow
@pytest.mark.parametrize('weights', ['int4', 'int8'])
def test_int4_init_from_as_the_trainer_builds_it(golden_dir, golden, weights):
  """The trainer's own steps (model, optimizer, layout, initial weights, state) from the Int4 golden:
  weights=int4 keeps the released packed values bit for bit (scales exactly, in float32), weights=int8
  quantizes its dequantized weights; a LoRA step trains LoRA alone and leaves the base as it is."""
  from test_train_step import _golden_batch
  cfg = stage_config(3, init_from=str(golden_dir / 'int4' / 'checkpoint'), lora=True, lora_rank=4,
                     weights=weights, image_size=112, dtype='float32', batch_size=2, grad_accum=1, steps=10,
                     warmup_steps=0, peak_lr=1e-2, min_lr=1e-2)
  model = QwenVL(run_model_config(cfg, base_model_config(cfg)))
  assert model.config.weights == 'float'  # the run's architecture; the state and the step: the base's
  optimizer = run_optimizer(cfg, model)
  layout = make_layout(cfg, model, optimizer)
  state = create(layout, cfg, model, optimizer,
                 initial_weights(cfg, None, on_one_device(layout.abstract.params)))
  params = param_layout.flatten(state.params)
  abstract = param_layout.flatten(layout.abstract.params)
  assert {p: (x.shape, x.dtype) for p, x in params.items()} == {p: (x.shape, x.dtype) for p, x in abstract.items()}
  w1 = ('decoder', 'layers', 'mlp', 'w1')
  assert params[w1 + ('q',)].dtype == (np.uint8 if weights == 'int4' else np.int8) and ('lm_head', 'q' if weights == 'int8' else 'kernel') in params
  if weights == 'int4':
    _, packed = load_pretrained(cfg.init_from, keep_packed=True)
    for path, leaf in param_layout.flatten(packed).items():
      if path[-1] == 'q':
        assert np.asarray(params[path]).tobytes() == np.asarray(leaf).tobytes(), path
      elif path[-1] == 'scale' and path[:-1] + ('q',) in params:
        np.testing.assert_array_equal(params[path], np.asarray(leaf, np.float32))
  step = jax.jit(make_train_step(QwenVL(base_config(cfg, model.config)), optimizer, cfg))
  after, metrics = step(state, _golden_batch(golden, golden_dir))
  assert np.isfinite(float(metrics['loss']))
  for path, leaf in param_layout.flatten(after.params).items():
    assert np.asarray(leaf).tobytes() == np.asarray(params[path]).tobytes(), path
  assert np.any(np.asarray(after.lora['decoder']['layers']['mlp']['w1']['b']))
  with pytest.raises(ValueError, match='made for a float model'):  # the base's config is needed
    jax.jit(make_train_step(model, optimizer, cfg))(state, _golden_batch(golden, golden_dir))


@pytest.mark.slow
def test_qlora_step_memory_does_not_grow_with_float_kernels_per_layer():
  """The trainer's compiled Q-LoRA step (int4 base, no remat) holds one layer's float kernels at a time:
  from 2 to 8 scanned layers its temporaries grow by far less than the float kernels of 6 more layers
  (measured: +8 MB against 101 MB of kernels; merging LoRA into every kernel before the model ran,
  +191 MB). ~30 s: two compiles."""
  import dataclasses
  from qwenvl_jax.config import QwenVLConfig
  from train import plan as pl
  from train.plan_xla import compile_step
  dims = {'vocab_size': 512, 'hidden_size': 512, 'num_attention_heads': 4, 'kv_channels': 128,
          'intermediate_size': 4096, 'seq_length': 64,
          'visual': {'image_size': 28, 'patch_size': 14, 'width': 32, 'layers': 1, 'heads': 2,
                     'mlp_ratio': 2.0, 'output_dim': 512, 'n_queries': 4, 'image_start_id': 500}}
  temp = {}
  for layers in (2, 8):
    config = QwenVLConfig.from_dict({**dims, 'num_hidden_layers': layers})
    setup = pl.make_setup(config, '1', stage=3, lora=True, weights='int4', batch=1, seq=16, images=0,
                          dtype='float32')
    temp[layers] = compile_step(dataclasses.replace(setup, cfg=setup.cfg.replace(lora_rank=8)))['temp_bytes']
  t = config.text
  layer_kernels = 4 * t.hidden_size * (3 * t.hidden_size + t.hidden_size + 3 * t.mlp_width)  # float32
  assert temp[8] - temp[2] < 0.25 * 6 * layer_kernels, (temp, layer_kernels)
  assert temp[2] < 2 * layer_kernels, (temp, layer_kernels)  # about one layer's, dequantized where used
