"""Qwen-VL (first generation) in JAX/Flax."""
from qwenvl_jax.checkpoint import load_pretrained
from qwenvl_jax.config import QwenVLConfig, TextConfig, VisionConfig, qwen_vl_7b
from qwenvl_jax.decoder import KVCache
from qwenvl_jax.model import QwenVL, check_image_spans, lm_loss
from qwenvl_jax.preprocess import preprocess_images

__all__ = [
    'KVCache', 'QwenVL', 'QwenVLConfig', 'TextConfig', 'VisionConfig', 'check_image_spans',
    'load_pretrained', 'lm_loss', 'preprocess_images', 'qwen_vl_7b',
]
