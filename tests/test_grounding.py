"""Box extraction (against the original `_fetch_all_box_with_ref`) and drawing."""
import json

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.grounding import box_to_pixels, draw_boxes, extract_boxes

BACKGROUND = (128, 128, 128)


@pytest.fixture(scope='module')
def box_cases(golden_dir):
  return json.loads((golden_dir / 'tokenizer.json').read_text(encoding='utf-8'))['boxes']


def test_extract_boxes_golden(box_cases):
  assert box_cases
  for case in box_cases:
    assert extract_boxes(case['response']) == case['boxes'], case['response']


def test_extract_boxes_refuses_malformed():
  with pytest.raises(ValueError, match='4 coordinates'):
    extract_boxes('<box>(1,2),(3)</box>')
  with pytest.raises(ValueError, match='unclosed <box>'):
    extract_boxes('<ref>a</ref><box>(1,2),(3,4)')


def test_box_to_pixels_scales_and_truncates():
  assert box_to_pixels([0, 0, 1000, 1000], 640, 480) == (0, 0, 640, 480)
  assert box_to_pixels([500, 250, 750, 999], 640, 480) == (320, 120, 480, 479)
  assert box_to_pixels([1, 1, 3, 3], 999, 999) == (0, 0, 2, 2)  # 0.999 -> 0, 2.997 -> 2


def _changed(before: Image.Image, after: Image.Image) -> np.ndarray:
  return np.any(np.asarray(before.convert('RGB')) != np.asarray(after), axis=-1)


def test_draw_boxes_changes_only_the_outline():
  image = Image.new('RGB', (200, 100), BACKGROUND)
  drawn = draw_boxes(image, [{'box': [250, 200, 750, 800], 'ref': 'a'}])  # pixels (50,20)-(150,80)
  assert drawn is not image and drawn.size == image.size and drawn.mode == 'RGB'
  assert image.getpixel((50, 50)) == BACKGROUND  # the input is left alone
  changed = _changed(image, drawn)
  assert changed[50, 50] and changed[20, 100] and changed[80, 100] and changed[50, 150]
  assert not changed[65, 120]  # inside, away from the label
  margin = 2
  inside = np.zeros_like(changed)
  inside[20 - margin:80 + margin + 1, 50 - margin:150 + margin + 1] = True
  assert not changed[~inside].any()


def test_draw_boxes_colours_per_ref():
  image = Image.new('RGB', (400, 400), BACKGROUND)
  response = ('<ref>dog</ref><box>(100,100),(300,300)</box><box>(100,600),(300,800)</box>'
              ' and <ref>cat</ref><box>(600,100),(800,300)</box>')
  drawn = draw_boxes(image, response)
  # Points on the left edges of the three boxes (pixels x=40, x=40 and x=240).
  dog, dog_again, cat = (drawn.getpixel(xy) for xy in ((40, 60), (40, 300), (240, 60)))
  assert BACKGROUND not in (dog, cat)
  assert dog == dog_again and dog != cat


def test_draw_boxes_golden_cjk_response_and_rgba(box_cases):
  image = Image.new('RGBA', (320, 240), (10, 20, 30, 0))
  for case in box_cases:
    drawn = draw_boxes(image, case['response'])
    assert drawn.mode == 'RGB' and drawn.size == image.size
    assert _changed(image, drawn).any() == bool(case['boxes'])
