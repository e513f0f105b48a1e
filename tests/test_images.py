"""ImageLoader: inputs it accepts, paths and URLs it refuses. Only a local server is contacted."""
import http.server
import io
import os
import struct
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.images import ImageLoader, to_rgb

PROXY_VARS = ('http_proxy', 'https_proxy', 'all_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY')


def _pixels(height: int = 6, width: int = 8) -> np.ndarray:
  return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _png16(array: np.ndarray, width: int | None = None, height: int | None = None) -> bytes:
  """A 16-bit PNG of an HW (grey) or HW3 (RGB) uint16 array, written by hand: Pillow cannot write
  16-bit colour. `width`/`height` override the header's size (for decompression bombs)."""
  grey = array.ndim == 2
  rows = b''.join(b'\0' + row.astype('>u2').tobytes() for row in array)
  header = struct.pack('>IIBBBBB', width or array.shape[1], height or array.shape[0], 16,
                       0 if grey else 2, 0, 0, 0)

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows))
          + chunk(b'IEND', b''))


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


def test_a_server_loader_names_paths_only_as_sent(root):
  """reveal_paths=False (the server's): refusals name the path as the client sent it, never the root or
  the file it resolved to; an unreadable body is named without Pillow's object repr."""
  loader = ImageLoader(allowed_root=root, reveal_paths=False)
  for path, error in [('../secret.png', PermissionError), ('/etc/hostname', PermissionError),
                      ('sub/../missing.png', FileNotFoundError)]:
    with pytest.raises(error) as info:
      loader.load(path)
    assert path in str(info.value) and str(root) not in str(info.value), info.value
  with pytest.raises(ValueError) as info:
    loader.load(b'not an image')
  assert 'not an image format' in str(info.value) and '0x' not in str(info.value), info.value


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
  with pytest.raises(PermissionError, match='allow_urls=True') as info:
    ImageLoader().load('http://127.0.0.1:9/a.png')
  assert '--allow-urls' in str(info.value) and 'http://127.0.0.1:9/a.png' in str(info.value)
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


@pytest.mark.parametrize('path', ['', ' ', '\t\n'])
def test_empty_path_refused(root, path):
  for loader in (ImageLoader(), ImageLoader(allowed_root=root)):
    with pytest.raises(ValueError, match='empty image path') as info:
      loader.load(path)
    assert repr(path) in str(info.value)


def test_paths_that_are_not_image_files_named(root):
  (root / 'notes.txt').write_text('hello')
  os.mkfifo(root / 'pipe.png')
  os.symlink('loop.png', root / 'loop.png')
  loader = ImageLoader(allowed_root=root)
  cases = [('sub', IsADirectoryError, 'is a directory'), ('notes.txt', ValueError, 'cannot decode'),
           ('pipe.png', ValueError, 'not a regular file'), ('loop.png', OSError, 'cannot read image'),
           ('a\0b.png', ValueError, 'cannot read image'), ('x' * 300 + '.png', OSError, 'too long')]
  for path, kind, why in cases:
    with pytest.raises(kind, match=why) as info:
      loader.load(path)
    assert repr(path) in str(info.value), info.value
  with pytest.raises(IsADirectoryError, match=repr(str(root))):
    ImageLoader().load(root)  # no root: the working directory's rules


def test_sixteen_bit_grey_shown_as_a_viewer_does():
  grey = np.random.default_rng(2).integers(0, 65536, (6, 8)).astype(np.uint16)
  # Pillow decodes a 16-bit colour PNG to its top bytes; a grey one must look the same.
  colour = np.asarray(ImageLoader().load(_png16(np.repeat(grey[..., None], 3, -1))))
  np.testing.assert_array_equal(colour, np.repeat((grey >> 8)[..., None], 3, -1))
  loaded = ImageLoader().load(_png16(grey))
  assert Image.open(io.BytesIO(_png16(grey))).mode == 'I;16'
  np.testing.assert_array_equal(np.asarray(loaded), colour)
  # The same for a 16-bit PGM (Pillow mode I) and 16-bit arrays, either byte order.
  pgm = b'P5\n8 6\n65535\n' + grey.astype('>u2').tobytes()
  assert Image.open(io.BytesIO(pgm)).mode == 'I'
  for src in (pgm, grey, grey.astype('>u2'), Image.fromarray(grey)):
    np.testing.assert_array_equal(np.asarray(ImageLoader().load(src)), colour)


def test_deep_images_out_of_range_refused_by_name():
  with pytest.raises(ValueError, match=r'the given PIL image.*\[0, 65535\]'):
    to_rgb(Image.fromarray(np.array([[0, 70000]], np.int32)), 'the given PIL image')
  with pytest.raises(ValueError, match=r'scan.tif.*\[0, 1\]'):
    to_rgb(Image.fromarray(np.array([[0, 2.5]], np.float32)), 'scan.tif')
  with pytest.raises(ValueError, match='scan.tif holds NaN'):
    to_rgb(Image.fromarray(np.array([[0, np.nan]], np.float32)), 'scan.tif')
  floats = np.random.default_rng(3).random((3, 4)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(floats)))[..., 0],
                                np.round(floats * 255))


MODES = ('1', 'L', 'P', 'RGB', 'RGBX', 'RGBA', 'RGBa', 'CMYK', 'YCbCr', 'LAB', 'HSV', 'LA', 'La', 'PA',
         'I', 'F', 'I;16', 'I;16L', 'I;16B', 'I;16N')


