"""The resampler's from-scratch init makes each query start out looking at its own part of the image."""
import jax
import numpy as np

from qwenvl_jax.layers import sincos_2d
from qwenvl_jax.resampler import local_attention_init


def _position_attention(w: np.ndarray, side: int) -> np.ndarray:
  """[q, p] attention of each query over the patches when neither carries content (positions only)."""
  pos = sincos_2d(w.shape[0], side)  # [side**2, d]
  q = np.einsum('pd,dhk->phk', pos, w[:, 0])
  k = np.einsum('pd,dhk->phk', pos, w[:, 1])
  logits = np.einsum('qhk,phk->hqp', q, k) / np.sqrt(w.shape[-1])
  logits -= logits.max(-1, keepdims=True)
  return (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).mean(0)


def test_queries_start_local():
  d, heads, side = 256, 2, 6
  w = np.asarray(local_attention_init(jax.random.key(0), (d, 3, heads, d // heads)))
  np.testing.assert_array_equal(w[:, 0], w[:, 1])
  attention = _position_attention(w, side)
  assert (attention.argmax(-1) == np.arange(side * side)).mean() >= 0.9
  assert np.diag(attention).mean() > 5 / side ** 2  # peaked on its own patch, far above uniform (1/36)
  # torch's independent draws (the value block stands in for a second draw): close to uniform
  torch_like = w.copy()
  torch_like[:, 0] /= 4
  torch_like[:, 1] = w[:, 2]
  assert np.diag(_position_attention(torch_like, side)).mean() < 2 / side ** 2
