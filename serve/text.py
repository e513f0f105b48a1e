"""An answer's text as its tokens arrive: the deltas to stream and the final text, with stop strings.

Texts come from `chat_format.partial_response` / `decode_response`, as in `chat_stream`, so the streamed
deltas join to exactly `chat`'s answer. A stop string ends the answer before it; while the text ends
with the start of a stop string, that part is held back, since it may yet become one.
"""
from __future__ import annotations

from qwenvl_jax import QwenVLTokenizer, decode_response
from qwenvl_jax.chat_format import partial_response


class Answer:
  def __init__(self, tokenizer: QwenVLTokenizer, stops: tuple[str, ...] = ()):
    self.tokenizer, self.stops = tokenizer, stops
    self.tokens: list[int] = []
    self.sent = ''  # the text streamed so far
    self.stopped = False  # a stop string was met: the answer is complete

  def add(self, token: int) -> str:
    """The new text `token` makes safe to show ('' when none)."""
    self.tokens.append(token)
    return self._advance(partial_response(self.tokens, self.tokenizer, 0), final=False)

  def finish(self) -> str:
    """The rest of the answer, once no token will come; `self.sent` is then the whole answer."""
    if self.stopped:
      return ''
    return self._advance(decode_response(self.tokens, self.tokenizer, 0), final=True)

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
