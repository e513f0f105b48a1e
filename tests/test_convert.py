"""qwenvl-convert: released layout -> Orbax -> released layout, validation, atomicity, sharded restore."""
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import chex
import jax
import ml_dtypes
import numpy as np
import pytest

from processes import xla_flags
from safetensors.numpy import load_file, save_file

from convert import cli, core, direct_io, hf, orbax_io, source
from qwenvl_jax import load_pretrained, orbax_leaves
from qwenvl_jax.checkpoint import MARKER, PARAMS_DIR, IncompleteCheckpointError, read_released
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.params import params_from_hf

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope='module')
def golden_ckpt(golden_dir):
  return golden_dir / 'checkpoint'


@pytest.fixture(scope='module')
def golden_tensors(golden_ckpt):
  return load_file(str(golden_ckpt / 'model.safetensors'))


@pytest.fixture(scope='module')
def converted(golden_ckpt, tmp_path_factory):
  dst = tmp_path_factory.mktemp('conv') / 'orbax'
  assert cli.main([str(golden_ckpt), str(dst), '--quiet']) == 0
  return dst


def released_copy(dst: pathlib.Path, tensors: dict, shards: int = 1,
                  src_dir: pathlib.Path | None = None) -> pathlib.Path:
  """A released-layout directory written with the safetensors library, `shards` files and an index."""
  dst.mkdir(parents=True)
  if src_dir is not None:
    for name in ('config.json', 'generation_config.json'):
      shutil.copyfile(src_dir / name, dst / name)
  names = list(tensors)
  weight_map = {}
  for i in range(shards):
    part = names[i::shards]
    file = f'model-{i + 1:05d}-of-{shards:05d}.safetensors'
    save_file({n: tensors[n] for n in part}, str(dst / file), metadata={'format': 'pt'})
    weight_map.update(dict.fromkeys(part, file))
  (dst / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': weight_map}))
  return dst


def released_tensors(root: pathlib.Path) -> dict[str, np.ndarray]:
  index = json.loads((root / 'model.safetensors.index.json').read_text())
  out = {}
  for file in sorted(set(index['weight_map'].values())):
    out.update(load_file(str(root / file)))
  assert set(out) == set(index['weight_map'])
  return out


def golden_logits(model, params, golden):
  pixels = golden['pixel_values'][:2].transpose(0, 2, 3, 1)
  return jax.jit(lambda p: model.apply({'params': p}, golden['batch.input_ids'], pixels))(params)


# ----------------------------------------------------------------------------------- conversion

def test_golden_converts_and_reproduces_logits(converted, golden_ckpt, golden):
  assert sorted(p.name for p in converted.iterdir()) == sorted(
      ['config.json', 'generation_config.json', MARKER, PARAMS_DIR])
  assert json.loads((converted / MARKER).read_text())['dtype'] == 'float32'
  model, params = load_pretrained(converted)
  chex.assert_trees_all_close(golden_logits(model, params, golden), golden['batch.logits'], **TOL)
  _, reference = load_pretrained(golden_ckpt)
  chex.assert_trees_all_equal(params, reference)


def test_resharded_float16_copy_converts(golden_ckpt, golden_tensors, tmp_path):
  fp16 = {n: a.astype(np.float16) for n, a in golden_tensors.items()}
  src = released_copy(tmp_path / 'fp16', fp16, shards=3, src_dir=golden_ckpt)
  assert cli.main([str(src), str(tmp_path / 'out'), '--quiet']) == 0
  assert json.loads((tmp_path / 'out' / MARKER).read_text())['dtype'] == 'float16'
  model, params = load_pretrained(tmp_path / 'out', dtype='float16')
  expected = params_from_hf(fp16, model.config)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), expected)
  assert all(x.dtype == np.float16 for x in jax.tree.leaves(params))


