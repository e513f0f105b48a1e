"""Image preprocessing equal to the original transform: PIL bicubic resize, /255, CLIP mean/std."""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
from PIL import Image

from qwenvl_jax.images import ImageLoader

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

ImageLike = Union[str, os.PathLike, Image.Image]


def _rgb(image: ImageLike, loader: ImageLoader) -> Image.Image:
  """The loader's pixels (as a viewer shows them; equal to the original's for 8-bit images)."""
  if isinstance(image, Image.Image) and image.mode == 'RGB' and 0 not in image.size:
    return image  # no copy: resize makes one
  return loader.load(image)


def preprocess_images(images: Sequence[ImageLike], image_size: int) -> np.ndarray:
  """Paths or PIL images -> float32 [n, image_size, image_size, 3], CLIP-normalised.

  Paths are read with `ImageLoader()`: any local path, no URLs.
  """
  loader = ImageLoader()
  out = np.empty((len(images), image_size, image_size, 3), np.float32)
  for i, image in enumerate(images):
    rgb = _rgb(image, loader).resize((image_size, image_size), Image.Resampling.BICUBIC)
    out[i] = (np.asarray(rgb, np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
  return out
