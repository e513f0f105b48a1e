"""The released Int4 checkpoint kept packed, as the int4 model runs it: the golden logits, generation,
`--weights int4` at load, and Q-LoRA over the packed base (golden data: ../shared/golden/int4)."""
import chex
import jax
import numpy as np
import pytest

from qwenvl_jax import param_layout, preprocess_images
from qwenvl_jax.decode import generate
from qwenvl_jax.model import param_shapes
from test_int4 import TOL, _golden_logits, _shapes, dequantized, golden_int4, int4_dir, packed  # noqa: F401 (fixtures)


def test_packed_load_runs_as_the_quantized_model(packed, golden, golden_int4):
  """Kept packed, the model comes with int4 weights in the checkpoint's groups and a float lm_head, and
  applies the tree as it is (the quantized Einsum): the golden logits."""
  model, params = packed
  c = model.config
  assert (c.weights, c.group_size, c.quantized_roots) == ('int4', 128, ('decoder',))
  assert _shapes(params) == _shapes(param_shapes(model))  # the model's own tree, leaf for leaf
  batch, long = _golden_logits(model, params, golden, golden_int4)
  chex.assert_trees_all_close(batch, golden_int4['batch.logits'], **TOL)
  chex.assert_trees_all_close(long, golden_int4['long.logits'], **TOL)


def test_weights_int4_at_load_keeps_the_released_values(int4_dir, packed):
  """`--weights int4` (chat, serve, qwenvl-eval) on the Int4 checkpoint reads it packed, the released
  values as they are (not quantized again); `--weights int8` quantizes its dequantized weights."""
  from qwenvl_jax.quant import load
  params, config = load(int4_dir, 'int4', 'float32')
  assert config == packed[0].config
  chex.assert_trees_all_equal(params, packed[1])
  params, config = load(int4_dir, 'int8', 'float32')
  assert config.weights == 'int8' and config.quantized_roots == ('decoder', 'lm_head')
  assert params['lm_head']['q'].dtype == np.int8 and 'kernel' not in params['decoder']['layers']['mlp']['w1']


@pytest.mark.slow
def test_packed_generation_picks_the_dequantized_tokens(packed, dequantized, golden, golden_dir):
  """generate over the packed tree (decode layout, the CPU int8 kernel) picks the dequantized load's
  greedy tokens."""
  model, params = packed
  poster = preprocess_images([golden_dir / 'img' / 'poster.jpg'], model.config.vision.image_size)
  kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
  ids = generate(model, params, golden['generate.prompt_ids'], poster, **kw)
  np.testing.assert_array_equal(ids, generate(*dequantized, golden['generate.prompt_ids'], poster, **kw))


@pytest.mark.slow
def test_qlora_over_the_packed_base(packed, dequantized, golden, golden_dir):
  """Stage-3 LoRA over the packed Int4 base (the original's finetune.py --q_lora): the loss falls over
  three steps, every base leaf (`q`, `scale`, the float ones) stays bit-identical, and the merge exports
  float kernels: the dequantized load's, plus (alpha / r) A @ B on the LoRA targets."""
  from test_train_step import _cfg, _golden_batch
  from train.lora import init_lora, merge_lora
  from train.optim import make_optimizer
  from train.step import init_state, make_train_step
  model, base = packed
  cfg = _cfg(model, lora=True, lora_rank=4, stage=3, peak_lr=1e-2, min_lr=1e-2, warmup_steps=0)
  lora = init_lora(base, cfg.lora_targets, cfg.lora_rank, jax.random.key(0))
  optimizer = make_optimizer(cfg, base)
  step = jax.jit(make_train_step(model, optimizer, cfg))  # the packed model: layers dequantize where used
  state, batch, losses = init_state(cfg, base, optimizer, lora), _golden_batch(golden, golden_dir), []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[2] < losses[1] < losses[0]
  before, after = param_layout.flatten(base), param_layout.flatten(state.params)
  assert before.keys() == after.keys()
  for path, leaf in before.items():
    assert after[path].dtype == leaf.dtype and np.asarray(after[path]).tobytes() == np.asarray(leaf).tobytes()
  merged, reference = (param_layout.flatten(t) for t in (merge_lora(state.params, state.lora, cfg.lora_alpha),
                                                         dequantized[1]))
  assert merged.keys() == reference.keys() and all(x.dtype == np.float32 for x in merged.values())
  c_proj = ('decoder', 'layers', 'mlp', 'c_proj', 'kernel')  # quantized, not a LoRA target
  np.testing.assert_array_equal(merged[c_proj], reference[c_proj])
  w2 = ('decoder', 'layers', 'mlp', 'w2', 'kernel')
  a, b = (state.lora['decoder']['layers']['mlp']['w2'][k] for k in 'ab')
  np.testing.assert_allclose(merged[w2] - reference[w2], (cfg.lora_alpha / 4) * a @ b, rtol=1e-4, atol=1e-7)
  assert np.any(np.asarray(b))
