"""qwenvl-convert never loses data: destinations that overlap the source or are not ours are refused with
every file intact; outputs honour the umask; interrupted conversions are named and cleaned up safely."""
import hashlib
import json
import os
import pathlib
import shutil
import socket

import numpy as np
import pytest

from convert import cli, core, paths
from qwenvl_jax import load_pretrained
from qwenvl_jax.layout import EXPORT_MARKER, MARKER, OWNER_FILE, PARAMS_DIR


@pytest.fixture(scope='module')
def golden_ckpt(golden_dir):
  return golden_dir / 'checkpoint'


@pytest.fixture(scope='module')
def converted(golden_ckpt, tmp_path_factory):
  dst = tmp_path_factory.mktemp('conv') / 'orbax'
  core.hf_to_orbax(golden_ckpt, dst, progress=False)
  return dst


def snapshot(root: pathlib.Path) -> dict:
  """Every entry under root (root included): kind, mode, mtime, size and content hash; links not followed."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in ['.', *dirnames, *filenames]:
      p = pathlib.Path(dirpath, name)
      st = p.lstat()
      digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
      out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, st.st_size, digest,
                                       os.readlink(p) if p.is_symlink() else None)
  return out


def refused(argv: list, capsys) -> str:
  assert cli.main([*map(str, argv), '--quiet']) == 1
  return capsys.readouterr().err


def place(tree: pathlib.Path, golden_ckpt: pathlib.Path, converted: pathlib.Path) -> tuple:
  """tree/p/{hf, conv, notes.txt, data/x.bin}: a released checkpoint, a converted one and user files."""
  p = tree / 'p'
  shutil.copytree(golden_ckpt, p / 'hf')
  shutil.copytree(converted, p / 'conv')
  (p / 'notes.txt').write_text('my notes\n')
  (p / 'data').mkdir()
  (p / 'data' / 'x.bin').write_bytes(os.urandom(1000))
  (tree / 'link').symlink_to(p / 'hf')
  return p / 'hf', p / 'conv'


@pytest.mark.parametrize('to_hf', [False, True], ids=['to-orbax', 'to-hf'])
@pytest.mark.parametrize('where, relation', [
    ('src', 'is the source'), ('parent', 'contains the source'), ('inside', 'lies inside the source'),
    ('link', 'is the source'), ('dot-dot', 'contains the source')])
def test_destination_overlapping_the_source_is_refused(golden_ckpt, converted, tmp_path, capsys, to_hf,
                                                      where, relation):
  """`qwenvl-convert p/src p --overwrite` once deleted p and everything in it; now every file stays."""
  hf_src, conv_src = place(tmp_path, golden_ckpt, converted)
  src = conv_src if to_hf else hf_src
  dst = {'src': src, 'parent': src.parent, 'inside': src / 'out', 'dot-dot': src / '..',
         'link': tmp_path / 'link'}[where]
  if where == 'link' and to_hf:
    (tmp_path / 'link').unlink()
    (tmp_path / 'link').symlink_to(conv_src)
  before = snapshot(tmp_path)
  err = refused(['--to-hf'] * to_hf + [src, dst, '--overwrite'], capsys)
  assert relation in err and 'refusing to write there' in err, err
  assert snapshot(tmp_path) == before


def test_source_reached_through_a_symlinked_parent(golden_ckpt, converted, tmp_path, capsys):
  hf_src, _ = place(tmp_path, golden_ckpt, converted)
  (tmp_path / 'alias').symlink_to(tmp_path / 'p')
  before = snapshot(tmp_path)
  err = refused([tmp_path / 'alias' / 'hf', tmp_path / 'p', '--overwrite'], capsys)
  assert 'contains the source' in err
  err = refused([hf_src, tmp_path / 'alias' / 'hf' / 'sub', '--overwrite'], capsys)
  assert 'lies inside the source' in err
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize('to_hf', [False, True], ids=['to-orbax', 'to-hf'])
def test_overwrite_replaces_only_what_qwenvl_convert_wrote(golden_ckpt, converted, tmp_path, capsys, to_hf):
  """A user's folder, a released checkpoint not exported by us, a raw Orbax checkpoint, a file: refused
  with --overwrite, each left exactly as it was."""
  import orbax.checkpoint as ocp
  src = converted if to_hf else golden_ckpt
  victims = tmp_path / 'victims'
  (victims / 'folder').mkdir(parents=True)
  (victims / 'folder' / 'thesis.tex').write_text('years of work\n')
  shutil.copytree(golden_ckpt, victims / 'released')
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(victims / 'orbax' / 'state', {'w': np.ones(3)})
  checkpointer.wait_until_finished()
  (victims / 'file').write_text('a file\n')
  before = snapshot(tmp_path)
  for name, what in [('folder', 'no checkpoint files'), ('released', 'released Hugging Face layout'),
                     ('orbax', 'Orbax checkpoint not written by qwenvl-convert'), ('file', 'is a file')]:
    err = refused(['--to-hf'] * to_hf + [src, victims / name, '--overwrite'], capsys)
    assert what in err, err
    if name != 'file':
      assert '--overwrite replaces only an empty directory or one written by qwenvl-convert' in err
    assert 'delete' not in err.lower()
  assert snapshot(tmp_path) == before


def test_overwrite_replaces_our_outputs_and_empty_directories(golden_ckpt, converted, tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  assert cli.main([str(golden_ckpt), str(tmp_path / 'empty'), '--quiet']) == 1
  assert 'pass --overwrite to replace it' in capsys.readouterr().err
  assert cli.main([str(golden_ckpt), str(tmp_path / 'empty'), '--overwrite', '--quiet']) == 0
  assert (tmp_path / 'empty' / MARKER).exists()
  assert cli.main(['--to-hf', str(converted), str(tmp_path / 'hf'), '--quiet']) == 0
  assert json.loads((tmp_path / 'hf' / EXPORT_MARKER).read_text())['format'] == core.EXPORT_FORMAT
  (tmp_path / 'hf' / 'model.safetensors.index.json').write_text('{"weight_map": {}}')  # to see it replaced
  assert cli.main(['--to-hf', str(converted), str(tmp_path / 'hf'), '--overwrite', '--quiet']) == 0
  assert len(json.loads((tmp_path / 'hf' / 'model.safetensors.index.json').read_text())['weight_map']) > 10
  assert cli.main([str(tmp_path / 'hf'), str(tmp_path / 'empty'), '--overwrite', '--quiet']) == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == ['empty', 'hf']  # no temporary directory left


def test_bad_sources_and_destinations_are_named(golden_ckpt, tmp_path, capsys):
  (tmp_path / 'file').write_text('x')
  assert 'nosuch not found' in refused([tmp_path / 'nosuch', tmp_path / 'o'], capsys)
  assert 'is a file, not a checkpoint' in refused([tmp_path / 'file', tmp_path / 'o'], capsys)
  err = refused([golden_ckpt, tmp_path / 'file' / 'o'], capsys)
  assert f'{tmp_path / "file"} is a file, not a directory' in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['file']


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write anywhere')
def test_unwritable_parent_is_named(golden_ckpt, tmp_path, capsys):
  (tmp_path / 'ro').mkdir(0o555)
  err = refused([golden_ckpt, tmp_path / 'ro' / 'o'], capsys)
  assert f'no permission to write in {tmp_path / "ro"}' in err


# ----------------------------------------------------------------------------------- files

@pytest.mark.parametrize('umask', [0o022, 0o027], ids=['022', '027'])
def test_outputs_honour_the_umask(golden_ckpt, converted, tmp_path, umask):
  old = os.umask(umask)
  try:
    core.hf_to_orbax(golden_ckpt, tmp_path / 'orbax', progress=False)
    core.orbax_to_hf(converted, tmp_path / 'hf', progress=False)
  finally:
    os.umask(old)
  for out in (tmp_path / 'orbax', tmp_path / 'hf'):
    dirs = [out, *(p for p in out.rglob('*') if p.is_dir())]
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {oct(0o777 & ~umask)}, out
    files = [p for p in out.rglob('*') if p.is_file()]
    assert all(p.stat().st_mode & 0o777 & umask == 0 for p in files), out


@pytest.mark.parametrize('to_hf', [False, True], ids=['to-orbax', 'to-hf'])
def test_progress_bar_reaches_the_total(golden_ckpt, converted, tmp_path, monkeypatch, to_hf):
  """The --to-hf bar stopped at 87%: the last tensor was never counted."""
  bars, real = [], core._progress

  def recorded(total, desc, enabled):
    bars.append(real(total, desc, True))
    return bars[-1]
  monkeypatch.setattr(core, '_progress', recorded)
  if to_hf:
    core.orbax_to_hf(converted, tmp_path / 'o', shard_size=2 << 20)
  else:
    core.hf_to_orbax(golden_ckpt, tmp_path / 'o')
  [bar] = bars
  assert bar.total > 0 and bar.n == bar.total


# ----------------------------------------------------------------------------------- interrupted

def leftover(dst: pathlib.Path, suffix: str, owner: bool = True, extra: str | None = None,
             host: str = socket.gethostname()) -> pathlib.Path:
  """A temporary directory as a killed conversion into dst leaves it: owner file (nobody holds its lock),
  a params/ with a chunk file."""
  tmp = dst.with_name(f'{dst.name}.tmp-{suffix}')
  (tmp / PARAMS_DIR / 'lm_head.kernel').mkdir(parents=True)
  (tmp / PARAMS_DIR / 'lm_head.kernel' / '0.0').write_bytes(b'\0' * 4096)
  if owner:
    (tmp / OWNER_FILE).write_text(json.dumps({'pid': 999999, 'host': host, 'dst': str(dst)}))
  if extra:
    (tmp / extra).write_text('not ours\n')
  return tmp


def test_interrupted_conversions_are_named_then_cleaned(golden_ckpt, tmp_path, capsys):
  dst = tmp_path / 'o'
  stale = leftover(dst, 'deadbeef')
  old_version = leftover(dst, 'abcd_123', owner=False)  # an older qwenvl-convert wrote no owner file
  foreign = leftover(dst, 'f00dcafe', extra='notes.txt')  # our name, but something else was put in it
  other = leftover(tmp_path / 'other', 'deadbeef')  # another destination's
  remote = leftover(dst, 'a0b1c2d3', host='elsewhere')  # its lock may not be visible from here
  unrelated = tmp_path / 'o.tmp-userdata'  # not our naming (8 characters of [a-z0-9_])
  unrelated.mkdir()
  (unrelated / 'keep').write_text('x')
  with pytest.raises(FileNotFoundError, match=f'not found: {dst} .*{stale.name} is the temporary directory '
                                              'of an interrupted conversion'):
    load_pretrained(dst)
  with pytest.raises(ValueError, match='interrupted conversion into .*o.*; run qwenvl-convert again.*'
                                       'next conversion into the same destination removes it'):
    load_pretrained(stale)
  kept = {p: snapshot(p) for p in (old_version, foreign, other, unrelated, remote)}
  assert cli.main([str(golden_ckpt), str(dst), '--quiet']) == 0
  err = capsys.readouterr().err
  assert f'removed {stale}' in err and not stale.exists()
  assert f'{old_version} is the temporary directory of an interrupted conversion' in err
  assert f'{remote} is the temporary directory of an interrupted conversion into {dst} (process 999999 on ' \
         'elsewhere' in err
  assert {p: snapshot(p) for p in kept} == kept  # not provably ours, or not for this destination
  load_pretrained(dst)


def test_running_conversion_is_never_touched(golden_ckpt, tmp_path, capsys):
  """A temporary directory whose writer holds its lock is a conversion running now: refused, untouched,
  and the refusal names it (with the process)."""
  dst = tmp_path / 'o'
  with paths._owned_directory(dst) as live:
    (live / PARAMS_DIR).mkdir()
    before = snapshot(live)
    err = refused([golden_ckpt, dst], capsys)
    assert f'another conversion into {dst} is running: {live}' in err and f'process {os.getpid()}' in err
    with pytest.raises(ValueError, match='still running'):
      load_pretrained(live)
    assert snapshot(live) == before
  shutil.rmtree(live)


def test_refusals_name_leftovers(golden_ckpt, converted, tmp_path, capsys):
  dst = tmp_path / 'o'
  shutil.copytree(converted, dst)
  stale = leftover(dst, 'deadbeef')
  err = refused([golden_ckpt, dst], capsys)
  assert 'pass --overwrite' in err
  assert f'{stale} is the temporary directory of an interrupted conversion' in err
  assert stale.exists()