def test_round_trip_is_bit_identical(converted, golden_ckpt, golden_tensors, tmp_path):
  out = tmp_path / 'hf'
  assert cli.main(['--to-hf', str(converted), str(out), '--shard-size', '2MB', '--quiet']) == 0
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  names = list(index['weight_map'])  # about the release's order: a shard holds consecutive layers
  assert names[0] == 'transformer.wte.weight' and names[-1] == 'lm_head.weight'
  assert names.index('transformer.h.0.mlp.c_proj.weight') < names.index('transformer.h.1.ln_1.weight')
  files = sorted(set(index['weight_map'].values()))
  assert len(files) > 1 and files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  assert index['metadata']['total_size'] == sum(a.nbytes for a in golden_tensors.values())
  back = released_tensors(out)
  assert set(back) == set(golden_tensors)
  for name, a in golden_tensors.items():
    assert back[name].dtype == a.dtype and back[name].shape == a.shape, name
    assert back[name].tobytes() == a.tobytes(), name
  config = json.loads((out / 'config.json').read_text())
  assert QwenVLConfig.from_dict(config) == QwenVLConfig.from_json(golden_ckpt)
  assert (config['fp32'], config['bf16'], config['torch_dtype']) == (True, False, 'float32')
  generation = 'generation_config.json'
  assert (out / generation).read_bytes() == (golden_ckpt / generation).read_bytes()


def test_round_trip_in_many_chunks(golden_ckpt, golden_tensors, tmp_path, monkeypatch):
  """Small chunks: every tensor is converted and exported in parts, exported reads straddle chunks."""
  monkeypatch.setattr(orbax_io, 'CHUNK_BYTES', 16_384)
  core.hf_to_orbax(golden_ckpt, tmp_path / 'o', progress=False)
  zarray = json.loads((tmp_path / 'o' / PARAMS_DIR / 'lm_head.kernel' / '.zarray').read_text())
  assert zarray['shape'] == [256, 1024] and zarray['chunks'] == [256, 16]  # along the vocab: torch's rows
  _, params = load_pretrained(tmp_path / 'o')
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, params),
                              params_from_hf(golden_tensors, QwenVLConfig.from_json(golden_ckpt)))
  monkeypatch.setattr(orbax_io, 'CHUNK_BYTES', 7_000)
  core.orbax_to_hf(tmp_path / 'o', tmp_path / 'hf', progress=False)
  back = released_tensors(tmp_path / 'hf')
  assert all(back[n].tobytes() == a.tobytes() for n, a in golden_tensors.items())


def test_bfloat16_round_trip_through_our_writer(golden_ckpt, golden_tensors, tmp_path):
  """bf16 (which safetensors.numpy cannot write): convert, export, and compare raw bits."""
  bf16 = {n: a.astype(ml_dtypes.bfloat16) for n, a in golden_tensors.items()}
  src = tmp_path / 'bf16'
  src.mkdir()
  shutil.copyfile(golden_ckpt / 'config.json', src / 'config.json')
  (src / 'qwen.tiktoken').write_text('stand-in vocabulary\n')
  specs = [hf.TensorSpec(n, a.dtype, a.shape) for n, a in bf16.items()]
  hf.write_released(src, specs, iter(bf16.values()), shard_size=1 << 20)
  core.hf_to_orbax(src, tmp_path / 'orbax', progress=False)
  assert (tmp_path / 'orbax' / 'qwen.tiktoken').read_text() == 'stand-in vocabulary\n'
  core.orbax_to_hf(tmp_path / 'orbax', tmp_path / 'back', progress=False)
  back = read_released(tmp_path / 'back')
  assert set(back) == set(bf16)
  for name, a in bf16.items():
    assert back[name].dtype == a.dtype and back[name].tobytes() == a.tobytes(), name
  torch = pytest.importorskip('torch')
  from safetensors.torch import load_file as torch_load_file  # an independent reader of our bf16 files
  for file in sorted((tmp_path / 'back').glob('*.safetensors')):
    for name, t in torch_load_file(str(file)).items():
      assert t.view(torch.int16).numpy().tobytes() == bf16[name].tobytes()


