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


def resize_rgb(image: Image.Image, image_size: int) -> np.ndarray:
  """An RGB PIL image -> uint8 [image_size, image_size, 3], the original's bicubic resize (Pillow resizes 8-bit
  RGB in 8 bits, so these bytes are all the float preprocessing ever sees: training ships them to the device
  and normalises there, a quarter of float32's bytes)."""
  return np.asarray(image.resize((image_size, image_size), Image.Resampling.BICUBIC), np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
  """uint8 RGB pixels -> float32, /255 then CLIP mean/std."""
  return (pixels.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


# normalize() of every byte value per channel: a lookup on the device gives exactly the host's numbers (XLA
# rewrites the division, which moves some results by one ulp).
NORMALIZED = normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1))  # [256, 3]


def normalize_on_device(pixels):
  """uint8 [..., 3] jax array -> float32 equal to `normalize` of the same bytes."""
  import jax.numpy as jnp
  return jnp.asarray(NORMALIZED)[pixels.astype(jnp.int32), jnp.arange(3)]


def preprocess_images(images: Sequence[ImageLike], image_size: int) -> np.ndarray:
  """Paths or PIL images -> float32 [n, image_size, image_size, 3], CLIP-normalised.

  Paths are read with `ImageLoader()`: any local path, no URLs.
  """
  loader = ImageLoader()
  out = np.empty((len(images), image_size, image_size, 3), np.float32)
  for i, image in enumerate(images):
    out[i] = normalize(resize_rgb(_rgb(image, loader), image_size))
  return out
