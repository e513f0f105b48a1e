"""Every JSON file the model and the converter read fails with an error naming the file and the key:
config.json (types, missing keys, sizes that do not fit together), our marker, the safetensors index."""
import json
import math
import pathlib
import shutil

import pytest

from convert import cli
from qwenvl_jax import QwenVLConfig, load_pretrained
from qwenvl_jax.checkpoint import MARKER, read_marker
from qwenvl_jax.jsonfile import ConfigFileError


@pytest.fixture(scope='module')
def golden_config(golden_dir) -> dict:
  return json.loads((golden_dir / 'checkpoint' / 'config.json').read_text())


def edited(config: dict, key: str, value) -> dict:
  """config with `key` ('visual.heads' for nested) set to value, or removed when value is ...."""
  out = json.loads(json.dumps(config))
  *outer, last = key.split('.')
  d = out
  for k in outer:
    d = d[k]
  if value is ...:
    del d[last]
  else:
    d[last] = value
  return out


# (key, value, key named in the error, words of the problem)
CASES = [
    ('hidden_size', '256', 'hidden_size', "expected an integer, found a string '256'"),
    ('vocab_size', ..., 'vocab_size', 'missing (required)'),
    ('num_hidden_layers', 0, 'num_hidden_layers', 'must be at least 1, found 0'),
    ('num_hidden_layers', 2.0, 'num_hidden_layers', 'expected an integer, found a number'),
    ('num_attention_heads', 3, 'kv_channels', 'num_attention_heads (3) * kv_channels (64) must equal'),
    ('intermediate_size', 511, 'intermediate_size', 'must be even'),
    ('seq_length', 1, 'seq_length', 'must be at least 2'),
    ('rotary_pct', 0, 'rotary_pct', 'must be positive'),
    ('rotary_pct', 1.5, 'rotary_pct', 'at most kv_channels'),
    ('layer_norm_epsilon', -1e-6, 'layer_norm_epsilon', 'must be positive'),
    ('rotary_emb_base', math.inf, 'rotary_emb_base', 'must be finite'),
    ('use_logn_attn', 'yes', 'use_logn_attn', 'expected a boolean'),
    ('tie_word_embeddings', True, 'tie_word_embeddings', 'not part of Qwen-VL'),
    ('visual', [], 'visual', 'expected an object, found a list'),
    ('visual.heads', '4', 'visual.heads', 'expected an integer, found a string'),
    ('visual.heads', 3, 'visual.heads', 'visual.heads (3) must divide visual.width (64)'),
    ('visual.output_dim', 128, 'visual.output_dim', 'must equal hidden_size (256)'),
    ('visual.n_queries', 15, 'visual.n_queries', 'must be a square number'),
    ('visual.image_size', 100, 'visual.image_size', 'must be a multiple of visual.patch_size (14)'),
    ('visual.patch_size', -14, 'visual.patch_size', 'must be at least 1'),
    ('visual.image_start_id', 1022, 'visual.image_start_id', 'below vocab_size (1024)'),
    ('visual.mlp_ratio', 0.001, 'visual.mlp_ratio', 'leaves no MLP units'),
]


@pytest.mark.parametrize('key, value, named, problem', CASES, ids=[f'{c[0]}={c[1]!r}' for c in CASES])
def test_config_errors_name_file_and_key(golden_config, tmp_path, key, value, named, problem):
  file = tmp_path / 'config.json'
  file.write_text(json.dumps(edited(golden_config, key, value)))
  with pytest.raises(ConfigFileError) as e:
    QwenVLConfig.from_json(tmp_path)
  assert (e.value.file, e.value.key) == (str(file), named)
  assert problem in str(e.value) and str(e.value).startswith(f"{file}: key '{named}': ")
  with pytest.raises(ConfigFileError, match=f"^<config dict>: key '{named}': "):
    QwenVLConfig.from_dict(edited(golden_config, key, value))


@pytest.mark.parametrize('text, problem', [
    ('{"hidden_size": 256,}', 'not valid JSON: Expecting property name enclosed in double quotes at line 1'),
    ('[{"hidden_size": 256}]', 'expected a JSON object ({...}) at the top level, found a list'),
    ('', 'not valid JSON'),
])
def test_unreadable_config_files_are_named(tmp_path, text, problem):
  (tmp_path / 'config.json').write_text(text)
  with pytest.raises(ConfigFileError, match=f'^{tmp_path / "config.json"}: ') as e:
    QwenVLConfig.from_json(tmp_path / 'config.json')
  assert problem in str(e.value)
  with pytest.raises(ConfigFileError, match='found list'):
    QwenVLConfig.from_dict([])


