"""Chat messages -> the ChatML context tokens and the pixels of their images, every limit checked first.

System messages make the system turn (the original's default when none); user and assistant messages
make the history and the query, consecutive messages of one role joined by a newline as one turn. A
user message's image parts become `Picture N:<img>uploadK</img>` lines in its text (the original's list
format), `uploadK` standing for the image; `<img>path</img>` typed in text works as in `chat`.

Images are counted and the context checked against the model window before any image is read, and
each image's size is checked before it is decoded: the byte size of a data URL from its length, a
file's from the file system, a download's as it arrives, and the pixels from the header.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from typing import Callable

import numpy as np

from qwenvl_jax import GenerationConfig, ImageLoader, QwenVL, QwenVLTokenizer, make_context, preprocess_images
from qwenvl_jax.budget import GenerationLimitError
from qwenvl_jax.chat_format import DEFAULT_SYSTEM
from qwenvl_jax.batching import check_request
from serve.errors import bad_request
from serve.limits import Limits
from serve.protocol import Message

_URL = re.compile(r'^https?://', re.IGNORECASE)
_DATA = re.compile(r'^data:([^;,]*)((?:;[^;,]*)*),', re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Prompt:
  tokens: tuple[int, ...]
  pixels: np.ndarray | None


def conversation(messages: tuple[Message, ...], text_of) -> tuple[str, list[tuple[str, str]], str]:
  """(system, history, query) from the messages; `text_of(index, message)` gives one message's text."""
  system = '\n'.join(text_of(i, m) for i, m in enumerate(messages) if m.role == 'system')
  turns: list[list] = []  # [role, text, first index]
  for i, m in enumerate(messages):
    if m.role == 'system':
      continue
    if turns and turns[-1][0] == m.role:
      turns[-1][1] += '\n' + text_of(i, m)
    else:
      turns.append([m.role, text_of(i, m), i])
  if turns[0][0] != 'user':
    raise bad_request(f'messages[{turns[0][2]}]: the conversation must start with a user message',
                      f'messages[{turns[0][2]}].role')
  history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
  return system or DEFAULT_SYSTEM, history, turns[-1][1]


class Preparer:
  """Turns checked messages into a `Prompt` for one model and tokenizer under `limits`.

  `image_root`: the directory image paths (parts and `<img>` tags) must lie under; None refuses paths.
  `fits(prompt_tokens, max_new_tokens)`: the engine's own size check (raising GenerationLimitError).
  """

  def __init__(self, model: QwenVL, params, tokenizer: QwenVLTokenizer, limits: Limits,
               image_root: str | os.PathLike | None = None, allow_urls: bool = False,
               fits: Callable[[int, int], None] | None = None):
    self.model, self.params, self.tokenizer, self.limits = model, params, tokenizer, limits
    self.fits = fits
    self.image_root = image_root
    self.loader = ImageLoader(allowed_root=image_root, allow_urls=allow_urls, timeout=limits.url_timeout,
                              max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels,
                              reveal_paths=False)  # its errors go to clients

  def prepare(self, messages: tuple[Message, ...], config: GenerationConfig) -> Prompt:
    sources: dict[str, object] = {}  # uploadK -> data URL bytes, URL or path
    where: dict[str, str] = {}  # uploadK -> the request field it came from

    def text_of(index: int, message: Message) -> str:
      items = []
      for part in message.parts:
        if part['type'] == 'text':
          items.append({'text': part['text']})
          continue
        name = f'upload{len(sources) + 1}'
        where[name] = f'messages[{index}].content'
        if len(sources) >= self.limits.max_images:  # counted before any image is decoded
          raise bad_request(f'too many images: more than max_images={self.limits.max_images}', where[name],
                            'too_many_images')
        sources[name] = self._source(part['url'], where[name])
        items.append({'image': name})
      return self.tokenizer.from_list_format(items)

    system, history, query = conversation(messages, text_of)
    try:
      _, tokens = make_context(self.tokenizer, query, history, system, config.max_window_size)
    except ValueError as e:  # an <img> path longer than the image span
      raise bad_request(str(e), 'messages') from None
    refs = self.tokenizer.image_paths(tokens)
    if len(refs) > self.limits.max_images:
      raise bad_request(f'too many images: {len(refs)}, over max_images={self.limits.max_images}', 'messages',
                        'too_many_images')
    try:
      check_request(self.model.config, [len(tokens)], len(refs), config, params=self.params)
      if self.fits is not None:
        self.fits(len(tokens), config.max_new_tokens)
    except GenerationLimitError as e:
      raise bad_request(str(e), 'messages', 'context_length_exceeded') from None
    images = [self._load(sources.get(ref, ref), where.get(ref, 'messages')) for ref in refs]
    pixels = preprocess_images(images, self.model.config.vision.image_size) if images else None
    return Prompt(tuple(tokens), pixels)

  def _source(self, url: str, param: str) -> object:
    """A data URL's bytes (size checked from its length before decoding); other URLs and paths as given."""
    data = _DATA.match(url)
    if data is None:
      return url
    media, flags = data.group(1).lower(), data.group(2).lower().split(';')
    if media and not media.startswith('image/'):
      raise bad_request(f'{param}: a data URL of type {media!r} is not an image', param, 'invalid_image')
    if 'base64' not in flags:
      raise bad_request(f'{param}: image data URLs must be base64 (data:image/...;base64,...)', param,
                        'invalid_image')
    payload = url[data.end():]
    if len(payload) * 3 // 4 > self.limits.max_image_bytes + 2:
      raise bad_request(f'{param}: the image is about {len(payload) * 3 // 4} bytes, over max_image_bytes='
                        f'{self.limits.max_image_bytes}', param, 'image_too_large')
    try:
      return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
      raise bad_request(f'{param}: the image data is not valid base64 ({e})', param, 'invalid_image') from None

  def _load(self, source: object, param: str):
    if isinstance(source, str) and not _URL.match(source):
      if self.image_root is None:
        raise bad_request(f'{param}: image path {source!r} refused: the server reads no local files '
                          '(start it with --image-root DIR to serve images under DIR)', param, 'invalid_image')
      try:
        size = self.loader.resolve(source).stat().st_size
      except OSError:
        size = 0  # missing or unreadable: the loader names the problem below
      if size > self.limits.max_image_bytes:
        raise bad_request(f'{param}: image {source!r} is {size} bytes, over max_image_bytes='
                          f'{self.limits.max_image_bytes}', param, 'image_too_large')
    try:
      return self.loader.load(source)
    except (OSError, ValueError) as e:  # not found, outside the root, URLs off, undecodable, too many pixels
      raise bad_request(f'{param}: {e}', param, 'invalid_image') from None
