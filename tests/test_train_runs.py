"""Whole runs through `qwenvl-train`'s main: late data errors, damaged checkpoints, resume checks, chaining
stages through an out_dir, and the exported chat checkpoint."""
import io
import json
import pathlib
import random
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from test_train_resume import MODEL  # the tiny real-vocabulary model of the resume tests
from train import world
from train.cli import main
from train.config import TrainConfig
from train.loader import LoaderConfig
from train.run_dir import CHECKPOINT_DIR, METRICS_FILE
from train.trainer import run



@pytest.fixture(scope='module')
def world_data(tmp_path_factory, vocab_file):
  """(root, its run config file, the TrainConfig): a small chat world and a tiny model."""
  root = tmp_path_factory.mktemp('runs')
  scenes, _ = world.make_world(root, 10, 0, seed=0, cfg=world.WorldConfig(size=56, grid=3, max_objects=2))
  data = world.write_json(world.chat_records(scenes, random.Random(0)), root / 'chat.json')
  (root / 'model.json').write_text(json.dumps(MODEL))
  cfg = TrainConfig(
      stage=3, model_config=str(root / 'model.json'), vocab=str(vocab_file), data=str(data),
      data_format='chat', image_size=28, dtype='float32', seq_buckets=(96,), target_step=16, max_images=1,
      batch_size=4, grad_accum=1, steps=3, warmup_steps=1, peak_lr=1e-3, min_lr=1e-4, save_every=1, keep=3,
      log_every=1, seed=0, peak_tflops=1.0, out_dir=str(root / 'base'))
  config = root / 'run.json'
  config.write_text(json.dumps(cfg.to_dict()))
  return root, config, cfg


def _model_and_weights(cfg, model_config, params=None):
  """The run's model config and its starting weights on one device, as the trainer makes them."""
  from qwenvl_jax.model import QwenVL, param_shapes
  from train.trainer import initial_weights, on_one_device, run_model_config
  model_config = run_model_config(cfg, model_config)
  return model_config, initial_weights(cfg, params, on_one_device(param_shapes(QwenVL(model_config))))


@pytest.fixture(scope='module')
def saved(world_data):
  """An out_dir as a run leaves it at step 3, without the cost of training: (root, config file, out_dir)."""
  import jax.numpy as jnp
  from qwenvl_jax.model import QwenVL, param_shapes
  from train.checkpointing import Checkpointer
  from train.optim import make_optimizer
  from train.run_dir import write_configs
  from train.state import from_params
  from train.trainer import base_model_config
  root, config, cfg = world_data
  out = root / 'saved'
  rng = np.random.default_rng(0)  # random values at the params' shapes: a real init costs a minute here
  shapes = param_shapes(QwenVL(base_model_config(cfg).replace(param_dtype='float32')))
  params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes)
  model_config, params = _model_and_weights(cfg, base_model_config(cfg), params)
  state = from_params(cfg, make_optimizer(cfg, params))(params)._replace(step=jnp.asarray(3, jnp.int32))
  checkpointer = Checkpointer(out / CHECKPOINT_DIR, 1, 3)
  records = len(json.loads(pathlib.Path(cfg.data).read_text()))
  checkpointer.save(3, state, {'next_batch': 3, 'seed': 0, 'records': records, 'batch_size': 4})
  checkpointer.close()
  write_configs(out, cfg.replace(out_dir=str(out)), model_config, cfg.vocab)
  return root, config, out


@pytest.fixture(scope='module')
def base(world_data):
  """A real 3-step run saving every step: (root, config file, out_dir)."""
  root, config, cfg = world_data
  run(cfg, progress=False)
  return root, config, root / 'base'


def _cli(capsys, config, *args):
  status = main(['--config', str(config), '--no-progress', *args])
  return status, capsys.readouterr().err


def _steps(out_dir):
  return sorted(ocp.CheckpointManager(out_dir / CHECKPOINT_DIR).all_steps())


def _metric_steps(out_dir):
  return [r['step'] for r in map(json.loads, (out_dir / METRICS_FILE).read_text().splitlines())]


