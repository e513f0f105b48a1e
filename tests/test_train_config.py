"""Training config files and command lines: errors that name the file (or the command line) and the key,
and flags and overrides in any order."""
import json

import pytest

from qwenvl_jax.jsonfile import ConfigFileError
from train.cli import main, parse_args
from train.config import TrainConfig
from train.demo import read_demo_config


@pytest.mark.parametrize('content,problem', [
    ('{"steps": 10,', 'not valid JSON: Expecting'),
    ('[{"steps": 10}]', 'expected a JSON object ({...}) at the top level, found a list'),
    ('{"steps": "ten"}', "key 'steps': expected an integer, found a string 'ten'"),
    ('{"steps": 10.5}', "key 'steps': expected an integer, found a number 10.5"),
    ('{"lora": "yes"}', "key 'lora': expected a boolean"),
    ('{"seq_buckets": 512}', "key 'seq_buckets': expected a list, found an integer 512"),
    ('{"seq_buckets": [512, "1024"]}', "key 'seq_buckets[1]': expected an integer"),
    ('{"data": 5}', "key 'data': expected a string, found an integer 5"),
    ('{"stepz": 10}', "key 'stepz': unknown training config key; did you mean 'steps'?"),
    ('{"xyzzy_qq": 1}', "key 'xyzzy_qq': unknown training config key; known keys: b1, b2"),
])
def test_bad_config_files_name_file_and_key(tmp_path, capsys, content, problem):
  path = tmp_path / 'run.json'
  path.write_text(content)
  with pytest.raises(ConfigFileError) as e:
    TrainConfig.from_json(path)
  assert str(e.value).startswith(f'{path}: ') and problem in str(e.value)
  assert main(['--config', str(path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'qwenvl-train: error: {path}: ') and 'Traceback' not in err


def test_missing_config_file(capsys, tmp_path):
  assert main(['--config', str(tmp_path / 'absent.json')]) == 2
  assert 'not found: neither a file nor one of the packaged' in capsys.readouterr().err


def test_command_line_values_name_the_override(capsys):
  with pytest.raises(ConfigFileError, match=r"command line 'steps=abc': key 'steps': expected an integer"):
    TrainConfig.from_json('stage2', ['steps=abc'])
  cfg = TrainConfig.from_json('stage2', ['seq_buckets=64,128', 'out_dir=123', 'lora=true', 'peak_lr=1e-4'])
  assert cfg.seq_buckets == (64, 128) and cfg.out_dir == '123' and cfg.lora is True and cfg.peak_lr == 1e-4
  assert main(['--config', 'stage2', 'on_overlong=drop']) == 2
  assert "on_overlong must be one of ('truncate', 'skip', 'error')" in capsys.readouterr().err


def test_flags_and_overrides_in_any_order(capsys):
  args = parse_args(['data=x.json', '--config', 'stage2', 'steps=3', '--resume', 'out_dir=y'])
  assert args.config == 'stage2' and args.resume and args.overrides == ['data=x.json', 'steps=3', 'out_dir=y']
  assert main(['steps=3', '--config', 'stage3', 'warmup_steps=1', '--print-config', 'lora=true']) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed['steps'] == 3 and printed['warmup_steps'] == 1 and printed['lora'] is True


def test_demo_config_errors_name_the_key(tmp_path):
  from train.config import load_json
  demo = load_json('demo')
  assert read_demo_config('demo')['stages'].keys() == {'1', '2', '3'}
  del demo['world']['train_images']
  path = tmp_path / 'demo.json'
  path.write_text(json.dumps(demo))
  with pytest.raises(ConfigFileError, match=r"demo.json: key 'world.train_images': missing"):
    read_demo_config(str(path))
