"""`qwenvl-jax plan`: per-device memory of the released model, from shapes only."""
import subprocess
import sys

import jax
import psutil
import pytest

from qwenvl_jax import QwenVL, qwen_vl_7b
from qwenvl_jax import plan as pl
from qwenvl_jax.model import param_shapes

RELEASED_PARAMS = 9_656_935_168
V4_32 = 'data=1,fsdp=16,tensor=1'


@pytest.fixture(scope='module')
def released_leaves():
  tree = param_shapes(QwenVL(qwen_vl_7b()))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in path): leaf.size for path, leaf in flat}


def test_one_device_holds_every_parameter():
  rss = psutil.Process().memory_info().rss
  fp32 = pl.make_plan(qwen_vl_7b(), '1', dtype='float32', batch=1)
  bf16 = pl.make_plan(qwen_vl_7b(), '1', dtype='bfloat16', batch=1)
  assert psutil.Process().memory_info().rss - rss < 512 * 2 ** 20  # shapes only: 38 GB never allocated
  assert fp32.total_params == bf16.total_params == RELEASED_PARAMS
  assert fp32.params == 4 * RELEASED_PARAMS and bf16.params == 2 * RELEASED_PARAMS
  trainable = fp32.trainable_params
  assert fp32.grads == 4 * trainable and bf16.grads == 2 * trainable
  assert fp32.optimizer == 8 * trainable  # m and v
  assert bf16.optimizer == 12 * trainable  # m, v and an fp32 master copy
  mixed = pl.make_plan(qwen_vl_7b(), '1', dtype='bfloat16', param_dtype='float32', batch=1)
  assert (mixed.params, mixed.optimizer) == (fp32.params, fp32.optimizer)
  assert mixed.activations == bf16.activations < fp32.activations


def test_stages_train_the_right_parts(released_leaves):
  def size(prefix):
    return sum(n for path, n in released_leaves.items() if path[:len(prefix)] == prefix)
  fixed = size(('visual', 'attn_pool', 'pos_embed'))
  adapter = size(('visual', 'attn_pool')) - fixed
  counts = {s: pl.make_plan(qwen_vl_7b(), '1', stage=s).trainable_params for s in pl.STAGES}
  assert counts[2] == RELEASED_PARAMS - fixed
  assert counts[1] == size(('visual',)) - fixed
  assert counts[3] == RELEASED_PARAMS - size(('visual',)) + adapter
  with pytest.raises(ValueError, match='unknown stage 4'):
    pl.make_plan(qwen_vl_7b(), '1', stage=4)


def test_sharding_divides_the_state():
  one = pl.make_plan(qwen_vl_7b(), '1', batch=16, seq=1024)
  mesh = pl.make_plan(qwen_vl_7b(), V4_32, batch=16, seq=1024)
  for field in ('params', 'grads', 'optimizer'):
    whole, part = getattr(one, field), getattr(mesh, field)
    assert whole / 16 <= part < 1.01 * whole / 16, field  # only norm scales and a few biases are replicated
  assert mesh.activations == pytest.approx(one.activations / 16, rel=1e-6)  # one row per device


def test_activation_estimate_properties():
  cfg = qwen_vl_7b()
  base = pl.make_plan(cfg, V4_32, batch=16, seq=1024)
  double = pl.make_plan(cfg, V4_32, batch=32, seq=1024)
  assert double.activations == pytest.approx(2 * base.activations, rel=1e-6)
  assert base.activations_remat < base.activations / 4
  assert pl.make_plan(cfg, V4_32, batch=16, seq=1024, stage=3).activations < base.activations  # frozen ViT
  longer = pl.make_plan(cfg, V4_32, batch=16, seq=2048)
  assert longer.activations > 2 * base.activations  # attention probabilities grow with seq**2
  tp = pl.make_plan(cfg, 'data=1,fsdp=8,tensor=2', batch=8, seq=1024)
  no_tp = pl.make_plan(cfg, 'data=1,fsdp=8,tensor=1', batch=8, seq=1024)
  assert tp.activations < no_tp.activations


def test_format_lists_every_accelerator():
  plan = pl.make_plan(qwen_vl_7b(), V4_32, batch=32, seq=2048)
  text = pl.format_plan(plan)
  for name in pl.ACCELERATORS:
    assert name in text
  total = plan.total(True) / pl.GiB
  v4 = next(line for line in text.splitlines() if line.startswith('TPU v4'))
  assert v4.split()[-1] == ('fits' if total <= 0.9 * 32 else 'no')
  assert f'{total:.2f} GiB' in text and 'data=1 fsdp=16 tensor=1 (16 devices)' in text


def test_cli_errors_and_module_entry_point(capsys):
  assert pl.main(['--mesh', 'data=-1,fsdp=4', '--devices', '6']) == 2
  assert '6 devices do not divide by the fixed axes (4)' in capsys.readouterr().err
  with pytest.raises(ValueError, match='--devices'):
    pl.make_plan(qwen_vl_7b(), 'data=-1')
  for name, value in (('batch', 0), ('seq', 0), ('devices', 0), ('images', -1), ('batch', 2.0)):
    with pytest.raises(ValueError, match=f'{name} must be an integer'):
      pl.make_plan(qwen_vl_7b(), '1', **{name: value})
  assert pl.main(['--mesh', 'data=-1,fsdp=4', '--devices', '8', '--stage', '3']) == 0
  assert 'mesh data=2 fsdp=4 tensor=1 (8 devices), rules fsdp' in capsys.readouterr().out
  proc = subprocess.run([sys.executable, '-m', 'qwenvl_jax.plan', '--mesh', V4_32, '--batch', '32'],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert 'TPU v5p (95 GiB)' in proc.stdout and 'stage 2' in proc.stdout