def test_resume_with_nothing_left_says_so(saved, capsys):
  root, config, out = saved
  status, err = _cli(capsys, config, '--resume', 'steps=3', f'out_dir={out}')
  assert status == 0 and 'already at step 3 >= steps=3: nothing to do; to train further, raise steps' in err
  assert _steps(out) == [3]


@pytest.mark.parametrize('override,named', [
    ('lora=true', 'lora is true here but false in the saved run'),
    ('stage=2', 'stage is 2 here but 3 in the saved run'),
])
def test_resume_refuses_a_different_state_structure(saved, capsys, override, named):
  root, config, out = saved
  status, err = _cli(capsys, config, '--resume', 'steps=5', override, f'out_dir={out}')
  assert status == 1 and err.startswith('qwenvl-train: error: cannot resume') and named in err
  assert 'Traceback' not in err and len(err.strip().splitlines()) == 1
  other = root / 'wider.json'
  wider = {**MODEL, 'hidden_size': 256, 'kv_channels': 128, 'visual': {**MODEL['visual'], 'output_dim': 256}}
  other.write_text(json.dumps(wider))
  status, err = _cli(capsys, config, '--resume', 'steps=5', f'model_config={other}', f'out_dir={out}')
  assert status == 1 and 'model hidden_size is 256 here but 128 in the saved run' in err


