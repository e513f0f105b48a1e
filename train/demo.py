"""`make demo`: build a grounding world, train a small Qwen-VL through the paper's three stages with the
real tokenizer, then ask it where things are on held-out images.

Settings come from train/configs/demo.json. Everything is written under demo_out/: the world (images and
the three stages' data files), each stage's checkpoints and metrics.jsonl, answers/ with the held-out
images and the boxes the model drew, and chat/: the trained model as a checkpoint to chat with
(`qwenvl-jax chat --ckpt demo_out/chat ...`, the command is printed at the end).
"""
from __future__ import annotations

import argparse
import glob
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Sequence

import numpy as np

from qwenvl_jax import jsonfile

VOCAB_IN_WHEEL = 'dashscope/resources/qwen.tiktoken'
CACHE = pathlib.Path.home() / '.cache' / 'qwenvl_jax'
REPO = pathlib.Path(__file__).resolve().parents[1]
CHAT_DIR = 'chat'


def demo_vocab() -> pathlib.Path:
  """qwen.tiktoken from $QWENVL_VOCAB, ../shared, the user cache, else PyPI's dashscope wheel (the file
  only: the SDK is not installed)."""
  candidates = [os.environ.get('QWENVL_VOCAB', ''), 'shared/qwen.tiktoken', '../shared/qwen.tiktoken',
                REPO.parent / 'shared' / 'qwen.tiktoken', CACHE / 'qwen.tiktoken']
  for c in candidates:
    if c and pathlib.Path(c).is_file():
      return pathlib.Path(c)
  print('downloading the Qwen vocabulary (qwen.tiktoken) from the dashscope wheel on PyPI ...', flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--only-binary=:all:',
                    'dashscope', '-d', tmp], check=True)
    wheels = glob.glob(os.path.join(tmp, 'dashscope-*.whl'))
    if not wheels:
      raise FileNotFoundError('pip download dashscope produced no wheel')
    with zipfile.ZipFile(wheels[0]) as z:
      if VOCAB_IN_WHEEL not in z.namelist():
        raise FileNotFoundError(f'{wheels[0]} holds no {VOCAB_IN_WHEEL}')
      data = z.read(VOCAB_IN_WHEEL)
  CACHE.mkdir(parents=True, exist_ok=True)
  target = CACHE / 'qwen.tiktoken'
  target.write_bytes(data)
  return target


def ask_all(model, params, tokenizer, root: pathlib.Path, questions: list[tuple[str, str]],
            batch: int, max_new_tokens: int) -> list[str]:
  """Greedy answers to single-turn chat questions (image path, question text), in batches."""
  from qwenvl_jax.chat_session import DEFAULT_SYSTEM, chat_config
  from qwenvl_jax.chat_format import decode_response, make_context
  from qwenvl_jax.decode import GenerationConfig, decode_params, generate
  from qwenvl_jax.preprocess import preprocess_images
  g = chat_config(tokenizer, GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens))
  params = decode_params(params)  # once, not at every batch
  answers = []
  for start in range(0, len(questions), batch):
    chunk = questions[start:start + batch]
    prompts = [make_context(tokenizer, f'Picture 1: <img>{image}</img>\n{q}', system=DEFAULT_SYSTEM)[1]
               for image, q in chunk]
    pixels = preprocess_images([root / image for image, _ in chunk], model.config.vision.image_size)
    out = generate(model, params, prompts, pixels, generation_config=g)  # prompts left-padded to the longest
    longest = max(len(p) for p in prompts)
    answers += [decode_response(row, tokenizer, longest, g.chat_format) for row in out]
  return answers


def _boxes(answer: str) -> list[dict]:
  """The boxes of an answer; none when the model wrote malformed markup."""
  from qwenvl_jax.grounding import extract_boxes
  try:
    return extract_boxes(answer)
  except ValueError:
    return []


# The demo's questions as the chat model was trained on them (ChatML, as `make_context` builds it), in the
# refcoco task's slots: image, then the referring question.
def chat_grounding_prompt() -> str:
  from qwenvl_jax.chat_session import DEFAULT_SYSTEM
  return (f'<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n'
          'Picture 1: <img>{}</img>\n{}<|im_end|>\n<|im_start|>assistant\n')


