"""Checkpoints that resume: 6 straight steps equal 3 steps, a stop, a resume and 3 more, bit for bit (the
resumed run reading the same records packed, decoded by two grain workers)."""
import json
import random
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import world
from train.config import TrainConfig
from train.run_dir import CHECKPOINT_DIR, METRICS_FILE, TrainError
from train.packing import pack
from train.trainer import run

# The real vocabulary needs the full 151936-row embedding; everything else is as small as it goes.
MODEL = {
    'vocab_size': 151936, 'hidden_size': 128, 'num_hidden_layers': 1, 'num_attention_heads': 2,
    'kv_channels': 64, 'intermediate_size': 256, 'seq_length': 256,
    'visual': {'image_size': 28, 'patch_size': 14, 'width': 32, 'layers': 1, 'heads': 2, 'mlp_ratio': 2.0,
               'output_dim': 128, 'n_queries': 16, 'image_start_id': 151857},
}


@pytest.fixture(scope='module')
def setup(tmp_path_factory, vocab_file):
  root = tmp_path_factory.mktemp('resume')
  scenes, _ = world.make_world(root, 24, 0, seed=0, cfg=world.WorldConfig(size=56, grid=3, max_objects=3))
  data = world.write_json(world.chat_records(scenes, random.Random(0)), root / 'chat.json')
  (root / 'config.json').write_text(json.dumps(MODEL))
  cfg = TrainConfig(
      stage=3, model_config=str(root / 'config.json'), vocab=str(vocab_file), data=str(data),
      data_format='chat', image_size=28, dtype='bfloat16', seq_buckets=(96,), target_step=16, max_images=1,
      batch_size=4, grad_accum=2, steps=6, warmup_steps=2, peak_lr=1e-3, min_lr=1e-4, save_every=3,
      log_every=1, seed=3, peak_tflops=1.0)
  return root, cfg


def _restore(directory, step):
  manager = ocp.CheckpointManager(directory)
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      loader=ocp.args.JsonRestore()))
  manager.close()
  return out.state, out.loader


def _assert_bitwise_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _refuse(*args, **kwargs):
  raise AssertionError('a resume initialised the state or read weights')


def _losses(out_dir):
  lines = (out_dir / METRICS_FILE).read_text().splitlines()
  return {r['step']: r['loss'] for r in map(json.loads, lines)}


@pytest.mark.slow
def test_six_steps_equal_three_plus_resume_plus_three(setup, monkeypatch):
  """The straight run reads the JSON file in the training process; the stopped and resumed one reads the
  same records packed, through 2 grain worker processes: same batches, same state, bit for bit. The resume
  initialises nothing and reads no weights."""
  root, cfg = setup
  straight_dir, split_dir = root / 'straight', root / 'split'
  _, straight, logged = run(cfg.replace(out_dir=str(straight_dir)), progress=False)
  assert [r['step'] for r in logged] == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite(r['loss']) and r['tokens_per_s'] > 0 and r['mfu'] > 0 for r in logged)

  pack(cfg.data, root / 'packed', 'chat', shard_size=10, span=16, say=lambda _: None)
  split_cfg = cfg.replace(out_dir=str(split_dir), data=str(root / 'packed'), worker_count=2)
  run(split_cfg, progress=False, stop_after=3)
  assert sorted(ocp.CheckpointManager(split_dir / CHECKPOINT_DIR).all_steps()) == [3]
  with pytest.raises(TrainError, match='--resume'):
    run(split_cfg, progress=False)
  with monkeypatch.context() as m:  # fresh model, optimizer, loader, jit; no init, no weights read
    for target in ('train.trainer.create', 'train.trainer.initial_weights'):
      m.setattr(target, _refuse)
    _, resumed, _ = run(split_cfg, progress=False, resume=True)

  _assert_bitwise_equal(straight, resumed)
  state_a, loader_a = _restore(straight_dir / CHECKPOINT_DIR, 6)
  state_b, loader_b = _restore(split_dir / CHECKPOINT_DIR, 6)
  _assert_bitwise_equal(state_a, state_b)  # params, optimizer moments and counts, step
  assert loader_a == loader_b and loader_a['next_batch'] == 6
  a, b = _losses(straight_dir), _losses(split_dir)
  assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # the data order continued exactly
  assert len(set(a.values())) == 6


@pytest.mark.slow
def test_cli_lora_stop_and_resume(setup):
  """The console entry point in new processes, LoRA on: a stopped and resumed run ends where a
  straight one does, and exports a merged checkpoint that loads."""
  root, cfg = setup
  config = root / 'lora.json'
  config.write_text(json.dumps({**cfg.to_dict(), 'lora': True, 'lora_rank': 4}))

  def cli(out, *extra):
    subprocess.run([sys.executable, '-m', 'train.cli', '--config', str(config), f'out_dir={root / out}',
                    f'export_dir={root / out / "export"}', '--no-progress', *extra], check=True)

  cli('cli_straight')
  cli('cli_split', '--stop-after', '3')
  cli('cli_split', '--resume')
  _assert_bitwise_equal(_restore(root / 'cli_straight' / CHECKPOINT_DIR, 6),
                        _restore(root / 'cli_split' / CHECKPOINT_DIR, 6))
  from qwenvl_jax import load_pretrained
  _, merged = load_pretrained(root / 'cli_split' / 'export')
  _, straight = load_pretrained(root / 'cli_straight' / 'export')
  _assert_bitwise_equal(merged, straight)
  state, _ = _restore(root / 'cli_split' / CHECKPOINT_DIR, 6)
  assert np.any(np.asarray(state['lora']['decoder']['layers']['mlp']['w1']['b']))
  # The next stage from this out_dir starts from the same merged weights (merged there under jit).
  from train.trainer import initial_weights, on_one_device
  started = initial_weights(cfg.replace(init_from=str(root / 'cli_split')), None, on_one_device(merged))
  for a, b in zip(jax.tree.leaves(started), jax.tree.leaves(merged)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_cli_rejects_bad_overrides(capsys):
  from train.cli import main
  assert main(['--config', 'stage2', 'stepz=3']) == 2
  assert "key 'stepz': unknown training config key; did you mean 'steps'?" in capsys.readouterr().err
  assert main(['--config', 'stage2', 'steps=abc']) == 2
  assert "key 'steps': expected an integer" in capsys.readouterr().err
  assert main(['--config', 'stage2', 'grad_accum=3']) == 2  # 4096 is not a multiple of 3
  assert main(['--config', 'stage9']) == 2


def test_cli_prints_resolved_config(capsys):
  from train.cli import main
  assert main(['--config', 'stage3', 'steps=10', 'warmup_steps=5', 'seq_buckets=[64,128]', 'lora=true',
               '--print-config']) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed['steps'] == 10 and printed['seq_buckets'] == [64, 128] and printed['lora'] is True
  assert printed['stage'] == 3 and printed['peak_lr'] == 1e-5