def test_export_reads_any_orbax_params_checkpoint(golden_ckpt, golden_tensors, tmp_path):
  """A params tree saved by plain StandardCheckpointer (OCDBT, compressed), as training writes them."""
  import orbax.checkpoint as ocp
  config = QwenVLConfig.from_json(golden_ckpt)
  src = tmp_path / 'trained'
  src.mkdir()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(src / PARAMS_DIR, params_from_hf(golden_tensors, config))
  checkpointer.wait_until_finished()
  shutil.copyfile(golden_ckpt / 'config.json', src / 'config.json')
  (src / MARKER).write_text(json.dumps({'format': 'qwenvl-jax/orbax', 'version': 1, 'dtype': 'float32'}))
  assert ocp.type_handlers.is_ocdbt_checkpoint(src / PARAMS_DIR)
  _, params = load_pretrained(src)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), params_from_hf(golden_tensors, config))
  core.orbax_to_hf(src, tmp_path / 'hf', progress=False)
  back = released_tensors(tmp_path / 'hf')
  assert all(back[n].tobytes() == a.tobytes() for n, a in golden_tensors.items())


def test_dtype_option_casts(golden_ckpt, golden_tensors, tmp_path):
  assert cli.main([str(golden_ckpt), str(tmp_path / 'o'), '--dtype', 'bfloat16', '--quiet']) == 0
  model, params = load_pretrained(tmp_path / 'o', dtype='bfloat16')
  expected = params_from_hf(golden_tensors, model.config, dtype=ml_dtypes.bfloat16)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), expected)


def test_torch_bin_shards(golden_ckpt, golden_tensors, tmp_path):
  torch = pytest.importorskip('torch')
  src = tmp_path / 'bin'
  src.mkdir()
  shutil.copyfile(golden_ckpt / 'config.json', src / 'config.json')
  names = list(golden_tensors)
  weight_map = {}
  for i, part in enumerate((names[0::2], names[1::2])):
    file = f'pytorch_model-{i + 1:05d}-of-00002.bin'
    torch.save({n: torch.from_numpy(golden_tensors[n]).to(torch.bfloat16) for n in part}, src / file)
    weight_map.update(dict.fromkeys(part, file))
  (src / 'pytorch_model.bin.index.json').write_text(json.dumps({'weight_map': weight_map}))
  core.hf_to_orbax(src, tmp_path / 'o', progress=False)
  _, params = load_pretrained(tmp_path / 'o', dtype='bfloat16')
  expected = params_from_hf(golden_tensors, QwenVLConfig.from_json(golden_ckpt), dtype=ml_dtypes.bfloat16)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), expected)


def test_bin_without_torch_says_what_to_install(golden_ckpt, tmp_path, monkeypatch, capsys):
  src = tmp_path / 'bin'
  src.mkdir()
  shutil.copyfile(golden_ckpt / 'config.json', src / 'config.json')
  (src / 'pytorch_model.bin').write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)
  assert cli.main([str(src), str(tmp_path / 'o'), '--quiet']) == 1
  assert 'qwenvl-jax[torch]' in capsys.readouterr().err


def test_load_with_single_sharding(converted, golden):
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices()[:1], ('x',)),
                                        jax.sharding.PartitionSpec())
  model, params = load_pretrained(converted, shardings=sharding)
  assert all(x.sharding == sharding for x in jax.tree.leaves(params))
  chex.assert_trees_all_close(golden_logits(model, params, golden), golden['batch.logits'], **TOL)
  with pytest.raises(ValueError, match='shardings do not match.*wte/embedding'):
    load_pretrained(converted, shardings={'decoder': jax.tree.map(lambda _: sharding, params['decoder'])})


