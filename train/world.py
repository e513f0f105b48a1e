"""A synthetic grounding world for the demo: coloured shapes marked with letters on a grid, with captions,
questions, OCR text and boxes.

Each image holds a few shapes (circle, square, triangle in red, green, blue, yellow), at most one per
grid cell and each colour (or, optionally, each (colour, shape) pair) at most once, so "the red circle"
names exactly one box. Each shape carries a white letter (its short text). Boxes are in the model's
[0, 1000) coordinates. The same scenes are written out in the three stages' formats.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import random
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from train.data import format_box

COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220), 'yellow': (235, 200, 30)}
SHAPES = ('circle', 'square', 'triangle')
LETTERS = 'AHTX'  # distinct strokes, none round (an O would read as a circle)
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  size: int = 224  # pixels of the stored images (the model resizes them)
  grid: int = 3  # cells per side; a shape fills one cell
  min_objects: int = 2
  max_objects: int = 4
  margin: float = 0.12  # empty border inside a cell, as a fraction of the cell
  distinct_colours: bool = True  # no colour twice in an image (else only the (colour, shape) pair is unique)
  letters: str = LETTERS  # each shape is marked with one of these; '' draws no text


@dataclasses.dataclass(frozen=True)
class Thing:
  colour: str
  shape: str
  box: tuple[int, int, int, int]  # [0, 1000)
  letter: str = ''  # the text written on the shape

  @property
  def name(self) -> str:
    return f'{self.colour} {self.shape}'

  def description(self) -> str:
    return f'a {self.name}' + (f' marked {self.letter}' if self.letter else '')


@dataclasses.dataclass(frozen=True)
class Scene:
  image: str  # path relative to the world's root
  things: tuple[Thing, ...]

  def caption(self) -> str:
    names = [t.description() for t in self.things]
    return (names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' and ' + names[-1]) + '.'

  def text(self) -> str:
    """The letters in reading order (row-major), as OCR would read them."""
    return ' '.join(t.letter for t in self.things if t.letter)


def _cell_box(row: int, col: int, cfg: WorldConfig) -> tuple[tuple[int, ...], tuple[int, int, int, int]]:
  """(pixel box to draw in, the same box in [0, 1000) coordinates)."""
  cell = cfg.size / cfg.grid
  inset = cell * cfg.margin
  px = (round(col * cell + inset), round(row * cell + inset),
        round((col + 1) * cell - inset) - 1, round((row + 1) * cell - inset) - 1)
  norm = tuple(min(999, int(v / cfg.size * 1000)) for v in px)
  return px, norm  # type: ignore[return-value]


@functools.lru_cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
  """Pillow's built-in font (no font file needed), parsed once per size rather than once per shape."""
  return ImageFont.load_default(size=size)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], colour: tuple[int, int, int],
          letter: str) -> None:
  x1, y1, x2, y2 = box
  if shape == 'circle':
    draw.ellipse(box, fill=colour)
  elif shape == 'square':
    draw.rectangle(box, fill=colour)
  else:
    draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=colour)
  if letter:
    # a little low, where a triangle is wide enough
    size = max(6, round(0.45 * (y2 - y1)))
    white = (255, 255, 255)
    draw.text(((x1 + x2) / 2, y1 + 0.6 * (y2 - y1)), letter, fill=white, anchor='mm',
              font=_font(size), stroke_width=max(1, size // 12), stroke_fill=white)


def make_scene(rng: random.Random, cfg: WorldConfig, image_path: pathlib.Path, rel: str) -> Scene:
  n = rng.randint(cfg.min_objects, cfg.max_objects)
  cells = rng.sample(range(cfg.grid * cfg.grid), n)
  if cfg.distinct_colours:
    kinds = [(c, rng.choice(SHAPES)) for c in rng.sample(list(COLOURS), n)]
  else:
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
  letters = [rng.choice(cfg.letters) if cfg.letters else '' for _ in range(n)]
  background = tuple(rng.randint(235, 255) for _ in range(3))
  image = Image.new('RGB', (cfg.size, cfg.size), background)
  draw = ImageDraw.Draw(image)
  things = []
  for cell, (colour, shape), letter in sorted(zip(cells, kinds, letters)):  # row-major, as captions read
    px, norm = _cell_box(*divmod(cell, cfg.grid), cfg)
    _draw(draw, shape, px, COLOURS[colour], letter)
    things.append(Thing(colour, shape, norm, letter))
  image.save(image_path)
  return Scene(rel, tuple(things))


def make_world(root: str | pathlib.Path, n_train: int, n_test: int, seed: int = 0,
               cfg: WorldConfig = WorldConfig()) -> tuple[list[Scene], list[Scene]]:
  """Writes the images to root/<i>.png and returns (train scenes, held-out scenes).

  The names are short because the tokenizer stores an image path inside the image span, which holds
  n_queries tokens: a small model with few queries needs short paths.
  """
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  rng = random.Random(seed)
  scenes = [make_scene(rng, cfg, root / f'{i}.png', f'{i}.png') for i in range(n_train + n_test)]
  return scenes[:n_train], scenes[n_train:]


def where_question(thing: Thing) -> str:
  return f'Where is the {thing.name}?'


def grounding_answer(thing: Thing) -> str:
  return f'<ref>the {thing.name}</ref>{format_box(thing.box)}'


def caption_records(scenes: Sequence[Scene]) -> list[dict[str, Any]]:
  """Stage 1: image-caption pairs."""
  return [{'image': s.image, 'caption': s.caption()} for s in scenes]


def letter_question(thing: Thing) -> str:
  return f'What letter is on the {thing.name}?'


def letter_answer(thing: Thing) -> str:
  # A sentence, not the bare letter: while the model is unsure which letter it sees, greedy decoding of a
  # one-token answer picks the likeliest token after "assistant\n" over all chat turns, <|im_start|>.
  return f'The letter {thing.letter}.'


def multitask_records(scenes: Sequence[Scene], rng: random.Random,
                      other_tasks: float = 0.5) -> list[dict[str, Any]]:
  """Stage 2: referring grounding for every shape and, for a fraction `other_tasks` of the scenes, one of the
  paper's other tasks (caption, OCR, VQA, grounded caption, caption with grounding); pure text has no
  counterpart in this world.

  Grounding dominates on purpose: with one other task per scene (about half the samples), the demo model
  had learnt nothing of where shapes are after 300 steps (chance), while grounding alone was exact.
  """
  out = []
  for s in scenes:
    out += [{'task': 'ref_grounding', 'image': s.image, 'ref': f'the {u.name}', 'box': list(u.box)}
            for u in s.things]
    if rng.random() >= other_tasks:
      continue
    t = rng.choice(s.things)
    tasks = [
        {'task': 'caption', 'image': s.image, 'caption': s.caption()},
        {'task': 'vqa', 'image': s.image, 'question': 'How many shapes are there?',
         'answer': NUMBERS[len(s.things)]},
        {'task': 'vqa', 'image': s.image, 'question': f'What colour is the {t.shape}?', 'answer': t.colour}
        if sum(u.shape == t.shape for u in s.things) == 1 else
        {'task': 'grounded_caption', 'image': s.image, 'box': list(t.box), 'caption': t.description()},
        {'task': 'caption_grounding', 'image': s.image,
         'caption': ', '.join(f'<ref>{u.description()}</ref>{format_box(u.box)}' for u in s.things)},
    ]
    if t.letter:
      tasks += [{'task': 'ocr', 'image': s.image, 'text': s.text()},
                {'task': 'vqa', 'image': s.image, 'question': letter_question(t), 'answer': t.letter}]
    out.append(rng.choice(tasks))
  rng.shuffle(out)
  return out


def chat_records(scenes: Sequence[Scene], rng: random.Random) -> list[dict[str, Any]]:
  """Stage 3: official fine-tuning JSON: one grounding question per shape, some letter questions and a few
  descriptions."""
  out = []
  for s in scenes:
    asks = [(where_question(t), grounding_answer(t)) for t in s.things]
    lettered = [t for t in s.things if t.letter]
    if lettered and rng.random() < 0.3:
      t = rng.choice(lettered)
      asks.append((letter_question(t), letter_answer(t)))
    if rng.random() < 0.2:
      asks.append(('Describe the picture.', s.caption()))
    out += [{'id': f'{pathlib.Path(s.image).stem}_{j}', 'conversations': [
        {'from': 'user', 'value': f'Picture 1: <img>{s.image}</img>\n{question}'},
        {'from': 'assistant', 'value': answer}]} for j, (question, answer) in enumerate(asks)]
  rng.shuffle(out)
  return out


def write_json(records: Any, path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.write_text(json.dumps(records, indent=1), encoding='utf-8')
  return path
