"""Loading the images a prompt refers to, with the file system and network kept on a leash.

Image paths come from prompt text, so they are untrusted input: by default URLs are refused and,
with `allowed_root`, paths may not leave that directory (symlinks included). Every refusal names
the image it is about.

Pixels are what a viewer shows, with one exception kept for parity with the original (and with
what the model was trained on): 8-bit images convert with Pillow's `.convert('RGB')` as the
original transform does, so alpha is dropped (transparent pixels keep their stored colour), not
blended. Where that call is wrong, the result differs from the original's: 16-bit greyscale
(Pillow modes I;16* and I) keeps its top byte, as Pillow itself decodes 16-bit colour PNGs, where
`.convert('RGB')` saturates every value above 255 to white; float images (mode F) must lie in
[0, 1] and are scaled by 255.
"""
from __future__ import annotations

import http.client
import io
import os
import pathlib
import re
import socket
import stat
import threading
import urllib.request
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

_SCHEME = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')
_CHUNK = 1 << 16
# Pillow's own decompression-bomb limit (about 9459 x 9459): far above what the model needs.
MAX_PIXELS = 89_478_485
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _array_to_rgb(array: np.ndarray, name: str) -> Image.Image:
  """HW or HWC (1, 3 or 4 channels) of uint8, uint16 (top byte kept), bool or float in [0, 1]."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ValueError(f'{name}: expected an HW or HWC image array with 1, 3 or 4 channels, '
                     f'got shape {array.shape}')
  if array.size == 0:
    raise ValueError(f'{name} has no pixels (shape {array.shape})')
  if array.dtype == np.bool_:
    array = array.astype(np.uint8) * 255
  elif np.issubdtype(array.dtype, np.floating):
    if not np.isfinite(array).all():
      raise ValueError(f'{name} holds NaN or infinite values')
    if array.min() < 0 or array.max() > 1:
      raise ValueError(f'{name}: float image values must lie in [0, 1], '
                       f'got [{array.min()}, {array.max()}]')
    array = np.round(array * 255).astype(np.uint8)
  elif array.dtype.kind == 'u' and array.dtype.itemsize == 2:
    array = (array >> 8).astype(np.uint8)
  elif array.dtype != np.uint8:
    raise ValueError(f'{name}: unsupported image dtype {array.dtype}: use uint8, uint16, bool or '
                     'float in [0, 1]')
  return Image.fromarray(np.ascontiguousarray(array)).convert('RGB')


def to_rgb(image: Image.Image, name: str = 'image') -> Image.Image:
  """A new RGB copy of `image`, as a viewer shows it (see the module doc); errors name `name`."""
  if 0 in image.size:
    raise ValueError(f'{name} has no pixels ({image.width}x{image.height})')
  try:
    image.load()
  except _DECODE_ERRORS as e:
    raise ValueError(f'cannot decode image {name}: {e}') from e
  if image.mode.startswith('I;16'):
    return _array_to_rgb(np.asarray(image), name)
  if image.mode == 'I':  # 32-bit ints: Pillow's mode for 16-bit PGM/PPM files, for instance
    values = np.asarray(image)
    if values.min() < 0 or values.max() > 65535:
      raise ValueError(f'{name}: 32-bit integer image values must lie in [0, 65535] (16-bit), '
                       f'got [{values.min()}, {values.max()}]')
    return _array_to_rgb(values.astype(np.uint16), name)
  if image.mode == 'F':
    return _array_to_rgb(np.asarray(image), name)
  # Pillow converts P with byte transparency via RGBA without a warning and La only via LA; the
  # pixels equal a direct conversion's.
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  elif image.mode == 'La':
    image = image.convert('LA')
  try:
    return image.convert('RGB')
  except ValueError as e:
    raise ValueError(f'cannot convert image {name} from mode {image.mode} to RGB: {e}') from e


def _shown(path: str | os.PathLike) -> str:
  """A path as messages show it: quoted, so blanks and odd characters are visible."""
  return repr(os.fspath(path))


class ImageLoader:
  """Turns paths, URLs, bytes, arrays or PIL images into RGB PIL images, without resizing.

  Args:
    allowed_root: relative paths resolve against it and no path may resolve outside it; None
      resolves against the working directory and allows any path.
    allow_urls: fetch http(s) URLs. Only for trusted prompts: the fetch reaches whatever the
      process can reach, internal hosts included.
    timeout: seconds for the whole download (connection, headers and body together).
    max_bytes: largest download accepted.
    max_pixels: largest image (width x height) decoded from a file, URL or bytes; Pillow's own
      limit `PIL.Image.MAX_IMAGE_PIXELS` applies too (twice it is refused before this check).
    reveal_paths: errors name the file a path resolved to and the allowed root. A server passes False:
      its errors go to clients, who then see a path only as they sent it, never the server's layout.
  """

  def __init__(self, allowed_root: str | os.PathLike | None = None, allow_urls: bool = False,
               timeout: float = 10.0, max_bytes: int = 32 * 2**20, max_pixels: int = MAX_PIXELS,
               reveal_paths: bool = True):
    self.allowed_root = None
    if allowed_root is not None:
      self.allowed_root = pathlib.Path(allowed_root).resolve()
      if not self.allowed_root.is_dir():
        raise NotADirectoryError(f'allowed_root {allowed_root} is not a directory')
    if not timeout > 0 or max_bytes < 1 or max_pixels < 1:
      raise ValueError(f'timeout, max_bytes and max_pixels must be positive, got {timeout}, '
                       f'{max_bytes}, {max_pixels}')
    self.allow_urls = allow_urls
    self.timeout = timeout
    self.max_bytes = max_bytes
    self.max_pixels = max_pixels
    self.reveal_paths = reveal_paths

  def load(self, src: ImageSource) -> Image.Image:
    if isinstance(src, Image.Image):
      return to_rgb(src, getattr(src, 'filename', '') or 'the given PIL image')
    if isinstance(src, np.ndarray):
      return _array_to_rgb(src, f'image array of shape {src.shape} and dtype {src.dtype}')
    if isinstance(src, (bytes, bytearray, memoryview)):
      return self._decode(io.BytesIO(bytes(src)), f'<{len(src)} bytes>')
    if not isinstance(src, (str, os.PathLike)):
      raise TypeError(f'cannot load an image from {type(src).__name__}')
    if not os.fspath(src).strip():
      raise ValueError(f'empty image path {_shown(src)}: the image reference (e.g. <img></img>) '
                       'names no file')
    if isinstance(src, str) and (scheme := _SCHEME.match(src)):
      return self._decode(io.BytesIO(self._fetch(src, scheme.group(1).lower())), src)
    with self._open(src) as f:
      return self._decode(f, _shown(src))

  def _decode(self, file: BinaryIO, name: str) -> Image.Image:
    """Decodes fully now, so a corrupt or truncated file fails here and names its source."""
    try:
      image = Image.open(file)
    except Image.DecompressionBombError as e:
      raise ValueError(f'refusing image {name}: {e} (PIL.Image.MAX_IMAGE_PIXELS)') from e
    except UnidentifiedImageError:  # its message holds the file object's repr (a memory address)
      raise ValueError(f'cannot decode image {name}: not an image format Pillow reads') from None
    except _DECODE_ERRORS as e:
      raise ValueError(f'cannot decode image {name}: {e}') from e
    with image:
      if image.width * image.height > self.max_pixels:
        raise ValueError(f'refusing image {name}: {image.width}x{image.height} is '
                         f'{image.width * image.height} pixels, over max_pixels={self.max_pixels}')
      return to_rgb(image, name)

  def resolve(self, path: str | os.PathLike) -> pathlib.Path:
    """The file a local path names, under the same rules as `load` (PermissionError outside the root);
    for callers that check files without decoding them (training data validation)."""
    return self._resolve(path)

  def _resolve(self, path: str | os.PathLike) -> pathlib.Path:
    if self.allowed_root is None:
      return pathlib.Path(path)
    resolved = (self.allowed_root / path).resolve()
    if not resolved.is_relative_to(self.allowed_root):
      if not self.reveal_paths:
        raise PermissionError(f'image path {_shown(path)} leads outside the allowed root')
      raise PermissionError(f'image path {_shown(path)} resolves to {resolved}, outside the '
                            f'allowed root {self.allowed_root}')
    return resolved

  def _open(self, path: str | os.PathLike) -> BinaryIO:
    resolved = path
    try:
      resolved = self._resolve(path)
      mode = resolved.stat().st_mode
      # A FIFO would block the open and a device (/dev/zero) never end: regular files only.
      if stat.S_ISREG(mode):
        return open(resolved, 'rb')
    except FileNotFoundError:
      shown = resolved if self.reveal_paths else 'under the allowed root'
      where = '' if os.fspath(path) == str(resolved) else f' (looked at {shown})'
      raise FileNotFoundError(f'image not found: {_shown(path)}{where}') from None
    except PermissionError as e:
      if e.errno is None:  # ours: outside the allowed root
        raise
      raise PermissionError(f'cannot read image {_shown(path)}: {e.strerror}') from None
    except OSError as e:  # name too long, symlink loop, ...
      raise type(e)(f'cannot read image {_shown(path)}: {e.strerror or e}') from None
    except RuntimeError as e:  # a symlink loop met by resolve() before Python 3.13
      raise OSError(f'cannot read image {_shown(path)}: {e}') from None
    except ValueError as e:  # an embedded NUL byte
      raise ValueError(f'cannot read image {_shown(path)}: {e}') from None
    if stat.S_ISDIR(mode):
      raise IsADirectoryError(f'image path {_shown(path)} is a directory, not an image file')
    raise ValueError(f'image path {_shown(path)} is not a regular file')

  def _fetch(self, url: str, scheme: str) -> bytes:
    """The body of `url`, all of it within `timeout` seconds.

    The download runs in a daemon thread the caller waits for at most `timeout` seconds: that
    bounds every step at once (name lookup, a server trickling headers or body, one that streams
    forever). On giving up, the connection is shut down so the thread ends at once too.
    """
    if scheme not in ('http', 'https'):
      raise ValueError(f'cannot load image {url}: only http and https URLs are supported')
    if not self.allow_urls:
      raise PermissionError(f'refusing to fetch {url}: URLs are disabled; pass --allow-urls '
                            '(ImageLoader(allow_urls=True)) if the prompt is trusted')
    download = _Download(url, self.timeout, self.max_bytes)
    worker = threading.Thread(target=download.run, name=f'fetch {url}', daemon=True)
    worker.start()
    worker.join(self.timeout)
    if worker.is_alive():
      download.give_up()
      raise TimeoutError(download.too_slow())
    if download.error is not None:
      raise download.error
    return download.body


class _Download:
  """One URL fetched by a worker thread; `give_up` from another thread ends it."""

  def __init__(self, url: str, timeout: float, max_bytes: int):
    self.url, self.timeout, self.max_bytes = url, timeout, max_bytes
    self.body, self.error = b'', None
    self.given_up = threading.Event()
    self.sockets: list[socket.socket] = []  # the connections made, shut down on giving up
    self.lock = threading.Lock()

  def too_slow(self) -> str:
    return f'cannot fetch {self.url}: not complete within the time limit of {self.timeout:g} s'

  def give_up(self) -> None:
    with self.lock:
      self.given_up.set()
      for sock in self.sockets:
        try:
          sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in the worker
        except OSError:
          pass

  def connected(self, sock: socket.socket) -> None:
    with self.lock:
      self.sockets.append(sock)
      if self.given_up.is_set():
        raise TimeoutError(self.too_slow())

  def run(self) -> None:
    try:
      self.body = self._read()
    except BaseException as e:  # handed to the waiting caller
      self.error = e

  def _read(self) -> bytes:
    # A fresh opener reads the proxy settings of the environment at call time.
    opener = urllib.request.build_opener(*(handler(self) for handler in _RECORDING_HANDLERS))
    try:
      with opener.open(self.url, timeout=self.timeout) as response:
        declared = response.headers.get('Content-Length', '')
        if declared.isdigit() and int(declared) > self.max_bytes:
          raise ValueError(f'{self.url} is {declared} bytes, over max_bytes={self.max_bytes}')
        body = bytearray()
        # read1 returns what one socket read brings: read(n) would wait for all n bytes.
        while not self.given_up.is_set() and (chunk := response.read1(_CHUNK)):
          body += chunk
          if len(body) > self.max_bytes:
            raise ValueError(f'{self.url} sent more than max_bytes={self.max_bytes} bytes')
    except TimeoutError:
      raise TimeoutError(self.too_slow()) from None
    except (OSError, http.client.HTTPException) as e:
      if isinstance(getattr(e, 'reason', None), TimeoutError):  # urllib's wrapping of a timeout
        raise TimeoutError(self.too_slow()) from None
      raise OSError(f'cannot fetch {self.url}: {e}') from e
    return bytes(body)


def _recording(handler_class: type) -> type:
  """`handler_class` with its connections reported to a `_Download` as they are made."""

  class Recording(handler_class):
    def __init__(self, download: _Download):
      super().__init__()
      self.download = download

    def do_open(self, http_class, req, **kwargs):
      download = self.download

      class Connection(http_class):
        def connect(self):
          super().connect()
          download.connected(self.sock)
      return super().do_open(Connection, req, **kwargs)
  return Recording


# HTTPSHandler exists only where Python has ssl.
_RECORDING_HANDLERS = tuple(_recording(h) for h in (urllib.request.HTTPHandler,
                                                     getattr(urllib.request, 'HTTPSHandler', None)) if h)
