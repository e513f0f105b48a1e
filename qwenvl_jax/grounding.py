"""Boxes in Qwen-VL answers: `<ref>what</ref><box>(x1,y1),(x2,y2)</box>`, coordinates 0..1000.

Parsing follows the original's `_fetch_all_box_with_ref`, except that ChatML and `<|extra_N|>` special
tokens count as text where the original fails, so a generated answer holding one still shows its boxes.
Drawing draws every box: coordinates outside 0..1000 are clipped and reversed corners swapped, each
with a warning naming the box; a box that is not four finite numbers is refused by name.
"""
from __future__ import annotations

import math
import numbers
import re
import warnings
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from qwenvl_jax.images import to_rgb
from qwenvl_jax.tokenizer import NOT_IN_LIST_FORMAT, to_list_format

# Tableau 10: distinct hues that stay readable on photos.
PALETTE = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd',
           '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf')

Box = dict[str, Any]  # {'box': [x1, y1, x2, y2], 'ref'?: str}

def list_items(text: str) -> list[dict[str, str]]:
  """`to_list_format(text)`, but ChatML and `<|extra_N|>` tokens stay text instead of failing.

  Each such token hides behind a private-use character absent from `text` while parsing and is
  restored after, so the items hold exactly the text given.
  """
  if not NOT_IN_LIST_FORMAT.search(text):
    return to_list_format(text)
  mark = next(chr(c) for c in range(0xF0000, 0xFFFFE) if chr(c) not in text)
  hidden = NOT_IN_LIST_FORMAT.sub(lambda m: f'{mark}{m.group()[2:-2]}{mark}', text)
  restore = re.compile(f'{mark}([^{mark}]*){mark}')
  return [{k: restore.sub(r'<|\1|>', v) for k, v in item.items()} for item in to_list_format(hidden)]


def extract_boxes(text: str) -> list[Box]:
  """Every box of `text`; a box right after `<ref>x</ref>` carries 'ref': x (the original's rule).

  Later boxes of the same referent carry no 'ref'.
  """
  items = list_items(text)
  boxes = []
  for i, item in enumerate(items):
    if 'box' not in item:
      continue
    try:
      coords = [int(v) for v in item['box'].replace('(', '').replace(')', '').split(',')]
    except ValueError:
      raise ValueError(f'<box>{item["box"]}</box>: coordinates must be integers') from None
    if len(coords) != 4:
      raise ValueError(f'<box>{item["box"]}</box> does not hold 4 coordinates')
    box = {'box': coords}
    if i > 0 and 'ref' in items[i - 1]:
      box['ref'] = items[i - 1]['ref'].strip()
    boxes.append(box)
  return boxes


def _finite(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and (
      isinstance(v, numbers.Integral) or math.isfinite(v))


def box_to_pixels(box: Sequence[float], width: int, height: int,
                  name: str = '') -> tuple[int, int, int, int]:
  """[0, 1000] model coordinates -> integer pixels (left, top, right, bottom), truncated as the
  original's drawing does.

  Coordinates outside 0..1000 are clipped to the image and reversed corners swapped, each with a
  warning naming the box (and `name`, e.g. its ref): drawing what the model meant beats dropping it.
  """
  try:
    coords = list(box)
  except TypeError:
    coords = []
  if len(coords) != 4 or not all(map(_finite, coords)):
    raise ValueError(f'box {box!r}{name}: expected 4 finite numbers x1, y1, x2, y2')
  clipped = [min(max(v, 0), 1000) for v in coords]
  fixes = ['clipped to 0..1000'] if clipped != coords else []
  x1, y1, x2, y2 = clipped
  if x2 < x1 or y2 < y1:
    fixes.append('reversed corners swapped')
    (x1, x2), (y1, y2) = sorted((x1, x2)), sorted((y1, y2))
  if fixes:
    shown = ', '.join(map(str, coords))
    warnings.warn(f'box [{shown}]{name}: {" and ".join(fixes)}', stacklevel=2)
  return (int(x1 / 1000 * width), int(y1 / 1000 * height),
          int(x2 / 1000 * width), int(y2 / 1000 * height))


def draw_boxes(image: Image.Image, boxes: str | Sequence[Mapping[str, Any]],
               font: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None) -> Image.Image:
  """A new RGB copy of `image` with the boxes (or the boxes of an answer) outlined and labelled.

  Each distinct ref gets its own colour; boxes without a ref continue the previous ref's colour,
  since the model emits extra boxes of one referent right after the first. Pillow's default font
  has no CJK glyphs: pass `font` (e.g. `ImageFont.truetype(<a CJK font>, 20)`) for such labels.
  """
  if isinstance(boxes, str):
    boxes = extract_boxes(boxes)
  out = to_rgb(image)
  draw = ImageDraw.Draw(out)
  width, height = out.size
  line = max(2, round(min(width, height) / 200))
  font = font or ImageFont.load_default(size=max(12, min(width, height) // 30))
  colours: dict[str, str] = {}
  colour = PALETTE[0]
  for box in boxes:
    if not isinstance(box, Mapping) or 'box' not in box:
      raise ValueError(f'{box!r} is not a box: expected a mapping with the key "box"')
    ref = None if box.get('ref') is None else str(box['ref'])
    if ref is not None:
      colour = colours.setdefault(ref, PALETTE[len(colours) % len(PALETTE)])
    x1, y1, x2, y2 = box_to_pixels(box['box'], width, height, f' of {ref!r}' if ref else '')
    # Coordinate 1000 lands one pixel past the image: keep edges (and boxes clipped to them) visible.
    left, right = min(x1, width - 1), min(x2, width - 1)
    top, bottom = min(y1, height - 1), min(y2, height - 1)
    draw.rectangle((left, top, right, bottom), outline=colour, width=line)
    if ref:
      _label(draw, (left + line, top + line), ref, colour, font)
  return out


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, colour: str,
           font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
  """White text on a filled tag, legible over any background."""
  draw.rectangle(draw.textbbox(xy, text, font=font), fill=colour)
  draw.text(xy, text, fill='white', font=font)
