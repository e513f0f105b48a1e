"""Qwen-VL (first generation) in JAX/Flax."""
from qwenvl_jax.chat_session import chat, chat_stream
from qwenvl_jax.chat_format import decode_response, make_context
from qwenvl_jax.checkpoint import load_pretrained
from qwenvl_jax.config import QwenVLConfig, TextConfig, VisionConfig, qwen_vl_7b
from qwenvl_jax.decoder import KVCache
from qwenvl_jax.decode import GenerationConfig, generate, generate_stream
from qwenvl_jax.grounding import box_to_pixels, draw_boxes, extract_boxes
from qwenvl_jax.images import ImageLoader
from qwenvl_jax.model import QwenVL, check_image_spans, init_params, lm_loss
from qwenvl_jax.preprocess import preprocess_images
from qwenvl_jax.tokenizer import QwenVLTokenizer, find_vocab

__all__ = [
    'GenerationConfig', 'ImageLoader', 'KVCache', 'QwenVL', 'QwenVLConfig', 'QwenVLTokenizer', 'TextConfig',
    'VisionConfig', 'box_to_pixels', 'chat', 'chat_stream', 'check_image_spans', 'decode_response',
    'draw_boxes', 'extract_boxes', 'find_vocab', 'generate', 'generate_stream', 'init_params',
    'load_pretrained', 'lm_loss', 'make_context', 'preprocess_images', 'qwen_vl_7b',
]
