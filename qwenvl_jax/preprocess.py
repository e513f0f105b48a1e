"""Image preprocessing equal to the original transform: PIL bicubic resize, /255, CLIP mean/std."""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

ImageLike = Union[str, os.PathLike, Image.Image]


def _open_rgb(image: ImageLike) -> Image.Image:
  if isinstance(image, Image.Image):
    return image if image.mode == 'RGB' else image.convert('RGB')
  try:
    with Image.open(image) as im:
      return im.convert('RGB')
  except FileNotFoundError:
    raise FileNotFoundError(f'image not found: {image}') from None
  except (OSError, Image.DecompressionBombError, SyntaxError) as e:
    raise ValueError(f'cannot read image {image}: {e}') from e


def preprocess_images(images: Sequence[ImageLike], image_size: int) -> np.ndarray:
  """Paths or PIL images -> float32 [n, image_size, image_size, 3], CLIP-normalised."""
  out = np.empty((len(images), image_size, image_size, 3), np.float32)
  for i, image in enumerate(images):
    rgb = _open_rgb(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
    out[i] = (np.asarray(rgb, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
  return out