def released_dir(golden_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  src = tmp_path / 'src'
  shutil.copytree(golden_dir / 'checkpoint', src)
  return src


def test_converter_and_loader_name_the_config_file(golden_dir, golden_config, tmp_path, capsys):
  src = released_dir(golden_dir, tmp_path)
  (src / 'config.json').write_text(json.dumps(edited(golden_config, 'hidden_size', '256')))
  assert cli.main([str(src), str(tmp_path / 'o'), '--quiet']) == 1
  err = capsys.readouterr().err
  assert f"{src / 'config.json'}: key 'hidden_size': expected an integer, found a string '256'" in err
  assert 'output_dim' not in err  # the old message blamed visual.output_dim (256) != hidden_size (256)
  with pytest.raises(ConfigFileError, match="key 'hidden_size'"):
    load_pretrained(src)
  assert not (tmp_path / 'o').exists()


@pytest.fixture(scope='module')
def converted(golden_dir, tmp_path_factory):
  dst = tmp_path_factory.mktemp('conv') / 'orbax'
  assert cli.main([str(golden_dir / 'checkpoint'), str(dst), '--quiet']) == 0
  return dst


@pytest.mark.parametrize('text, problem', [
    ('{"format": "qwenvl-jax/orbax", "version": 1', 'not valid JSON'),
    ('["qwenvl-jax/orbax"]', 'expected a JSON object'),
    ('{"format": "qwenvl-jax/orbax", "version": "1", "dtype": "float32"}',
     "key 'version': expected an integer"),
    ('{"format": "qwenvl-jax/orbax", "version": 1, "dtype": "float8"}',
     "key 'dtype': unknown dtype 'float8'"),
    ('{"format": "qwenvl-jax/orbax", "version": 1}', "key 'dtype': missing"),
    ('{"format": "other/tool", "version": 1, "dtype": "float32"}', "unknown format 'other/tool' version 1"),
])
def test_marker_errors_name_the_file(converted, tmp_path, capsys, text, problem):
  copy = tmp_path / 'copy'
  shutil.copytree(converted, copy)
  (copy / MARKER).write_text(text)
  with pytest.raises(ValueError, match=f'^{copy / MARKER}: ') as e:
    read_marker(copy)
  assert problem in str(e.value)
  assert cli.main(['--to-hf', str(copy), str(tmp_path / 'hf'), '--quiet']) == 1
  assert f'{copy / MARKER}: ' in capsys.readouterr().err
  with pytest.raises(ValueError, match=f'^{copy / MARKER}: '):
    load_pretrained(copy)


@pytest.mark.parametrize('text, problem', [
    ('{"weight_map": ', 'not valid JSON'),
    ('[]', 'expected a JSON object'),
    ('{"metadata": {}}', "key 'weight_map': missing"),
    ('{"weight_map": ["model.safetensors"]}', "key 'weight_map': expected an object, found a list"),
    ('{"weight_map": {"lm_head.weight": 3}}', "key 'weight_map': expected tensor name -> shard file name"),
])
def test_index_errors_name_the_file(golden_dir, tmp_path, capsys, text, problem):
  src = released_dir(golden_dir, tmp_path)
  (src / 'model.safetensors.index.json').write_text(text)
  assert cli.main([str(src), str(tmp_path / 'o'), '--quiet']) == 1
  err = capsys.readouterr().err
  assert f'{src / "model.safetensors.index.json"}: ' in err and problem in err, err


@pytest.mark.parametrize('header', [
    b'[1, 2]', b'{"a": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 4]}}',
    b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}'])
def test_safetensors_header_of_the_wrong_shape_is_named(golden_dir, tmp_path, capsys, header):
  src = released_dir(golden_dir, tmp_path)
  header += b' ' * (-len(header) % 8)
  (src / 'model.safetensors').write_bytes(len(header).to_bytes(8, 'little') + header + b'\0' * 8)
  assert cli.main([str(src), str(tmp_path / 'o'), '--quiet']) == 1
  err = capsys.readouterr().err
  assert f'{src / "model.safetensors"}: ' in err and ('corrupt' in err or 'unsupported dtypes' in err), err
