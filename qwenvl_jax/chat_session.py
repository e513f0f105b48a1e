"""Chat with Qwen-VL-Chat as the original `model.chat` / `chat_stream` do: ChatML turns with history.

The images of a conversation are the `<img>...</img>` references in its queries (and answers). They
are untrusted text, so they are read through an `ImageLoader`: by default paths may not leave the
working directory and URLs are refused. `images` maps a reference to an object (bytes, a PIL image,
an array) to use instead of loading it.
"""
from __future__ import annotations

import os
from typing import Iterator, Mapping, Sequence

import numpy as np

from qwenvl_jax.chat_format import DEFAULT_SYSTEM, decode_response, make_context, partial_response
from qwenvl_jax.batching import check_request, load_images
from qwenvl_jax.decode import GenerationConfig, generate, generate_stream
from qwenvl_jax.grounding import list_items
from qwenvl_jax.images import ImageLoader, ImageSource
from qwenvl_jax.model import QwenVL
from qwenvl_jax.tokenizer import QwenVLTokenizer, check_tokenizer

History = list[tuple[str, str]]


def chat_config(tokenizer: QwenVLTokenizer, generation_config: GenerationConfig | None) -> GenerationConfig:
  """The generation config plus the ChatML stops `<|im_end|>`, `<|im_start|>` and `<|endoftext|>`.

  Ids past the tokenizer's vocabulary (the embedding's padding) are never generated.
  """
  g = generation_config or GenerationConfig()
  if g.chat_format != 'chatml':
    raise ValueError(f'chat needs chat_format "chatml", the config has {g.chat_format!r}; use generate()')
  stops = (tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id)
  limit = tokenizer.vocab_size if g.vocab_limit is None else min(g.vocab_limit, tokenizer.vocab_size)
  return g.replace(stop_ids=tuple(dict.fromkeys(g.stop_ids + stops)), vocab_limit=limit)


def _pixels(model: QwenVL, tokenizer: QwenVLTokenizer, tokens: Sequence[int],
            images: Mapping[str, ImageSource] | None, loader: ImageLoader) -> np.ndarray | None:
  refs = tokenizer.image_paths(tokens)
  if not refs:
    return None
  # an `<img>ref</img>` tag names an image of `images` when it holds ref, else a path or URL
  return load_images([(images or {}).get(ref, ref) for ref in refs], model.config, loader)


def _prepare(model, params, tokenizer, query, history, system, images, generation_config, image_loader):
  """The config, the context tokens and their images; the request is checked before images load."""
  check_tokenizer(tokenizer, model.config)
  g = chat_config(tokenizer, generation_config)
  _, tokens = make_context(tokenizer, query, history, system, g.max_window_size, g.chat_format)
  check_request(model.config, [len(tokens)], len(tokenizer.image_paths(tokens)), g, params=params)
  loader = image_loader or ImageLoader(allowed_root=os.getcwd())
  return g, tokens, _pixels(model, tokenizer, tokens, images, loader)


def chat(model: QwenVL, params, tokenizer: QwenVLTokenizer, query: str, history: History | None = None,
         system: str = DEFAULT_SYSTEM, *, images: Mapping[str, ImageSource] | None = None,
         generation_config: GenerationConfig | None = None, image_loader: ImageLoader | None = None,
         seed: int = 0) -> tuple[str, History]:
  """(response, history + [(query, response)]); the history passed in is not modified.

  The context (system, kept history, query) plus max_new_tokens must fit the model's window, and the
  request its memory estimate, else `budget.GenerationLimitError` before any image is loaded.
  """
  g, tokens, pixels = _prepare(model, params, tokenizer, query, history, system, images, generation_config,
                               image_loader)
  out = generate(model, params, [tokens], pixels, generation_config=g, seed=seed)
  response = decode_response(out[0], tokenizer, len(tokens), g.chat_format)
  return response, list(history or []) + [(query, response)]


def chat_stream(model: QwenVL, params, tokenizer: QwenVLTokenizer, query: str,
                history: History | None = None, system: str = DEFAULT_SYSTEM, *,
                images: Mapping[str, ImageSource] | None = None,
                generation_config: GenerationConfig | None = None,
                image_loader: ImageLoader | None = None, seed: int = 0) -> Iterator[str]:
  """Yields the response so far as it grows; the last text equals `chat`'s response for the same seed.

  Each text extends the one before (`partial_response`: incomplete characters and image spans are held
  back), so printing the new part of each prints the answer once. The request is checked and its images
  loaded by the call itself. As with the original, the caller appends (query, last text) to the history.
  """
  g, tokens, pixels = _prepare(model, params, tokenizer, query, history, system, images, generation_config,
                               image_loader)
  steps = generate_stream(model, params, [tokens], pixels, generation_config=g, seed=seed)
  return _texts(steps, tokenizer, g.chat_format)


def _texts(steps: Iterator[np.ndarray], tokenizer: QwenVLTokenizer, chat_format: str) -> Iterator[str]:
  new: list[int] = []
  shown = None
  for step in steps:
    new.append(int(step[0]))
    text = partial_response(new, tokenizer, 0, chat_format)
    if text != shown:
      shown = text
      yield text
  final = decode_response(new, tokenizer, 0, chat_format)
  if final != shown:
    yield final


def latest_image(response: str, history: History) -> str | None:
  """The image the original draws an answer's boxes on: the last `<img>` of the newest turn having one."""
  for text in [response] + [q for q, _ in reversed(history)]:
    refs = [item['image'] for item in list_items(text) if 'image' in item]
    if refs:
      return refs[-1]
  return None
