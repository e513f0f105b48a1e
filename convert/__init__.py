"""Checkpoint conversion between the released Hugging Face layout and Orbax (`qwenvl-convert`)."""
from convert.core import hf_to_orbax, orbax_to_hf

__all__ = ['hf_to_orbax', 'orbax_to_hf']
