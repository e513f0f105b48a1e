"""Config, preprocessing and input validation of the model core."""
import json

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax import QwenVLConfig, check_image_spans, preprocess_images
from qwenvl_jax.layers import bicubic_matrix


def test_golden_config(golden_dir):
  cfg = QwenVLConfig.from_json(golden_dir / 'checkpoint')
  assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.mlp_width) == (256, 2, 256)
  assert (cfg.vision.grid, cfg.vision.n_queries, cfg.vision.mlp_width) == (8, 16, 315)
  assert QwenVLConfig.from_dict(cfg.to_dict()) == cfg


def test_config_replace_and_errors(golden_dir):
  cfg = QwenVLConfig.from_json(golden_dir / 'checkpoint')
  small = cfg.replace(vision={'image_size': 56}, dtype='bfloat16')
  assert small.vision.grid == 4 and small.dtype.name == 'bfloat16' and cfg.vision.grid == 8
  with pytest.raises(ValueError, match='unknown dtype'):
    cfg.replace(dtype='float8').dtype
  bad = json.loads((golden_dir / 'checkpoint' / 'config.json').read_text())
  bad['visual']['output_dim'] = 128
  with pytest.raises(ValueError, match='must equal hidden_size'):
    QwenVLConfig.from_dict(bad)
  bad['visual']['output_dim'] = bad['hidden_size'] = 64
  bad['kv_channels'] = 64 // bad['num_attention_heads']
  with pytest.raises(ValueError, match='at least 128'):
    QwenVLConfig.from_dict(bad)


@pytest.mark.parametrize('mode', ['RGBA', 'P', 'L', 'RGB'])
def test_preprocess_converts_modes_like_pil_convert(mode):
  rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 20, 3), np.uint8))
  image = rgb.convert(mode)
  got = preprocess_images([image], 28)
  want = preprocess_images([image.convert('RGB')], 28)
  assert got.shape == (1, 28, 28, 3) and got.dtype == np.float32
  np.testing.assert_array_equal(got, want)


def test_preprocess_errors_name_the_file(tmp_path):
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  with pytest.raises(ValueError, match='broken.jpg'):
    preprocess_images([bad], 28)
  with pytest.raises(FileNotFoundError, match='missing.png'):
    preprocess_images([tmp_path / 'missing.png'], 28)


def test_bicubic_matrix_matches_torch():
  torch = pytest.importorskip('torch')
  for n_in, n_out in [(16, 8), (16, 32), (4, 8), (16, 16), (7, 3)]:
    x = np.random.default_rng(n_in * n_out).normal(size=(2, 5, n_in, n_in)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=(n_out, n_out), mode='bicubic',
                                           align_corners=False).numpy()
    m = bicubic_matrix(n_in, n_out)
    np.testing.assert_allclose(np.einsum('ih,jw,bchw->bcij', m, m, x), want, rtol=1e-5, atol=1e-5)


def test_bicubic_rows_sum_to_one():
  for n_in, n_out in [(16, 8), (16, 32), (16, 7)]:
    np.testing.assert_allclose(bicubic_matrix(n_in, n_out).sum(1), 1.0, rtol=1e-6)


def test_image_span_validation(golden_dir, golden):
  cfg = QwenVLConfig.from_json(golden_dir / 'checkpoint')
  ids = golden['batch.input_ids']
  assert check_image_spans(ids, cfg, 2) == 2
  with pytest.raises(ValueError, match='2 image spans but 3 images'):
    check_image_spans(ids, cfg, 3)
  cut = ids.copy()
  cut[0, 20] = 5  # drop the first row's </img>
  with pytest.raises(ValueError, match='row 0'):
    check_image_spans(cut, cfg)
