"""Box extraction (against the original `_fetch_all_box_with_ref`) and drawing."""
import json
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.grounding import box_to_pixels, draw_boxes, extract_boxes, list_items

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


@pytest.mark.parametrize('token', ['<|im_end|>', '<|im_start|>', '<|endoftext|>', '<|extra_7|>'])
def test_special_tokens_do_not_hide_boxes(token):
  clean = '<ref>dog</ref><box>(100,100),(300,300)</box> and <ref>cat</ref><box>(600,100),(800,300)</box>'
  for response in (clean + token, token + clean, clean.replace(' and ', f' {token} ')):
    assert extract_boxes(response) == extract_boxes(clean), response
    image = Image.new('RGB', (100, 100), BACKGROUND)
    np.testing.assert_array_equal(np.asarray(draw_boxes(image, response)),
                                  np.asarray(draw_boxes(image, clean)))
  # Kept as text: a token between a ref and its box parts them, as <|endoftext|> does.
  parted = f'<ref>dog</ref>{token}<box>(1,2),(3,4)</box><ref>a{token}b</ref><box>(5,6),(7,8)</box>'
  assert extract_boxes(parted) == [{'box': [1, 2, 3, 4]}, {'box': [5, 6, 7, 8], 'ref': f'a{token}b'}]
  assert list_items(f'x{token}y') == [{'text': f'x{token}y'}]


def test_non_integer_coordinates_refused_by_name():
  for box in ('(1.5,2),(3,4)', '(a,b),(c,d)', '', '(1,2),(3,)'):
    with pytest.raises(ValueError, match=re.escape(f'<box>{box}</box>')):
      extract_boxes(f'<ref>x</ref><box>{box}</box>')


def test_box_to_pixels_clips_and_swaps_with_a_warning():
  cases = [([-5, 250, 750, 1200], (0, 120, 480, 480), 'clipped to 0..1000'),
           ([750, 999, 500, 250], (320, 120, 480, 479), 'reversed corners swapped'),
           ([10**30, 0, -10**30, 5], (0, 0, 640, 2), 'clipped to 0..1000 and reversed corners swapped'),
           ([1000.0, 10.5, 2000.5, 20], (640, 5, 640, 9), 'clipped')]
  for box, pixels, why in cases:
    with pytest.warns(UserWarning, match=re.escape(f'box [{", ".join(map(str, box))}]')) as record:
      assert box_to_pixels(box, 640, 480) == pixels
    assert why in str(record[0].message)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # boxes in range warn nothing
    assert box_to_pixels(np.array([0, 0, 1000, 1000]), 640, 480) == (0, 0, 640, 480)


def test_bad_boxes_refused_by_name():
  for box in ([1, 2, 3], [1, 2, 3, 4, 5], [1, 2, float('nan'), 4], [0, 0, float('inf'), 1],
              ['1', 2, 3, 4], [True, 0, 1, 1], None, 'abcd'):
    with pytest.raises(ValueError, match='4 finite numbers') as info:
      box_to_pixels(box, 10, 10)
    assert repr(box) in str(info.value)
  image = Image.new('RGB', (10, 10))
  with pytest.raises(ValueError, match=re.escape("[1, 2] of 'dog'")):
    draw_boxes(image, [{'box': [1, 2], 'ref': 'dog'}])
  with pytest.raises(ValueError, match=re.escape("{'ref': 'dog'} is not a box")):
    draw_boxes(image, [{'ref': 'dog'}])


def test_draw_boxes_draws_out_of_range_boxes_clipped_and_named():
  image = Image.new('RGB', (200, 100), BACKGROUND)
  response = ('<ref>wide</ref><box>(-100,200),(1500,800)</box>'
              '<ref>flipped</ref><box>(750,800),(250,200)</box>'
              '<ref>gone</ref><box>(1200,1200),(1300,1300)</box>')
  with pytest.warns(UserWarning) as record:
    drawn = draw_boxes(image, response)
  messages = [str(r.message) for r in record]
  assert any("of 'wide': clipped" in m for m in messages)
  assert any("of 'flipped': reversed corners swapped" in m for m in messages)
  assert any("of 'gone': clipped" in m for m in messages)
  changed = _changed(image, drawn)
  assert changed[50, 0] and changed[50, 199]  # 'wide' clipped to the image's left and right edges
  assert changed[99, 199]  # 'gone' still marks the corner it was clipped to
  with pytest.warns(UserWarning, match='reversed corners swapped'):
    flipped = draw_boxes(image, [{'box': [750, 800, 250, 200], 'ref': 'flipped'}])
  upright = draw_boxes(image, [{'box': [250, 200, 750, 800], 'ref': 'flipped'}])
  np.testing.assert_array_equal(np.asarray(flipped), np.asarray(upright))


def test_draw_boxes_shows_sixteen_bit_images_like_the_loader():
  grey = np.random.default_rng(0).integers(0, 65536, (20, 30)).astype(np.uint16)
  drawn = draw_boxes(Image.fromarray(grey), [])
  np.testing.assert_array_equal(np.asarray(drawn)[..., 0], grey >> 8)