def test_restore_onto_an_8_device_mesh(converted, tmp_path):
  script = textwrap.dedent(f'''
      import jax, numpy as np
      from qwenvl_jax import load_pretrained, sharding as sh
      mesh = sh.make_mesh('2x2x2')
      _, ref = load_pretrained({str(converted)!r})
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ref)
      shardings = sh.param_shardings(mesh, abstract, 'fsdp_tp')
      _, params = load_pretrained({str(converted)!r}, shardings=shardings)
      split = 0
      for (path, x), s, r in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings),
                                 jax.tree.leaves(ref)):
        assert x.sharding == s, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(r))
        split += x.addressable_shards[0].data.size < x.size
      assert split > 20, split
      print('OK', split)
      ''')
  env = dict(os.environ, XLA_FLAGS=xla_flags('--xla_force_host_platform_device_count=8'), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------------- validation

def convert_error(src: pathlib.Path, dst: pathlib.Path, capsys) -> str:
  assert cli.main([str(src), str(dst), '--quiet']) == 1
  assert not dst.exists()
  assert not list(dst.parent.glob(dst.name + '.tmp-*'))
  return capsys.readouterr().err


def test_missing_tensor(golden_ckpt, golden_tensors, tmp_path, capsys):
  tensors = {n: a for n, a in golden_tensors.items() if n != 'transformer.h.1.mlp.w2.weight'}
  src = released_copy(tmp_path / 'src', tensors, src_dir=golden_ckpt)
  err = convert_error(src, tmp_path / 'o', capsys)
  assert '1 missing: transformer.h.1.mlp.w2.weight' in err


def test_unexpected_tensor(golden_ckpt, golden_tensors, tmp_path, capsys):
  tensors = dict(golden_tensors, **{'transformer.h.2.ln_1.weight': np.ones(256, np.float32)})
  src = released_copy(tmp_path / 'src', tensors, src_dir=golden_ckpt)
  err = convert_error(src, tmp_path / 'o', capsys)
  assert '1 unexpected: transformer.h.2.ln_1.weight' in err


def test_misshaped_tensor(golden_ckpt, golden_tensors, tmp_path, capsys):
  tensors = dict(golden_tensors, **{'lm_head.weight': golden_tensors['lm_head.weight'][:1000]})
  src = released_copy(tmp_path / 'src', tensors, src_dir=golden_ckpt)
  err = convert_error(src, tmp_path / 'o', capsys)
  assert '1 mis-shaped: lm_head.weight (1000, 256) (expected (1024, 256))' in err


def test_all_problems_reported_together(golden_ckpt, golden_tensors, tmp_path, capsys):
  tensors = {n: a for n, a in golden_tensors.items() if n != 'transformer.visual.proj'}
  tensors['extra.weight'] = np.zeros(3, np.float32)
  tensors['transformer.wte.weight'] = golden_tensors['transformer.wte.weight'][:, :128]
  src = released_copy(tmp_path / 'src', tensors, shards=2, src_dir=golden_ckpt)
  err = convert_error(src, tmp_path / 'o', capsys)
  for part in ('missing: transformer.visual.proj', 'unexpected: extra.weight',
               'mis-shaped: transformer.wte.weight (1024, 128)'):
    assert part in err


def test_index_pointing_at_missing_shard(golden_ckpt, golden_tensors, tmp_path, capsys):
  src = released_copy(tmp_path / 'src', golden_tensors, shards=3, src_dir=golden_ckpt)
  (src / 'model-00002-of-00003.safetensors').unlink()
  err = convert_error(src, tmp_path / 'o', capsys)
  assert 'missing: model-00002-of-00003.safetensors' in err


def test_index_disagreeing_with_shards(golden_ckpt, golden_tensors, tmp_path, capsys):
  src = released_copy(tmp_path / 'src', golden_tensors, shards=2, src_dir=golden_ckpt)
  index = json.loads((src / 'model.safetensors.index.json').read_text())
  index['weight_map']['lm_head.weight'] = 'model-00002-of-00002.safetensors'
  if index['weight_map']['transformer.wte.weight'] == 'model-00002-of-00002.safetensors':
    index['weight_map']['lm_head.weight'] = 'model-00001-of-00002.safetensors'
  del index['weight_map']['transformer.ln_f.weight']
  (src / 'model.safetensors.index.json').write_text(json.dumps(index))
  err = convert_error(src, tmp_path / 'o', capsys)
  assert 'lm_head.weight (index: ' in err and 'missing from the index: transformer.ln_f.weight' in err


def test_truncated_shard(golden_ckpt, golden_tensors, tmp_path, capsys):
  src = released_copy(tmp_path / 'src', golden_tensors, shards=2, src_dir=golden_ckpt)
  shard = src / 'model-00002-of-00002.safetensors'
  shard.write_bytes(shard.read_bytes()[:-1000])
  err = convert_error(src, tmp_path / 'o', capsys)
  assert 'model-00002-of-00002.safetensors: truncated' in err and 'tensors cut off: ' in err


@pytest.mark.parametrize('garbage', [
    b'\x01', b'\xff' * 8 + b'{}', (20).to_bytes(8, 'little') + b'{"a": [1, 2}   ' * 2])
def test_corrupt_shard(golden_ckpt, tmp_path, capsys, garbage):
  src = tmp_path / 'src'
  src.mkdir()
  shutil.copyfile(golden_ckpt / 'config.json', src / 'config.json')
  (src / 'model.safetensors').write_bytes(garbage)
  err = convert_error(src, tmp_path / 'o', capsys)
  assert 'model.safetensors' in err and ('not a safetensors file' in err or 'corrupt' in err)


def test_no_checkpoint_and_no_config(golden_ckpt, tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  err = convert_error(tmp_path / 'empty', tmp_path / 'o', capsys)
  assert 'empty is an empty directory, not a checkpoint in the released layout' in err
  shutil.copyfile(golden_ckpt / 'config.json', tmp_path / 'empty' / 'config.json')
  err = convert_error(tmp_path / 'empty', tmp_path / 'o', capsys)
  assert 'a directory with no checkpoint files in it (config.json)' in err
  shutil.copyfile(golden_ckpt / 'model.safetensors', tmp_path / 'empty' / 'model.safetensors')
  (tmp_path / 'empty' / 'config.json').unlink()
  assert 'config.json not found' in convert_error(tmp_path / 'empty', tmp_path / 'o', capsys)


def test_mixed_dtypes_need_dtype(golden_ckpt, golden_tensors, tmp_path, capsys):
  tensors = dict(golden_tensors, **{'lm_head.weight': golden_tensors['lm_head.weight'].astype(np.float16)})
  src = released_copy(tmp_path / 'src', tensors, src_dir=golden_ckpt)
  err = convert_error(src, tmp_path / 'o', capsys)
  assert 'mixes dtypes (float16, float32); choose one with --dtype' in err
  assert cli.main([str(src), str(tmp_path / 'o'), '--dtype', 'float32', '--quiet']) == 0


def test_existing_destination_is_refused(converted, golden_ckpt, tmp_path, capsys):
  """Without --overwrite even our own output stays (tests/test_convert_safety.py: what --overwrite may
  replace)."""
  dst = tmp_path / 'o'
  shutil.copytree(converted, dst)
  (dst / 'config.json').write_text('{}')  # to see it replaced
  assert cli.main([str(golden_ckpt), str(dst), '--quiet']) == 1
  assert 'already exists (a converted Orbax checkpoint' in capsys.readouterr().err
  assert cli.main(['--to-hf', str(converted), str(dst), '--quiet']) == 1
  assert 'pass --overwrite to replace it' in capsys.readouterr().err
  assert (dst / 'config.json').read_text() == '{}'
  assert cli.main([str(golden_ckpt), str(dst), '--overwrite', '--quiet']) == 0
  assert (dst / 'config.json').read_bytes() == (golden_ckpt / 'config.json').read_bytes()
  assert [p.name for p in tmp_path.iterdir()] == ['o']


def test_bad_arguments_exit_2(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(['a', 'b', '--shard-size', '2 parsecs'])
  assert e.value.code == 2 and 'not a size' in capsys.readouterr().err
  assert cli.parse_size('2GB') == 2 * 10**9 and cli.parse_size('500MiB') == 500 * 2**20


# ----------------------------------------------------------------------------------- atomicity

def test_failure_mid_write_leaves_nothing(golden_ckpt, tmp_path, monkeypatch):
  calls = []

  def failing_pieces(leaf, *args):
    calls.append(leaf.path)
    if len(calls) == 20:
      raise OSError('No space left on device (simulated)')
    return real(leaf, *args)

  real = orbax_io.leaf_pieces
  monkeypatch.setattr(orbax_io, 'leaf_pieces', failing_pieces)
  with pytest.raises(OSError, match='simulated'):
    core.hf_to_orbax(golden_ckpt, tmp_path / 'o', progress=False)
  assert len(calls) == 20 and list(tmp_path.iterdir()) == []


def _convert_and_signal(golden_ckpt, tmp_path, sig: str) -> subprocess.CompletedProcess:
  """Runs a conversion in a subprocess that sends itself `signal.<sig>` at the 30th piece written."""
  script = textwrap.dedent(f'''
      import os, signal
      from convert import core, orbax_io
      # A shell starts background jobs with SIGINT ignored, which Python then keeps (and so does the
      # converter, rightly); the test is of a process that Ctrl-C can reach.
      signal.signal(signal.SIGINT, signal.default_int_handler)
      real, count = orbax_io.leaf_pieces, [0]
      def pieces(*args):
        count[0] += 1
        if count[0] == 30:
          os.kill(os.getpid(), signal.{sig})
        return real(*args)
      orbax_io.leaf_pieces = pieces
      core.hf_to_orbax({str(golden_ckpt)!r}, {str(tmp_path / 'o')!r}, progress=False)
      ''')
  return subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True)


def test_killed_conversion_never_loads(golden_ckpt, tmp_path):
  """SIGKILL half-way through the writes: DST never appears and the leftover .tmp- dir refuses to load."""
  result = _convert_and_signal(golden_ckpt, tmp_path, 'SIGKILL')
  assert result.returncode == -9, result.stderr[-2000:]
  assert not (tmp_path / 'o').exists()
  [leftover] = tmp_path.glob('o.tmp-*')
  assert any(leftover.iterdir())  # it did start writing
  with pytest.raises(IncompleteCheckpointError, match='interrupted'):
    load_pretrained(leftover)
  with pytest.raises(IncompleteCheckpointError):
    core.orbax_to_hf(leftover, tmp_path / 'hf', progress=False)
  with pytest.raises(FileNotFoundError, match=f'{leftover} is the temporary directory of an interrupted'):
    load_pretrained(tmp_path / 'o')
  core.hf_to_orbax(golden_ckpt, tmp_path / 'o', progress=False)  # the dead writer's directory goes
  assert [p.name for p in tmp_path.iterdir()] == ['o']


def test_ctrl_c_stops_the_writer_and_cleans_up(golden_ckpt, tmp_path):
  """SIGINT half-way: the writer thread stops, the temporary directory goes, nothing is left."""
  result = _convert_and_signal(golden_ckpt, tmp_path, 'SIGINT')
  assert result.returncode != 0 and 'KeyboardInterrupt' in result.stderr, result.stderr[-2000:]
  assert list(tmp_path.iterdir()) == []


def test_incomplete_directories_refuse_to_load(converted, tmp_path):
  copy = tmp_path / 'copy'
  shutil.copytree(converted, copy)
  (copy / MARKER).unlink()
  with pytest.raises(IncompleteCheckpointError, match='qwenvl_checkpoint.json missing'):
    load_pretrained(copy)
  shutil.copyfile(converted / MARKER, copy / MARKER)
  (copy / PARAMS_DIR / '_METADATA').unlink()
  with pytest.raises(IncompleteCheckpointError, match='params/ is missing or incomplete'):
    load_pretrained(copy)


def test_converted_params_must_match_config(converted, tmp_path, capsys):
  copy = tmp_path / 'copy'
  shutil.copytree(converted, copy)
  config = json.loads((copy / 'config.json').read_text())
  config['num_hidden_layers'] = 3
  (copy / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r'mis-shaped: decoder/layers/attn/c_attn/bias \(2, 3, 4, 64\)'):
    load_pretrained(copy)
  assert cli.main(['--to-hf', str(copy), str(tmp_path / 'hf'), '--quiet']) == 1
  assert 'mis-shaped: decoder/layers/attn/c_attn/bias (2, 3, 4, 64)' in capsys.readouterr().err


def test_released_tensors_must_match_config(golden_ckpt, tmp_path, capsys):
  """A config.json that does not describe its tensors: every tensor in question named, converting and
  loading alike."""
  src = tmp_path / 'src'
  shutil.copytree(golden_ckpt, src)
  config = json.loads((src / 'config.json').read_text())
  config['num_hidden_layers'] = 3
  (src / 'config.json').write_text(json.dumps(config))
  err = convert_error(src, tmp_path / 'o', capsys)
  missing = [f'transformer.h.2.{n}' for n in ('attn.c_attn.weight', 'ln_1.weight', 'mlp.w1.weight')]
  assert all(name in err for name in missing) and 'missing: ' in err, err
  with pytest.raises(ValueError) as e:
    load_pretrained(src)
  assert all(name in str(e.value) for name in missing), e.value


# ----------------------------------------------------------------------------------- pieces

def test_pieces_are_chunk_aligned_and_exact(monkeypatch):
  f32 = np.dtype(np.float32)
  hf_value = np.random.default_rng(0).standard_normal((40, 10)).astype(np.float32)  # Linear [out, in]
  # The kernel [10, 40] is cut along axis 1, the source's rows: 480-byte chunks hold 12 columns, so 4 chunks
  # of 10 (evened out: zarr stores the last chunk at full size).
  monkeypatch.setattr(orbax_io, 'CHUNK_BYTES', 12 * 10 * 4)
  leaf = orbax_io.StreamedLeaf(('k',), (2, 10, 40), f32, stacked=True, chunk_axis=1)
  assert leaf.chunk_shape == (1, 10, 10)
  pool = direct_io.BufferPool(cap=1 << 20)
  pieces = list(orbax_io.leaf_pieces(leaf, 1, source.ArrayRows(hf_value), (1, 0)))
  assert [(p.chunk, p.shape) for p in pieces] == [((1, 0, i), (10, 10)) for i in range(4)]
  blocks = []
  for p in pieces:
    with p.open(pool) as value:
      blocks.append(np.array(value))
  np.testing.assert_array_equal(np.concatenate(blocks, axis=1), hf_value.T)
  with pytest.raises(ValueError, match='expected'):
    list(orbax_io.leaf_pieces(leaf, 0, source.ArrayRows(hf_value), None))
  rows = orbax_io.StreamedLeaf(('b',), (10, 40), f32, stacked=False)
  monkeypatch.setattr(orbax_io, 'CHUNK_BYTES', 4 * 40 * 4)
  assert rows.chunk_shape == (4, 40)
  pieces = orbax_io.leaf_pieces(rows, None, source.ArrayRows(hf_value.T), None)
  assert [(p.chunk, p.shape) for p in pieces] == [((0, 0), (4, 40)), ((1, 0), (4, 40)), ((2, 0), (2, 40))]
  monkeypatch.setattr(orbax_io, 'CHUNK_BYTES', 6 * 40 * 4)
  assert rows.chunk_shape == (5, 40)


def test_edge_chunks_are_padded_with_zeros(tmp_path, monkeypatch):
  """10 rows in chunks of 4: the last chunk file holds 2 rows then 2 rows of zeros, and reads back."""
  monkeypatch.setattr(orbax_io, 'CHUNK_BYTES', 4 * 3 * 4)
  value = np.arange(1, 31, dtype=np.float32).reshape(10, 3)
  leaf = orbax_io.StreamedLeaf(('x',), (10, 3), np.dtype(np.float32), stacked=False)
  pieces = orbax_io.leaf_pieces(leaf, None, source.ArrayRows(value), None)
  orbax_io.save_streamed(tmp_path / 'p', [leaf], pieces)
  np.testing.assert_array_equal(orbax_leaves.LeafReader(tmp_path / 'p').read(('x',)), value)
  last = np.frombuffer((tmp_path / 'p' / 'x' / '2.0').read_bytes(), np.float32)
  np.testing.assert_array_equal(last, np.concatenate([value[8:].ravel(), np.zeros(6, np.float32)]))


@pytest.mark.parametrize('direct', [True, False])
def test_direct_io_with_and_without_o_direct(tmp_path, monkeypatch, direct):
  """Unaligned tensors read back exactly; files are cut to size; filesystems that refuse O_DIRECT work."""
  if not direct:
    real_open = os.open

    def refuse_direct(path, flags, *args):
      if flags & getattr(os, 'O_DIRECT', 0):
        raise OSError(errno.EINVAL, 'O_DIRECT refused (simulated)')
      return real_open(path, flags, *args)
    monkeypatch.setattr(os, 'open', refuse_direct)
  data = np.random.default_rng(2).standard_normal((300, 7)).astype(np.float32)
  file = tmp_path / 'shard'
  file.write_bytes(b'x' * 1001 + data.tobytes())
  pool = direct_io.BufferPool(cap=1 << 20)
  rows = source.FileRows(file, 1001, (300, 7), np.dtype(np.float32))
  with rows.read(250, 300, pool) as block:
    np.testing.assert_array_equal(block, data[250:])
  with rows.reshape((2100,)).read(3, 10, pool) as block:
    np.testing.assert_array_equal(block, data.ravel()[3:10])
  with pytest.raises(OSError, match='ends 28 bytes early'):
    with source.FileRows(file, 1001, (301, 7), np.dtype(np.float32)).read(299, 301, pool):
      pass
  buf = pool.get(5000)
  buf[:] = np.arange(buf.size) % 251
  direct_io.write_file(str(tmp_path / 'out'), buf, 5000)
  assert (tmp_path / 'out').read_bytes() == buf[:5000].tobytes()


def test_buffer_pool_reuses_aligns_and_caps():
  align = direct_io.ALIGN
  pool = direct_io.BufferPool(cap=4 * align)
  a = pool.get(100)
  assert a.dtype == np.uint8 and a.nbytes == align and a.ctypes.data % align == 0
  pool.put(a)
  assert pool.get(align) is a
  b, c = pool.get(3 * align - 5), pool.get(3 * align)
  assert b.nbytes == c.nbytes == 3 * align and not np.shares_memory(b, c)
  pool.put(b)
  pool.put(c)  # over the cap: dropped
  assert pool.get(3 * align) is b
  assert pool.get(3 * align) is not c
  pool = direct_io.BufferPool(cap=1 << 26)
  rows = pool.get((16 << 20) + 100)
  pool.put(rows)
  assert pool.get((16 << 20) + 3 * align) is rows  # rows at another offset: the same size class


def test_blocked_copy_matches_numpy(monkeypatch):
  monkeypatch.setattr(orbax_io, 'COPY_BLOCK', 256)
  a = np.random.default_rng(1).standard_normal((6, 4, 5, 7)).astype(np.float32)
  for perm in [(3, 0, 1, 2), (3, 1, 0, 2), (1, 2, 0, 3), (2, 3, 1, 0)]:
    view = np.transpose(a, perm)
    out = orbax_io.contiguous(view, np.dtype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(out, view.astype(ml_dtypes.bfloat16))
    same = np.transpose(a.astype(ml_dtypes.bfloat16), perm)  # copied as 16-bit integers
    assert orbax_io.contiguous(same, same.dtype).tobytes() == np.ascontiguousarray(same).tobytes()
