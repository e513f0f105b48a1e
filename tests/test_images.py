"""ImageLoader: inputs it accepts, paths and URLs it refuses. Only a local server is contacted."""
import http.server
import io
import os
import threading

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.images import ImageLoader

PROXY_VARS = ('http_proxy', 'https_proxy', 'all_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY')


def _pixels(height: int = 6, width: int = 8) -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


@pytest.fixture
def root(tmp_path):
  inside = tmp_path / 'root'
  (inside / 'sub').mkdir(parents=True)
  (inside / 'sub' / 'ok.png').write_bytes(_png(_pixels()))
  (tmp_path / 'secret.png').write_bytes(_png(_pixels()))
  return inside


def test_path_inside_root_loads(root):
  image = ImageLoader(allowed_root=root).load('sub/ok.png')
  assert image.mode == 'RGB'
  np.testing.assert_array_equal(np.asarray(image), _pixels())
  np.testing.assert_array_equal(np.asarray(ImageLoader().load(root / 'sub' / 'ok.png')), _pixels())


@pytest.mark.parametrize('path', ['../secret.png', 'sub/../../secret.png'])
def test_dotdot_escape_refused(root, path):
  with pytest.raises(PermissionError) as info:
    ImageLoader(allowed_root=root).load(path)
  assert path in str(info.value) and str(root) in str(info.value)


def test_absolute_path_outside_root_refused(root):
  with pytest.raises(PermissionError, match='outside the allowed root'):
    ImageLoader(allowed_root=root).load(root.parent / 'secret.png')


def test_symlink_escape_refused(root):
  os.symlink(root.parent / 'secret.png', root / 'link.png')
  os.symlink(root.parent, root / 'up')
  loader = ImageLoader(allowed_root=root)
  for path in ('link.png', 'up/secret.png'):
    with pytest.raises(PermissionError, match='outside the allowed root'):
      loader.load(path)


def test_symlink_within_root_loads(root):
  os.symlink(root / 'sub' / 'ok.png', root / 'alias.png')
  np.testing.assert_array_equal(np.asarray(ImageLoader(root).load('alias.png')), _pixels())


def test_missing_file_named(root):
  with pytest.raises(FileNotFoundError, match='sub/absent.png'):
    ImageLoader(allowed_root=root).load('sub/absent.png')


def test_corrupt_and_truncated_files_named(root):
  (root / 'garbage.png').write_bytes(b'this is not an image')
  (root / 'cut.png').write_bytes(_png(_pixels(64, 64))[:300])
  loader = ImageLoader(allowed_root=root)
  for name in ('garbage.png', 'cut.png'):
    with pytest.raises(ValueError, match=name):
      loader.load(name)


def test_urls_refused_by_default():
  with pytest.raises(PermissionError, match='allow_urls=True'):
    ImageLoader().load('http://127.0.0.1:9/a.png')
  with pytest.raises(ValueError, match='only http and https'):
    ImageLoader(allow_urls=True).load('file:///etc/passwd')


def test_bytes_inputs():
  data = _png(_pixels())
  for src in (data, bytearray(data), memoryview(data)):
    np.testing.assert_array_equal(np.asarray(ImageLoader().load(src)), _pixels())
  with pytest.raises(ValueError, match='cannot decode image'):
    ImageLoader().load(b'\x89PNG nope')


def test_array_inputs():
  pixels = _pixels()
  loader = ImageLoader()
  np.testing.assert_array_equal(np.asarray(loader.load(pixels)), pixels)
  floats = np.random.default_rng(1).random((5, 7, 3))
  np.testing.assert_array_equal(np.asarray(loader.load(floats)), np.round(floats * 255))
  gray = pixels[..., 0]
  for array in (gray, gray[..., None]):
    np.testing.assert_array_equal(np.asarray(loader.load(array)), np.repeat(gray[..., None], 3, -1))
  rgba = np.concatenate([pixels, np.zeros_like(pixels[..., :1])], axis=-1)
  np.testing.assert_array_equal(np.asarray(loader.load(rgba)), pixels)
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    loader.load(floats * 2)
  with pytest.raises(ValueError, match='shape'):
    loader.load(np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(ValueError, match='dtype'):
    loader.load(pixels.astype(np.int32))


def test_pil_inputs_become_rgb():
  pixels = _pixels()
  alpha = np.full(pixels.shape[:2] + (1,), 7, np.uint8)
  rgba = Image.fromarray(np.concatenate([pixels, alpha], axis=-1))
  loader = ImageLoader()
  # Alpha is dropped, not blended: the original preprocessing calls .convert('RGB') too.
  np.testing.assert_array_equal(np.asarray(loader.load(rgba)), pixels)
  for mode in ('L', 'P'):
    image = Image.fromarray(pixels).convert(mode)
    converted = loader.load(image)
    assert converted.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(converted), np.asarray(image.convert('RGB')))


class _Handler(http.server.BaseHTTPRequestHandler):
  """/ok.png: a PNG; /big: declares its large size; /stream: large, with no Content-Length."""
  png = _png(_pixels())
  big = 4096

  def do_GET(self):  # noqa: N802 (http.server's naming)
    if self.path == '/ok.png':
      self._send(self.png, length=True)
    elif self.path == '/big':
      self._send(b'\0' * self.big, length=True)
    elif self.path == '/stream':
      self._send(b'\0' * self.big, length=False)
    else:
      self.send_error(404)

  def _send(self, body: bytes, length: bool) -> None:
    self.send_response(200)
    self.send_header('Content-Type', 'application/octet-stream')
    if length:
      self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    del args  # keep test output quiet


@pytest.fixture
def server(monkeypatch):
  for var in PROXY_VARS:
    monkeypatch.delenv(var, raising=False)
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  httpd.shutdown()
  httpd.server_close()
  thread.join(timeout=5)


def test_url_fetch_when_allowed(server):
  loader = ImageLoader(allow_urls=True, timeout=5.0, max_bytes=1024)
  np.testing.assert_array_equal(np.asarray(loader.load(f'{server}/ok.png')), _pixels())
  for path in ('/big', '/stream'):
    with pytest.raises(ValueError, match='max_bytes=1024'):
      loader.load(server + path)
  with pytest.raises(OSError, match='404'):
    loader.load(f'{server}/missing.png')
  assert len(_Handler.png) < 1024 < _Handler.big