def test_runtime_errors_are_one_line(saved, capsys, tmp_path):
  root, config, out = saved
  for args, message in [
      ((f'out_dir={out}',), 'already holds checkpoints: pass --resume'),
      ((f'out_dir={tmp_path / "a"}', f'init_from={tmp_path / "nope"}'),
       f'init_from={tmp_path / "nope"}: no such'),
      ((f'out_dir={tmp_path / "b"}', f'data={tmp_path / "none.json"}'), 'data file not found'),
  ]:
    status, err = _cli(capsys, config, *args)
    assert status == 1 and err.startswith('qwenvl-train: error: ') and message in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back(base, capsys, tmp_path):
  root, config, out = base
  copy = tmp_path / 'copy'
  shutil.copytree(out, copy)
  for f in (copy / CHECKPOINT_DIR / '3' / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')  # a disk that filled up, a copy cut short
  status, err = _cli(capsys, config, '--resume', f'out_dir={copy}', 'steps=4')
  assert status == 0, err
  assert 'checkpoint step 3' in err and 'is damaged' in err and 'resuming from step 2' in err
  assert 'Traceback' not in err and len(err) < 2000
  assert _steps(copy) == [2, 3, 4] and _metric_steps(copy) == [1, 2, 3, 3, 4]
  status, err = _cli(capsys, config, '--resume', f'out_dir={copy}', 'steps=4')  # step 3 was saved again
  assert status == 0 and 'is damaged' not in err and 'nothing to do' in err

  for step in (2, 3, 4):
    for f in (copy / CHECKPOINT_DIR / str(step) / 'state').rglob('*'):
      if f.is_file():
        f.write_bytes(b'garbage')
  status, err = _cli(capsys, config, '--resume', f'out_dir={copy}', 'steps=6')
  assert status == 1 and 'qwenvl-train: error: no readable checkpoint in' in err
  assert 'step 4:' in err and 'step 2:' in err


def _truncated_jpeg(path):
  buf = io.BytesIO()
  Image.open(path).convert('RGB').save(buf, 'JPEG')
  path.write_bytes(buf.getvalue()[:-20])  # the header reads, the last pixels do not


@pytest.mark.slow
def test_late_decode_error_stops_with_a_checkpoint(world_data, capsys, tmp_path, vocab_file):
  """An image whose header is fine but whose pixels are cut short can only fail when its batch loads:
  the run stops there with the last step saved and says how to resume, instead of losing everything."""
  root, config, _ = world_data
  data = tmp_path / 'data'
  shutil.copytree(root, data, ignore=shutil.ignore_patterns('base', 'saved', '*.json'))
  records = json.loads((root / 'chat.json').read_text())
  (data / 'chat.json').write_text(json.dumps(records))
  from qwenvl_jax.tokenizer import QwenVLTokenizer
  from train.validate import make_loader
  tok = QwenVLTokenizer(vocab_file, image_span_length=16)
  cfg = TrainConfig.from_json(config)
  loader_cfg = LoaderConfig(4, cfg.seq_buckets, cfg.target_step, 1, 28, cfg.seed, cfg.bucket_window)
  for image in sorted(data.glob('*.png')):  # the image that first fails at the third batch
    original = image.read_bytes()
    _truncated_jpeg(image)
    loader, _ = make_loader(records, tok, 'chat', cfg.chat_labels, loader_cfg, data)
    first_bad = next((k for k in range(loader.batches_per_epoch) if not _loads(loader, k)), None)
    if first_bad == 2:
      break
    image.write_bytes(original)
  else:
    pytest.skip('no image of this world first fails at the third batch')
  out = tmp_path / 'out'
  args = (f'data={data / "chat.json"}', f'out_dir={out}', 'steps=4', 'save_every=100')
  status, err = _cli(capsys, config, *args)
  assert status == 1 and f"stopped before step 3 of 4: {data / 'chat.json'} record " in err
  assert f"cannot decode image '{image.name}'" in err and 'on_bad_record=skip' in err
  assert f'The state after step 2 is saved in {out / CHECKPOINT_DIR}' in err and '--resume' in err
  assert _steps(out) == [2] and _metric_steps(out) == [1, 2]
  image.write_bytes(original)
  status, err = _cli(capsys, config, *args, '--resume')
  assert status == 0 and _metric_steps(out) == [1, 2, 3, 4] and _steps(out) == [2, 4]


def _loads(loader, k):
  try:
    loader.batch(k)
    return True
  except ValueError:
    return False


@pytest.mark.slow
def test_next_stage_starts_from_an_out_dir(saved, capsys, tmp_path):
  """The README's chaining example: init_from=<the out_dir of the previous stage>, nothing else; the
  vocabulary and the model come from that out_dir."""
  root, config, out = saved
  from train.trainer import base_model_config
  cfg = TrainConfig.from_json(config, [f'init_from={out}', 'model_config=', 'vocab='])
  model_config, params = _model_and_weights(cfg, base_model_config(cfg))
  saved = ocp.CheckpointManager(out / CHECKPOINT_DIR).restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state['params']
  for a, b in zip(*(map(np.asarray, jax.tree.leaves(t)) for t in (params, saved))):
    np.testing.assert_array_equal(a, b)
  status, err = _cli(capsys, config, f'init_from={out}', 'model_config=', 'vocab=', 'steps=1', 'stage=2',
                     f'out_dir={tmp_path / "s2"}')
  assert status == 0, err
  assert f'init_from {out}: the weights of its step 3' in err
  assert _metric_steps(tmp_path / 's2') == [1]


def test_export_is_a_chat_checkpoint(saved, tmp_path):
  """What `make demo` leaves in demo_out/chat loads as a model, a tokenizer and a generation config."""
  root, config, out = saved
  import qwenvl_jax as qv
  from qwenvl_jax.decode import GenerationConfig
  from train.demo import export_chat
  from train.trainer import base_model_config
  cfg = TrainConfig.from_json(config, [f'init_from={out}'])
  model_config, params = _model_and_weights(cfg, base_model_config(cfg))
  tok = qv.QwenVLTokenizer.from_pretrained(out)
  chat = export_chat(params, model_config, tok, tmp_path / 'chat', {'max_new_tokens': 8})
  model, loaded = qv.load_pretrained(chat)
  assert model.config.vision.image_size == 28 and model.config.text.hidden_size == 128
  for a, b in zip(*(map(np.asarray, jax.tree.leaves(t)) for t in (params, loaded))):
    np.testing.assert_array_equal(a, b)
  assert qv.QwenVLTokenizer.from_pretrained(chat).encode('Where?') == tok.encode('Where?')
  g = GenerationConfig.from_pretrained(chat)
  assert not g.do_sample and g.max_new_tokens == 8
