"""An answer's text as its tokens arrive: the deltas to stream and the final text, with stop strings.

The texts are `chat_format.partial_response` / `decode_response`'s (as in `chat_stream`), so the
streamed deltas join to exactly `chat`'s answer, but decoded incrementally: each token's bytes go once
through an incremental UTF-8 decoder (a character split across tokens comes out whole once its last byte
arrives), and an `<img>` span is held until it closes, then decoded as one piece, as `decode_bytes`
decodes spans. Decoding the whole answer again at every token would cost O(n^2) over an answer.
A stop string ends the answer before it; while the text ends with the start of a stop string, that part
is held back, since it may yet become one.
"""
from __future__ import annotations

import codecs

from qwenvl_jax import QwenVLTokenizer


class Answer:
  def __init__(self, tokenizer: QwenVLTokenizer, stops: tuple[str, ...] = ()):
    self.tokenizer, self.stops = tokenizer, stops
    t = tokenizer
    self._ends = {t.eod_id, t.im_start_id, t.im_end_id}  # `response_ids`'s end of the answer
    self._decoder = codecs.getincrementaldecoder('utf-8')('replace')
    self._text = ''  # decoded so far, unstripped
    self._span: list[int] = []  # an <img> span not closed yet
    self._ended = False  # an end-of-turn token came: later tokens are not part of the answer
    self.sent = ''  # the text streamed so far
    self.stopped = False  # a stop string was met: the answer is complete

  def add(self, token: int) -> str:
    """The new text `token` makes safe to show ('' when none)."""
    if self._ended or token in self._ends:
      self._ended = True
      return ''
    t = self.tokenizer
    if self._span or token == t.img_start_id:
      self._span.append(token)
      if token == t.img_end_id:
        self._feed(self._span)
        self._span = []
    else:
      self._feed([token])
    return self._advance(self._text.strip(), final=False)

  def finish(self) -> str:
    """The rest of the answer, once no token will come; `self.sent` is then the whole answer."""
    if self.stopped:
      return ''
    self._feed(self._span, final=True)  # an unclosed <img> decodes as the ordinary tokens it holds
    self._span = []
    return self._advance(self._text.strip(), final=True)

  def _feed(self, ids: list[int], final: bool = False) -> None:
    data = self.tokenizer.decode_bytes(ids, strict_images=False)
    self._text += self._decoder.decode(data, final)

  def _advance(self, text: str, final: bool) -> str:
    cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
    if cut >= 0:
      text, self.stopped = text[:cut], True
    elif not final:
      text = text[:len(text) - self._held(text)]
    if not text.startswith(self.sent):  # a held-back start that did not become a stop string
      text = self.sent
    delta, self.sent = text[len(self.sent):], text
    return delta

  def _held(self, text: str) -> int:
    """Length of the longest end of `text` that begins a stop string."""
    return max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                if s.startswith(text[-n:])), default=0)
