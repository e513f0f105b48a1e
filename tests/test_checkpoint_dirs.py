"""describe_directory: what a directory really is, and the one message every entry point (qwenvl-convert
both ways, load_pretrained) gives for the wrong kind of directory. Deleting is advised only for our own
temporary directories."""
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from convert import cli, core, paths
from qwenvl_jax import load_pretrained
from qwenvl_jax.layout import MARKER, OWNER_FILE, PARAMS_DIR, Kind, describe_directory


@pytest.fixture(scope='module')
def golden_ckpt(golden_dir):
  return golden_dir / 'checkpoint'


@pytest.fixture(scope='module')
def dirs(golden_ckpt, tmp_path_factory) -> dict[str, pathlib.Path]:
  """One directory of each kind."""
  import orbax.checkpoint as ocp
  root = tmp_path_factory.mktemp('kinds')
  out = {name: root / name for name in ('missing', 'file', 'empty', 'released', 'no-config', 'converted',
                                        'exported', 'interrupted', 'unfinished', 'orbax', 'orbax-steps',
                                        'other')}
  out['file'].write_text('x')
  out['empty'].mkdir()
  shutil.copytree(golden_ckpt, out['released'])
  shutil.copytree(golden_ckpt, out['no-config'], ignore=shutil.ignore_patterns('config.json'))
  core.hf_to_orbax(golden_ckpt, out['converted'], progress=False)
  core.orbax_to_hf(out['converted'], out['exported'], progress=False)
  tmp = root / 'out.tmp-deadbeef'  # what a killed conversion into root/out leaves
  (tmp / PARAMS_DIR).mkdir(parents=True)
  (tmp / OWNER_FILE).write_text(json.dumps({'pid': 999999, 'host': 'elsewhere', 'dst': str(root / 'out')}))
  out['interrupted'] = tmp
  shutil.copytree(out['converted'], out['unfinished'], ignore=shutil.ignore_patterns(MARKER))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out['orbax'], {'w': np.ones(3)})
  checkpointer.save(out['orbax-steps'] / '100' / 'state', {'w': np.ones(3)})
  checkpointer.wait_until_finished()
  (out['other'] / 'images').mkdir(parents=True)
  (out['other'] / 'README.md').write_text('x')
  return out


KINDS = {
    'missing': (Kind.MISSING, 'not found'), 'file': (Kind.FILE, 'a file'), 'empty': (Kind.EMPTY, 'empty'),
    'released': (Kind.RELEASED, 'released Hugging Face layout (config.json, 1 weight file)'),
    'no-config': (Kind.RELEASED, 'released Hugging Face layout (no config.json, 1 weight file)'),
    'converted': (Kind.CONVERTED, 'a converted Orbax checkpoint'),
    'exported': (Kind.EXPORTED, 'exported by qwenvl-convert --to-hf'),
    'interrupted': (Kind.INTERRUPTED, 'temporary directory of an interrupted conversion into'),
    'unfinished': (Kind.INTERRUPTED, f'{PARAMS_DIR}/ but {MARKER} missing'),
    'orbax': (Kind.ORBAX, 'Orbax checkpoint not written by qwenvl-convert'),
    'orbax-steps': (Kind.ORBAX, 'Orbax checkpoint not written by qwenvl-convert'),
    'other': (Kind.OTHER, 'no checkpoint files in it (README.md, images)'),
}


@pytest.mark.parametrize('name', KINDS)
def test_describe_directory(dirs, name):
  found = describe_directory(dirs[name])
  assert (found.kind, KINDS[name][1] in found.what) == (KINDS[name][0], True), found
  assert found.ours_to_delete == (name == 'interrupted')


@pytest.mark.parametrize('name', KINDS)
def test_every_entry_point_says_what_a_directory_is(dirs, tmp_path, capsys, name):
  """convert, --to-hf and load_pretrained on every kind: those that are wrong for it name what the
  directory is; only our own temporary directory is called deletable; nothing is written."""
  kind, what = KINDS[name]
  messages = []
  for argv, fits in (([], kind in (Kind.RELEASED, Kind.EXPORTED)), (['--to-hf'], kind is Kind.CONVERTED)):
    code = cli.main([*argv, str(dirs[name]), str(tmp_path / 'o'), '--quiet'])
    err = capsys.readouterr().err
    if fits and name != 'no-config':
      assert code == 0
      shutil.rmtree(tmp_path / 'o')
    else:
      assert code == 1 and not (tmp_path / 'o').exists()
      messages.append(err)
  if kind not in (Kind.RELEASED, Kind.EXPORTED, Kind.CONVERTED):
    with pytest.raises((ValueError, OSError)) as e:
      load_pretrained(dirs[name])
    messages.append(str(e.value))
  for message in messages:
    assert str(dirs[name]) in message and (what in message or 'config.json not found' in message), message
    assert ('delete' in message.lower()) == (name == 'interrupted'), message
  assert list(tmp_path.iterdir()) == []


def test_released_layout_given_to_to_hf(dirs, tmp_path, capsys):
  """It once said 'an incomplete conversion ... Delete it' of a released checkpoint."""
  assert cli.main(['--to-hf', str(dirs['released']), str(tmp_path / 'o'), '--quiet']) == 1
  err = capsys.readouterr().err
  assert 'is a checkpoint in the released Hugging Face layout' in err
  assert 'it is already in the released layout' in err
  assert f'qwenvl-convert {dirs["released"]} DST (without --to-hf)' in err
  assert cli.main([str(dirs['converted']), str(tmp_path / 'o'), '--quiet']) == 1
  err = capsys.readouterr().err
  assert 'it is already converted' in err and f'qwenvl-convert --to-hf {dirs["converted"]} DST' in err


def test_a_running_conversion_is_described_as_running(tmp_path):
  with paths._owned_directory(tmp_path / 'out') as tmp:
    found = describe_directory(tmp)
    assert found.kind is Kind.WRITING and f'process {os.getpid()}' in found.what and not found.ours_to_delete
  assert describe_directory(tmp).kind is Kind.INTERRUPTED  # its writer let go without renaming it