@pytest.mark.parametrize('mode', MODES)
def test_every_pillow_mode_converts_without_warning(mode):
  image = Image.new(mode, (5, 3))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    converted = ImageLoader().load(image)
  assert converted.mode == 'RGB' and converted.size == (5, 3) and converted is not image


def test_transparent_palette_keeps_its_colours():
  palette = Image.new('P', (4, 1))
  palette.putpalette([10, 20, 30, 40, 50, 60] * 128)
  palette.putdata([0, 1, 0, 1])
  palette.info['transparency'] = bytes([0] + [255] * 255)  # colour 0 transparent
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # Pillow warns on a direct .convert('RGB')
    pixels = np.asarray(ImageLoader().load(palette))
  # Alpha is dropped as the original does for RGBA, so the stored colour shows.
  np.testing.assert_array_equal(pixels[0], [[10, 20, 30], [40, 50, 60]] * 2)


def test_empty_images_refused():
  with pytest.raises(ValueError, match=r'no pixels \(0x3\)'):
    ImageLoader().load(Image.new('RGB', (0, 3)))
  for shape in ((0, 0), (0, 5), (4, 0, 3)):
    with pytest.raises(ValueError, match='no pixels'):
      ImageLoader().load(np.zeros(shape, np.uint8))


def test_bad_arrays_refused_by_name():
  loader = ImageLoader()
  cases = [(np.zeros((2, 2, 2, 3), np.uint8), 'shape'), (np.zeros(5, np.uint8), 'shape'),
           (np.zeros((4, 4, 2), np.uint8), 'shape'), (np.full((4, 4), np.nan), 'NaN'),
           (np.full((4, 4, 3), np.inf, np.float32), 'NaN or infinite'),
           (np.zeros((4, 4), np.int32), 'dtype int32'), (np.zeros((4, 4), np.complex64), 'dtype'),
           (np.zeros((4, 4), object), 'dtype object')]
  for array, why in cases:
    with pytest.raises(ValueError, match=why) as info:
      loader.load(array)
    assert f'shape {array.shape}' in str(info.value)
  mask = np.array([[True, False]])
  np.testing.assert_array_equal(np.asarray(loader.load(mask))[..., 1], [[255, 0]])


@pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')
def test_decompression_bombs_refused(root):
  tiny = np.zeros((1, 1), np.uint16)
  (root / 'bomb.png').write_bytes(_png16(tiny, width=100_000, height=100_000))
  (root / 'big.png').write_bytes(_png16(tiny, width=10_000, height=10_000))  # Pillow only warns
  loader = ImageLoader(allowed_root=root)
  for name in ('bomb.png', 'big.png'):
    with pytest.raises(ValueError, match=f"refusing image '{name}'"):
      loader.load(name)
  with pytest.raises(ValueError, match='over max_pixels=47'):
    ImageLoader(allowed_root=root, max_pixels=47).load('sub/ok.png')  # 8x6
  assert ImageLoader(allowed_root=root, max_pixels=48).load('sub/ok.png').size == (8, 6)


class _Handler(http.server.BaseHTTPRequestHandler):
  """/ok.png: a PNG; /big: declares its large size; /stream: large, with no Content-Length;
  /trickle: a byte every 0.1 s; /forever: 16 bytes every 10 ms without end; /slow-headers: a
  header a byte every 0.1 s without end. Each read gets data well within the time limit, so only a
  limit on the whole download stops them. The slow ones stop when the client leaves or `stopped`
  is set."""
  png = _png(_pixels())
  big = 4096
  stopped = threading.Event()

  def do_GET(self):  # noqa: N802 (http.server's naming)
    try:
      if self.path == '/ok.png':
        self._send(self.png, length=True)
      elif self.path == '/big':
        self._send(b'\0' * self.big, length=True)
      elif self.path == '/stream':
        self._send(b'\0' * self.big, length=False)
      elif self.path == '/trickle':
        self._head(b'Content-Length: 1000\r\n\r\n')
        self._drip([b'\0'] * 1000, 0.1)
      elif self.path == '/forever':
        self._head(b'\r\n')
        self._drip(iter(lambda: b'\0' * 16, None), 0.01)
      elif self.path == '/slow-headers':
        self.wfile.write(b'HTTP/1.0 200 OK\r\nX-Pad: ')
        self._drip(iter(lambda: b'a', None), 0.1)
      else:
        self.send_error(404)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the client gave up

  def _head(self, rest: bytes) -> None:
    self.wfile.write(b'HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n' + rest)

  def _drip(self, pieces, pause: float) -> None:
    for piece in pieces:
      if self.stopped.wait(pause):
        return
      self.wfile.write(piece)

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
  _Handler.stopped.clear()
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  _Handler.stopped.set()
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


@pytest.mark.parametrize('path', ['/trickle', '/forever', '/slow-headers'])
def test_download_time_limit_is_on_the_whole_download(server, path):
  limit = 1.0
  loader = ImageLoader(allow_urls=True, timeout=limit)
  start = time.monotonic()
  with pytest.raises(TimeoutError) as info:
    loader.load(server + path)
  elapsed = time.monotonic() - start
  assert limit <= elapsed < limit + 0.5, elapsed
  assert f'{server}{path}' in str(info.value) and 'time limit of 1 s' in str(info.value)
  # The download given up on ends too: no thread is left reading.
  time.sleep(0.3)
  assert not [t for t in threading.enumerate() if t.name == f'fetch {server}{path}']


def test_limits_must_be_positive():
  for kwargs in ({'timeout': 0}, {'max_bytes': 0}, {'max_pixels': -1}):
    with pytest.raises(ValueError, match='must be positive'):
      ImageLoader(**kwargs)
