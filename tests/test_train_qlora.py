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
from train.state import create, make_layout, run_optimizer
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
  assert model.config.weights == 'float'  # the step runs the float model over the dequantized base
  optimizer = run_optimizer(cfg, model)
  layout = make_layout(cfg, model, optimizer)
  state = create(layout, cfg, model, optimizer,
                 initial_weights(cfg, None, on_one_device(layout.abstract.params)))
  params = param_layout.flatten(state.params)
  abstract = param_layout.flatten(layout.abstract.params)
  assert {p: (x.shape, x.dtype) for p, x in params.items()} == {p: (x.shape, x.dtype) for p, x in abstract.items()}
  w1 = ('decoder', 'layers', 'mlp', 'w1')
  assert params[w1 + ('q',)].dtype == np.int8 and ('lm_head', 'q' if weights == 'int8' else 'kernel') in params
  if weights == 'int4':
    _, packed = load_pretrained(cfg.init_from, keep_packed=True)
    for path, leaf in param_layout.flatten(packed).items():
      if path[-1] == 'q':
        assert np.asarray(params[path]).tobytes() == np.asarray(leaf).tobytes(), path
      elif path[-1] == 'scale' and path[:-1] + ('q',) in params:
        np.testing.assert_array_equal(params[path], np.asarray(leaf, np.float32))
  step = jax.jit(make_train_step(model, optimizer, cfg))
  after, metrics = step(state, _golden_batch(golden, golden_dir))
  assert np.isfinite(float(metrics['loss']))
  for path, leaf in param_layout.flatten(after.params).items():
    assert np.asarray(leaf).tobytes() == np.asarray(params[path]).tobytes(), path
  assert np.any(np.asarray(after.lora['w1']['b']))
