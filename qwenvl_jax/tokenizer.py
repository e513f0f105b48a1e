"""Qwen-VL tokenizer: Qwen's tiktoken BPE plus the image, box and ChatML special tokens.

Behaves like the original `QWenTokenizer` (tokenization_qwen.py of Qwen-VL-Chat), including the
quirk that an image path is stored as one token per UTF-8 byte whose id IS the byte value (not the
BPE token of that byte), padded with `<imgpad>` to a fixed span the vision features later replace.
"""
from __future__ import annotations

import base64
import numbers
import os
import pathlib
import re
import unicodedata
from typing import AbstractSet, Any, Iterator, Literal, Mapping, Sequence, Union

import tiktoken

from qwenvl_jax import jsonfile

VOCAB_FILENAME = 'qwen.tiktoken'
VOCAB_ENV = 'QWENVL_VOCAB'
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT = '<|endoftext|>'
IM_START = '<|im_start|>'
IM_END = '<|im_end|>'
EXTRAS = tuple(f'<|extra_{i}|>' for i in range(205))
IMAGE_ST = ('<ref>', '</ref>', '<box>', '</box>', '<quad>', '</quad>',
            '<img>', '</img>', '<imgpad>')
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + EXTRAS + IMAGE_ST
IMAGE_SPAN = 256

PathLike = Union[str, os.PathLike]
AllowedSpecial = Union[Literal['all'], AbstractSet[str]]
Token = Union[bytes, str]

# Opening tag -> (closing tag, list-format key).
_LIST_TAGS = {
    '<img>': ('</img>', 'image'),
    '<ref>': ('</ref>', 'ref'),
    '<box>': ('</box>', 'box'),
    '<quad>': ('</quad>', 'quad'),
}
_OPEN_TAG = re.compile('|'.join(map(re.escape, _LIST_TAGS)))
# The original parses list format with only IMAGE_ST and <|endoftext|> allowed; the rest raise.
# Special tokens that list-format parsing refuses, as the original's does.
NOT_IN_LIST_FORMAT = re.compile('|'.join(map(re.escape, (IM_START, IM_END) + EXTRAS)))

_VOCAB_HELP = (
    f'The Qwen vocabulary file {VOCAB_FILENAME} ships in released Qwen-VL checkpoints and in the '
    f'PyPI package dashscope (dashscope/resources/{VOCAB_FILENAME}): '
    '`pip download --no-deps dashscope` and unzip the wheel. Pass its path, or the checkpoint '
    f'directory, or set ${VOCAB_ENV}.')


def find_vocab(path: PathLike | None = None) -> pathlib.Path:
  """The vocabulary file from `path` (file or directory holding it), else from $QWENVL_VOCAB."""
  origin = 'path'
  if path is None:
    if not os.environ.get(VOCAB_ENV):
      raise FileNotFoundError(f'no vocabulary given and ${VOCAB_ENV} is not set. {_VOCAB_HELP}')
    path, origin = os.environ[VOCAB_ENV], f'${VOCAB_ENV}'
  if not os.fspath(path):  # Path('') is the working directory: never what an empty value meant
    raise FileNotFoundError(f'the vocabulary path is empty (from {origin}). {_VOCAB_HELP}')
  candidate = pathlib.Path(path)
  if candidate.is_dir():
    candidate = candidate / VOCAB_FILENAME
  if not candidate.is_file():
    raise FileNotFoundError(
        f'vocabulary not found: {candidate} (from {origin} {path}). {_VOCAB_HELP}')
  return candidate


def _load_ranks(vocab_file: pathlib.Path) -> dict[bytes, int]:
  ranks = {}
  with open(vocab_file, 'rb') as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError as e:
        raise ValueError(f'{vocab_file}:{line_no} is not a "base64-token rank" line: {e}') from e
  return ranks


def _find(ids: list[int], value: int, start: int) -> int:
  try:
    return ids.index(value, start)
  except ValueError:
    return -1


def _image_spans(ids: list[int], start_id: int, end_id: int,
                 strict: bool = True) -> Iterator[tuple[bool, list[int]]]:
  """Yields (is_image, ids): text pieces, and the ids strictly between `<img>` and `</img>`.

  An unclosed `<img>` is an error, or with strict=False the start of a text piece running to the end.
  """
  pos = 0
  while (start := _find(ids, start_id, pos)) >= 0:
    end = _find(ids, end_id, start)
    if end < 0:
      if not strict:
        break
      raise ValueError(f'unclosed <img> at token {start}: no </img> follows it')
    yield False, ids[pos:start]
    yield True, ids[start + 1:end]
    pos = end + 1
  yield False, ids[pos:]