def evaluate(model, params, tokenizer, root: pathlib.Path, scenes, out_dir: pathlib.Path, ev: dict,
             show: int) -> tuple[float, float]:
  """(grounding Precision@1, letter-reading accuracy) in % on `scenes`. Every shape is asked for through
  `qwenvl_eval` with the refcoco protocol (the first box of the answer, /999, scaled to the image, IoU >=
  0.5 with the shape's box in pixels), its prompt in the chat format the demo trains; every letter is read
  (the exact answer counts)."""
  import qwenvl_eval
  import qwenvl_eval.metrics.grounding
  from PIL import Image
  from qwenvl_jax.decode import decode_params
  from qwenvl_jax.grounding import draw_boxes
  from train.world import letter_answer, letter_question, where_question
  params = decode_params(params)  # once, for both kinds of question
  shapes = [(i, t) for i, s in enumerate(scenes) for t in s.things]
  records = []
  for i, t in shapes:
    with Image.open(root / scenes[i].image) as im:
      w, h = im.size
    records.append({'image': scenes[i].image, 'sent': where_question(t), 'width': w, 'height': h,
                    'bbox': [t.box[0] * w / 1000, t.box[1] * h / 1000, t.box[2] * w / 1000, t.box[3] * h / 1000]})
  task = qwenvl_eval.TASKS['refcoco_val'].replace(prompt=chat_grounding_prompt())
  result = qwenvl_eval.evaluate(task, model, params, tokenizer, records, image_root=root,
                                out_dir=out_dir / 'grounding_eval', batch_size=ev['batch'])
  answers = [p['answer'] for p in result.predictions]
  grounding = [item['correct'] for item in qwenvl_eval.metrics.grounding.score(result.predictions)['per_item']]
  lettered = [(i, t) for i, t in shapes if t.letter]
  read = ask_all(model, params, tokenizer, root, [(scenes[i].image, letter_question(t)) for i, t in lettered],
                 ev['batch'], ev['max_new_tokens'])
  reading = [a.strip() == letter_answer(t) for a, (_, t) in zip(read, lettered)]
  out_dir.mkdir(parents=True, exist_ok=True)
  found = [_boxes(a) for a in answers]
  for i, s in enumerate(scenes[:ev['save_images']]):
    mine = [b for (owner, _), boxes in zip(shapes, found) if owner == i for b in boxes[:1]]
    with Image.open(root / s.image) as im:
      draw_boxes(im.resize((448, 448)), mine).save(out_dir / f'{pathlib.Path(s.image).stem}.png')
  shown = ([(scenes[i].image, where_question(t), a, ok) for (i, t), a, ok in zip(shapes, answers, grounding)][:show // 2]
           + [(scenes[i].image, letter_question(t), a, ok) for (i, t), a, ok in zip(lettered, read, reading)][:show // 2])
  for image, q, a, ok in shown:
    print(f'  [{image}] {q}\n    -> {a}   {"(correct)" if ok else "(wrong)"}')
  score = 100.0 * float(result.metrics['score'])
  return score, 100.0 * float(np.mean(reading)) if reading else float('nan')


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m train.demo', description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='demo', help='demo settings (default: train/configs/demo.json)')
  parser.add_argument('--out', default='demo_out')
  parser.add_argument('--seed', type=int, default=None, help='override the config seed')
  args = parser.parse_args(argv)
  start = time.perf_counter()

  import jax
  from qwenvl_jax.config import QwenVLConfig
  from qwenvl_jax.model import QwenVL
  from qwenvl_jax.tokenizer import QwenVLTokenizer
  from train import world
  from train.config import stage_config
  from train.trainer import run

  demo = read_demo_config(args.config)
  seed = demo['seed'] if args.seed is None else args.seed
  out = pathlib.Path(args.out)
  shutil.rmtree(out, ignore_errors=True)
  root = out / 'world'
  wcfg = world.WorldConfig(**demo['world']['scene'])
  train_scenes, test_scenes = world.make_world(
      root, demo['world']['train_images'], demo['world']['test_images'], seed, wcfg)
  rng = random.Random(seed)
  stage2 = world.multitask_records(train_scenes, rng, demo['world']['stage2_other_tasks'])
  files = {1: world.write_json(world.caption_records(train_scenes), root / 'stage1.json'),
           2: world.write_json(stage2, root / 'stage2.json'),
           3: world.write_json(world.chat_records(train_scenes, rng), root / 'stage3.json')}
  model_config = QwenVLConfig.from_dict(demo['model'])
  tokenizer = QwenVLTokenizer(demo_vocab(), image_span_length=model_config.vision.n_queries)
  print(f'world: {len(train_scenes)} training and {len(test_scenes)} held-out images in {root}; '
        f'model: {model_config.text.num_layers}-layer decoder ({model_config.text.hidden_size} wide), '
        f'{model_config.vision.layers}-layer ViT, vocabulary {model_config.text.vocab_size}; '
        f'{jax.devices()[0].platform} ({time.perf_counter() - start:.0f} s)', flush=True)

  params = None
  for stage in (1, 2, 3):
    cfg = stage_config(stage, **demo['stages'][str(stage)], data=str(files[stage]),
                       out_dir=str(out / f'stage{stage}'), seed=seed)
    model_config, params, logged = run(cfg, model_config=model_config, params=params, tokenizer=tokenizer,
                                       desc=f'stage {stage} ({cfg.image_size}px)')
    print(f'stage {stage}: {cfg.steps} steps, final loss {logged[-1]["loss"]:.3f} '
          f'({time.perf_counter() - start:.0f} s)', flush=True)

  model = QwenVL(model_config.replace(dtype='float32'))
  grounding, reading = evaluate(model, params, tokenizer, root, test_scenes, out / 'answers', demo['eval'],
                                show=6)
  print(f'boxes drawn on held-out images: {out / "answers"}; total {time.perf_counter() - start:.0f} s')
  chat = export_chat(params, model_config, tokenizer, out / CHAT_DIR, demo['eval'])
  print(f'letter reading accuracy: {reading:.1f}%')
  print(f'grounding accuracy (refcoco Precision@1, IoU>=0.5, through qwenvl_eval): {grounding:.1f}%')
  # --image is relative to --image-root, so the prompt's image path is as short as in training (it must
  # fit the image span).
  print(f'chat with the trained model:\n  qwenvl-jax chat --ckpt {chat} --image-root {root} '
        f'--image {test_scenes[0].image} '
        f'"{world.where_question(test_scenes[0].things[0])}"')
  return 0


def export_chat(params, model_config, tokenizer, directory: pathlib.Path, ev: dict) -> pathlib.Path:
  """The trained model in the released layout with its vocabulary and a greedy generation_config.json,
  ready for `qwenvl-jax chat --ckpt` and `load_pretrained`."""
  from qwenvl_jax.generation_config import ENDOFTEXT_ID
  from train.trainer import export
  generation = {'chat_format': 'chatml', 'do_sample': False, 'max_new_tokens': ev['max_new_tokens'],
                'eos_token_id': ENDOFTEXT_ID, 'pad_token_id': ENDOFTEXT_ID}
  return export(params, model_config.replace(dtype='float32'), directory, tokenizer.vocab_file, generation)


def read_demo_config(name: str) -> dict:
  """demo.json (or another file of its form), each section checked: errors name the file and the key."""
  from train.config import load_json, resolve_config_path
  file = resolve_config_path(name)
  d = load_json(file)
  out = {'seed': jsonfile.get(d, 'seed', int, file)}
  for section in ('world', 'model', 'stages', 'eval'):
    out[section] = jsonfile.get(d, section, dict, file)
  w = out['world']
  for key, kind in (('train_images', int), ('test_images', int), ('stage2_other_tasks', float),
                    ('scene', dict)):
    jsonfile.get(w, key, kind, file, prefix='world.')
  for stage in '123':
    jsonfile.get(out['stages'], stage, dict, file, prefix='stages.')
  for key in ('batch', 'max_new_tokens', 'save_images'):
    jsonfile.get(out['eval'], key, int, file, prefix='eval.')
  return out


if __name__ == '__main__':
  sys.exit(main())
