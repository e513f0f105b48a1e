"""Boxes in Qwen-VL answers: `<ref>what</ref><box>(x1,y1),(x2,y2)</box>`, coordinates 0..1000."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from qwenvl_jax.tokenizer import to_list_format

# Tableau 10: distinct hues that stay readable on photos.
PALETTE = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd',
           '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf')

Box = dict[str, Any]  # {'box': [x1, y1, x2, y2], 'ref'?: str}


def extract_boxes(text: str) -> list[Box]:
  """Every box of `text`; a box right after `<ref>x</ref>` carries 'ref': x (the original's rule).

  Later boxes of the same referent carry no 'ref'.
  """
  items = to_list_format(text)
  boxes = []
  for i, item in enumerate(items):
    if 'box' not in item:
      continue
    coords = [int(v) for v in item['box'].replace('(', '').replace(')', '').split(',')]
    if len(coords) != 4:
      raise ValueError(f'<box>{item["box"]}</box> does not hold 4 coordinates')
    box = {'box': coords}
    if i > 0 and 'ref' in items[i - 1]:
      box['ref'] = items[i - 1]['ref'].strip()
    boxes.append(box)
  return boxes


def box_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
  """[0, 1000) model coordinates -> integer pixels, truncated as the original's drawing does."""
  x1, y1, x2, y2 = box
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
  out = image.convert('RGB')
  draw = ImageDraw.Draw(out)
  width, height = out.size
  line = max(2, round(min(width, height) / 200))
  font = font or ImageFont.load_default(size=max(12, min(width, height) // 30))
  colours: dict[str, str] = {}
  colour = PALETTE[0]
  for box in boxes:
    ref = box.get('ref')
    if ref is not None:
      colour = colours.setdefault(ref, PALETTE[len(colours) % len(PALETTE)])
    x1, y1, x2, y2 = box_to_pixels(box['box'], width, height)
    left, top, right, bottom = min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)
    draw.rectangle((left, top, right, bottom), outline=colour, width=line)
    if ref:
      _label(draw, (left + line, top + line), ref, colour, font)
  return out


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, colour: str,
           font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
  """White text on a filled tag, legible over any background."""
  draw.rectangle(draw.textbbox(xy, text, font=font), fill=colour)
  draw.text(xy, text, fill='white', font=font)