def to_list_format(text: str) -> list[dict[str, str]]:
  """Splits text into {'text'|'image'|'ref'|'box'|'quad': str} items, as the original does."""
  text = unicodedata.normalize('NFC', text)
  if bad := NOT_IN_LIST_FORMAT.search(text):
    raise ValueError(f'{bad.group()} at character {bad.start()} is not allowed in list-format text '
                     '(only image/box tags and <|endoftext|> are); cut the ChatML markup first')
  items, pos = [], 0
  while tag := _OPEN_TAG.search(text, pos):
    close, key = _LIST_TAGS[tag.group()]
    end = text.find(close, tag.end())
    if end < 0:
      raise ValueError(f'unclosed {tag.group()} at character {tag.start()}: no {close} follows it')
    items += [{'text': text[pos:tag.start()]}] if tag.start() > pos else []
    items.append({key: text[tag.end():end]})
    pos = end + len(close)
  return items + ([{'text': text[pos:]}] if pos < len(text) else [])


def from_list_format(items: Sequence[Mapping[str, Any]]) -> str:
  """Builds a query: numbered `Picture N:<img>..</img>` lines, text, and `<ref>`ed boxes."""
  parts, n_images = [], 0
  for item in items:
    if 'image' in item:
      n_images += 1
      parts.append(f'Picture {n_images}:<img>{item["image"]}</img>\n')
    elif 'text' in item:
      parts.append(item['text'])
    elif 'box' in item:
      parts += [f'<ref>{item["ref"]}</ref>'] if 'ref' in item else []
      for x1, y1, x2, y2 in item['box']:
        parts.append('<box>(%d,%d),(%d,%d)</box>' % (x1, y1, x2, y2))
    else:
      raise ValueError(f'unsupported list-format item {item!r}: expected a key image, text or box')
  return ''.join(parts)


def _special_id(name: str) -> property:
  return property(lambda self: self.special_tokens[name], doc=f'Token id of {name}.')


