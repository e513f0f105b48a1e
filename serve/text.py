"""An answer's text as its tokens arrive: the deltas to stream and the final text, with stop strings.

The texts are `chat_format.partial_response` / `decode_response`'s (as in `chat_stream`), so the
streamed deltas join to exactly `chat`'s answer, but decoded incrementally: each token's bytes go once
through an incremental UTF-8 decoder (a character split across tokens comes out whole once its last byte
arrives), and an `<img>` span is held until it closes, then decoded as one piece, as `decode_bytes`
decodes spans. Decoding the whole answer again at every token would cost O(n^2) over an answer.
A stop string ends the answer before it; while the text ends with the start of a stop string, that part
is held back, since it may yet become one. Each token's work is bounded by its own text plus the longest
stop string, whatever the answer's length: the text is kept as positions into what was decoded (its
first and last non-space characters, the end of what was sent), only its tail (from the end of what was
sent or the longest stop string back from its end) as one string, and stop strings are searched for only
where the text grew (a match found now must end in the new text).
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
    # Decoded so far, unstripped: the pieces before position _base, then _tail from there. The answer is
    # the text from _lead to _end (`str.strip`); positions count from the answer's first character.
    self._head: list[str] = []
    self._tail, self._base = '', 0
    self._longest = max(map(len, stops), default=0)
    self._lead: int | None = None  # the first non-space character, once one came
    self._end = 0  # past the last non-space character
    self._sent = 0  # the end of the text streamed so far
    self._searched = 0  # stop strings were looked for in the text up to here
    self._span: list[int] = []  # an <img> span not closed yet
    self._ended = False  # an end-of-turn token came: later tokens are not part of the answer
    self.stopped = False  # a stop string was met: the answer is complete

  @property
  def sent(self) -> str:
    """The text streamed so far (the whole answer once `finish` returned)."""
    return (''.join(self._head) + self._tail)[self._lead or 0:self._sent]

  def add(self, token: int) -> str:
    """The new text `token` makes safe to show ('' when none)."""
    if self.stopped:
      return ''
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
    return self._advance(final=False)

  def finish(self) -> str:
    """The rest of the answer, once no token will come; `self.sent` is then the whole answer."""
    if self.stopped:
      return ''
    self._feed(self._span, final=True)  # an unclosed <img> decodes as the ordinary tokens it holds
    self._span = []
    return self._advance(final=True)

  def _feed(self, ids: list[int], final: bool = False) -> None:
    new = self._decoder.decode(self.tokenizer.decode_bytes(ids, strict_images=False), final)
    at = self._base + len(self._tail)
    self._tail += new
    if self._lead is None and new.strip():
      self._lead = self._sent = self._searched = at + len(new) - len(new.lstrip())
    if self._lead is not None and new.rstrip():
      self._end = at + len(new.rstrip())

  def _advance(self, final: bool) -> str:
    lo, hi, b = self._lead or 0, self._end, self._base
    found = [i + b for i in (self._tail.find(s, max(lo, self._searched - len(s) + 1) - b, hi - b)
                             for s in self.stops) if i >= 0]
    self._searched = hi
    if found:
      end, self.stopped = min(found), True
    else:
      end = hi if final else hi - self._held(lo, hi)
    end = max(end, self._sent)  # a held-back start that did not become a stop string is sent as it was
    delta, self._sent = self._tail[self._sent - b:end - b], end
    keep = min(self._sent, hi - self._longest)  # what later searches, holds and deltas may read
    if keep - b > len(self._tail) // 2:  # moved to the head in pieces, each character once or twice
      self._head.append(self._tail[:keep - b])
      self._tail, self._base = self._tail[keep - b:], keep
    return delta

  def _held(self, lo: int, hi: int) -> int:
    """Length of the longest end of the text between lo and hi that begins a stop string."""
    return max((n for s in self.stops for n in range(min(len(s) - 1, hi - lo), 0, -1)
                if self._tail.startswith(s[:n], hi - n - self._base, hi - self._base)), default=0)
