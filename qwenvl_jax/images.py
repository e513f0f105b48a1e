"""Loading the images a prompt refers to, with the file system and network kept on a leash.

Image paths come from prompt text, so they are untrusted input: by default URLs are refused and,
with `allowed_root`, paths may not leave that directory (symlinks included).
"""
from __future__ import annotations

import http.client
import io
import os
import pathlib
import re
import time
import urllib.request
from typing import Union

import numpy as np
from PIL import Image

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

_SCHEME = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')
_CHUNK = 1 << 16


def _decode(data: bytes, name: str) -> Image.Image:
  """Decodes fully now, so a corrupt or truncated file fails here and names its source."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      return im.convert('RGB')
  except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
    raise ValueError(f'cannot decode image {name}: {e}') from e


def _from_array(array: np.ndarray) -> Image.Image:
  """HW or HWC (1, 3 or 4 channels), uint8 or float in [0, 1]."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ValueError(f'expected an HW or HWC image array with 1, 3 or 4 channels, '
                     f'got shape {array.shape}')
  if np.issubdtype(array.dtype, np.floating):
    if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
      raise ValueError(f'float image values must lie in [0, 1], got [{array.min()}, {array.max()}]')
    array = np.round(array * 255).astype(np.uint8)
  elif array.dtype != np.uint8:
    raise ValueError(f'unsupported image dtype {array.dtype}: use uint8 or float in [0, 1]')
  return Image.fromarray(np.ascontiguousarray(array)).convert('RGB')


class ImageLoader:
  """Turns paths, URLs, bytes, arrays or PIL images into RGB PIL images, without resizing.

  Args:
    allowed_root: relative paths resolve against it and no path may resolve outside it; None
      resolves against the working directory and allows any path.
    allow_urls: fetch http(s) URLs. Only for trusted prompts: the fetch reaches whatever the
      process can reach, internal hosts included.
    timeout: seconds for the whole download.
    max_bytes: largest download accepted.
  """

  def __init__(self, allowed_root: str | os.PathLike | None = None, allow_urls: bool = False,
               timeout: float = 10.0, max_bytes: int = 32 * 2**20):
    self.allowed_root = None
    if allowed_root is not None:
      self.allowed_root = pathlib.Path(allowed_root).resolve()
      if not self.allowed_root.is_dir():
        raise NotADirectoryError(f'allowed_root {allowed_root} is not a directory')
    self.allow_urls = allow_urls
    self.timeout = timeout
    self.max_bytes = max_bytes

  def load(self, src: ImageSource) -> Image.Image:
    if isinstance(src, Image.Image):
      try:
        return src.convert('RGB')
      except (OSError, SyntaxError, ValueError, EOFError) as e:
        name = getattr(src, 'filename', '') or repr(src)
        raise ValueError(f'cannot decode image {name}: {e}') from e
    if isinstance(src, np.ndarray):
      return _from_array(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
      return _decode(bytes(src), f'<{len(src)} bytes>')
    if isinstance(src, str) and (scheme := _SCHEME.match(src)):
      return _decode(self._fetch(src, scheme.group(1).lower()), src)
    if isinstance(src, (str, os.PathLike)):
      return _decode(self._read(src), os.fspath(src))
    raise TypeError(f'cannot load an image from {type(src).__name__}')

  def resolve(self, path: str | os.PathLike) -> pathlib.Path:
    """The file a local path names, under the same rules as `load` (PermissionError outside the root);
    for callers that check files without decoding them (training data validation)."""
    return self._resolve(path)

  def _resolve(self, path: str | os.PathLike) -> pathlib.Path:
    if self.allowed_root is None:
      return pathlib.Path(path)
    resolved = (self.allowed_root / path).resolve()
    if not resolved.is_relative_to(self.allowed_root):
      raise PermissionError(f'image path {os.fspath(path)!r} resolves to {resolved}, outside the '
                            f'allowed root {self.allowed_root}')
    return resolved

  def _read(self, path: str | os.PathLike) -> bytes:
    resolved = self._resolve(path)
    try:
      return resolved.read_bytes()
    except FileNotFoundError:
      where = '' if os.fspath(path) == str(resolved) else f' (looked at {resolved})'
      raise FileNotFoundError(f'image not found: {os.fspath(path)}{where}') from None

  def _fetch(self, url: str, scheme: str) -> bytes:
    if scheme not in ('http', 'https'):
      raise ValueError(f'cannot load image {url}: only http and https URLs are supported')
    if not self.allow_urls:
      raise PermissionError(f'refusing to fetch {url}: URLs are disabled; pass '
                            'ImageLoader(allow_urls=True) if the prompt is trusted')
    deadline = time.monotonic() + self.timeout
    # A fresh opener reads the proxy settings of the environment at call time.
    opener = urllib.request.build_opener()
    try:
      with opener.open(url, timeout=self.timeout) as response:
        declared = response.headers.get('Content-Length', '')
        if declared.isdigit() and int(declared) > self.max_bytes:
          raise ValueError(f'{url} is {declared} bytes, over max_bytes={self.max_bytes}')
        body = bytearray()
        while chunk := response.read(_CHUNK):
          body += chunk
          if len(body) > self.max_bytes:
            raise ValueError(f'{url} sent more than max_bytes={self.max_bytes} bytes')
          if time.monotonic() > deadline:
            raise TimeoutError(f'download took longer than {self.timeout} s')
    except (OSError, http.client.HTTPException) as e:
      raise OSError(f'cannot fetch {url}: {e}') from e
    return bytes(body)