class QwenVLTokenizer:
  """Text <-> ids with `<img>path</img>` spans expanded to a fixed number of tokens.

  `image_span_length` is the number of tokens between `<img>` and `</img>`; it must equal the
  model's `n_queries` (256 for released checkpoints) since each is replaced by one image feature.
  """

  eod_id = _special_id(ENDOFTEXT)
  im_start_id = _special_id(IM_START)
  im_end_id = _special_id(IM_END)
  ref_start_id = _special_id('<ref>')
  ref_end_id = _special_id('</ref>')
  box_start_id = _special_id('<box>')
  box_end_id = _special_id('</box>')
  quad_start_id = _special_id('<quad>')
  quad_end_id = _special_id('</quad>')
  img_start_id = _special_id('<img>')
  img_end_id = _special_id('</img>')
  img_pad_id = _special_id('<imgpad>')

  def __init__(self, vocab_file: PathLike, image_span_length: int = IMAGE_SPAN,
               errors: str = 'replace'):
    if isinstance(image_span_length, bool) or not isinstance(image_span_length, numbers.Integral) \
        or image_span_length < 1:
      raise ValueError(f'image_span_length must be a positive integer, got {image_span_length!r}')
    self.vocab_file = find_vocab(vocab_file)
    self.image_span_length = image_span_length
    self.errors = errors
    ranks = _load_ranks(self.vocab_file)
    first_special = max(ranks.values()) + 1
    self.special_tokens = {name: first_special + i for i, name in enumerate(SPECIAL_TOKENS)}
    self._special_names = {i: name for name, i in self.special_tokens.items()}
    self._bpe = tiktoken.Encoding('qwen', pat_str=PAT_STR, mergeable_ranks=ranks,
                                  special_tokens=self.special_tokens)

  @classmethod
  def from_pretrained(cls, path: PathLike | None = None, **kwargs: Any) -> QwenVLTokenizer:
    """`path`: a checkpoint directory holding qwen.tiktoken, or the file; None: $QWENVL_VOCAB.

    From a directory with a config.json, image_span_length defaults to its `visual.n_queries` (256 when
    absent, as in the released configs), so the spans fit the checkpoint's model.
    """
    vocab = find_vocab(path)
    config = pathlib.Path(path) / 'config.json' if path is not None else None
    if 'image_span_length' not in kwargs and config is not None and config.is_file():
      visual = jsonfile.get(jsonfile.read_object(config), 'visual', dict, config, {})
      kwargs['image_span_length'] = jsonfile.get(visual, 'n_queries', int, config, IMAGE_SPAN,
                                                 prefix='visual.')
    return cls(vocab, **kwargs)

  @property
  def vocab_size(self) -> int:
    return self._bpe.n_vocab

  def __len__(self) -> int:
    return self.vocab_size

  def encode(self, text: str, allowed_special: AllowedSpecial = 'all') -> list[int]:
    """Special tokens outside `allowed_special` are encoded as plain text, never refused."""
    text = unicodedata.normalize('NFC', text)
    ids = self._bpe.encode(text, allowed_special=allowed_special, disallowed_special=())
    out = []
    for is_image, piece in _image_spans(ids, self.img_start_id, self.img_end_id):
      out += self._encode_image(piece) if is_image else piece
    return out

  def _encode_image(self, piece: list[int]) -> list[int]:
    path = self._bpe.decode_bytes(piece)
    if len(path) > self.image_span_length:
      preview = path[:48].decode('utf-8', 'replace') + ('...' if len(path) > 48 else '')
      raise ValueError(f'image path {preview!r} is {len(path)} bytes, longer than the image span '
                       f'of {self.image_span_length} tokens')
    padding = [self.img_pad_id] * (self.image_span_length - len(path))
    return [self.img_start_id, *path, *padding, self.img_end_id]

  def _image_path_bytes(self, piece: list[int]) -> bytes:
    if self.img_pad_id in piece:
      piece = piece[:piece.index(self.img_pad_id)]
    if any(not 0 <= i < 256 for i in piece):
      raise ValueError(f'image span holds ids that are not bytes: {piece}')
    return bytes(piece)

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False,
             errors: str | None = None) -> str:
    """Image spans come back as `<img>path</img>`; skip_special_tokens keeps only the path."""
    return self.decode_bytes(ids, skip_special_tokens).decode('utf-8', errors or self.errors)

  def decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool = False,
                   strict_images: bool = True) -> bytes:
    """The UTF-8 bytes `decode` decodes. Ids outside the vocabulary are refused by value.

    strict_images=False is for generated text, which need not be well formed: an unclosed `<img>`, or
    an image span holding ids that are not bytes, decodes as the ordinary tokens it holds.
    """
    ids = [int(i) for i in ids]
    bad = sorted({i for i in ids if not 0 <= i < self.vocab_size})
    if bad:
      raise ValueError(f'ids {bad[:8]} are outside the tokenizer vocabulary [0, {self.vocab_size})')
    chunks = []
    for is_image, piece in _image_spans(ids, self.img_start_id, self.img_end_id, strict_images):
      if is_image and (strict_images or all(0 <= i < 256 or i == self.img_pad_id for i in piece)):
        path = self._image_path_bytes(piece)
        chunks.append(path if skip_special_tokens else b'<img>' + path + b'</img>')
      else:
        piece = [self.img_start_id, *piece, self.img_end_id] if is_image else piece
        kept = [i for i in piece if i < self.eod_id] if skip_special_tokens else piece
        chunks.append(self._bpe.decode_bytes(kept))
    return b''.join(chunks)

  def image_paths(self, ids: Sequence[int]) -> list[str]:
    """The image references encoded in `ids`, in order of appearance."""
    spans = _image_spans([int(i) for i in ids], self.img_start_id, self.img_end_id)
    return [self._image_path_bytes(piece).decode('utf-8') for is_image, piece in spans if is_image]

  def tokenize(self, text: str, allowed_special: AllowedSpecial = 'all') -> list[Token]:
    """Tokens as the original names them: bytes for BPE tokens, str for special tokens."""
    return self.convert_ids_to_tokens(self.encode(text, allowed_special))

  def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Token | list[Token]:
    if isinstance(ids, numbers.Integral):
      return self._special_names.get(int(ids)) or self._bpe.decode_single_token_bytes(int(ids))
    return [self.convert_ids_to_tokens(int(i)) for i in ids]

  def convert_tokens_to_ids(self, tokens: Token | Sequence[Token]) -> int | list[int]:
    if isinstance(tokens, (bytes, str)):
      return self._bpe.encode_single_token(tokens)
    return [self._bpe.encode_single_token(token) for token in tokens]

  to_list_format = staticmethod(to_list_format)
  from_list_format = staticmethod(from_list_format)


def check_tokenizer(tokenizer: QwenVLTokenizer, config: Any) -> None:
  """Raises ValueError unless the tokenizer's image spans, `<img>` id and vocabulary fit `config`
  (a QwenVLConfig)."""
  v = config.vision
  if tokenizer.image_span_length != v.n_queries:
    raise ValueError(f'tokenizer image spans are {tokenizer.image_span_length} tokens but the model has '
                     f'n_queries={v.n_queries}: build it with image_span_length={v.n_queries}')
  if tokenizer.img_start_id != v.image_start_id:
    raise ValueError(f'tokenizer <img> is id {tokenizer.img_start_id}, the model expects {v.image_start_id}')
  if tokenizer.vocab_size > config.text.vocab_size:
    raise ValueError(f'tokenizer has {tokenizer.vocab_size} ids, more than the model vocab_size '
                     f'{config.text.vocab_size}')
