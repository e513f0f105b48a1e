"""What one request may ask of the server; each has a `qwenvl-jax serve` flag."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Limits:
  max_request_bytes: int = 32 * 2**20  # the whole JSON body, base64 images included (413 past it)
  max_image_bytes: int = 16 * 2**20  # one image's encoded bytes (data URL, file or download)
  max_image_pixels: int = 40_000_000  # width x height, read from the header before any decoding
  max_images: int = 8  # images per request, over all messages
  url_timeout: float = 10.0  # seconds for one http(s) image download (--allow-urls)

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if not getattr(self, f.name) > 0:
        raise ValueError(f'{f.name} must be positive, got {getattr(self, f.name)}')
