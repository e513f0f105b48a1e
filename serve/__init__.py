"""An OpenAI-compatible chat server for Qwen-VL-Chat (`qwenvl-jax serve`); needs the `serve` extra."""
