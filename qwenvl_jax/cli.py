"""`qwenvl-jax`: `chat` with a checkpoint (one prompt, or interactive), and `plan` (sharding plans)."""
from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
from typing import Sequence, TextIO

DEFAULT_COMPILE_CACHE = pathlib.Path('~/.cache/qwenvl_jax/jax')
INTERACTIVE_HELP = 'Type a message; :clear forgets the conversation, :exit (or Ctrl-D) quits.'


def _add_chat_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument('prompt', nargs='?', help='the message; without it the chat is interactive')
  p.add_argument('--ckpt', required=True, help='checkpoint directory in the released layout')
  p.add_argument('--vocab', help='qwen.tiktoken (default: the one in --ckpt)')
  p.add_argument('--image', action='append', default=[], metavar='PATH',
                 help='an image for the first message (repeatable), relative to --image-root')
  p.add_argument('--image-root', default='.', help='images in prompts must lie under this directory')
  p.add_argument('--allow-urls', action='store_true', help='fetch http(s) images named in prompts')
  p.add_argument('--save-dir', default='.', help='where answers with boxes are saved, drawn on the image')
  p.add_argument('--system', default=None, help='system message')
  p.add_argument('--max-new-tokens', type=int, help='default: generation_config.json (512)')
  p.add_argument('--greedy', action='store_true', help='greedy decoding instead of sampling')
  p.add_argument('--temperature', type=float)
  p.add_argument('--top-p', type=float)
  p.add_argument('--top-k', type=int)
  p.add_argument('--seed', type=int, help='sampling seed (default: random)')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                 help='parameter and compute dtype')
  p.add_argument('--compile-cache', default=str(DEFAULT_COMPILE_CACHE),
                 help='JAX persistent compilation cache directory')
  p.add_argument('--no-compile-cache', action='store_true', help='do not use the compilation cache')


def _parser(with_plan: bool) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='qwenvl-jax', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  _add_chat_arguments(sub.add_parser('chat', help='chat with a Qwen-VL-Chat checkpoint'))
  plan = sub.add_parser('plan', help='memory and sharding plan for a configuration')
  if with_plan:  # imported only when asked for: it is optional for chat
    from qwenvl_jax import plan as plan_lib
    plan_lib.add_arguments(plan)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  want_plan = argv[:1] == ['plan']
  args = _parser(with_plan=want_plan).parse_args(argv)
  if args.command == 'plan':
    from qwenvl_jax import plan as plan_lib
    return plan_lib.run(args)
  try:
    return _chat(args, sys.stdin, sys.stdout)
  except (OSError, ValueError) as e:  # bad paths, refused images, malformed checkpoints
    print(f'error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130


class _Session:
  """A loaded model plus the conversation so far."""

  def __init__(self, args: argparse.Namespace):
    import jax
    if not args.no_compile_cache:
      jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(args.compile_cache).expanduser()))
    from qwenvl_jax.chat import DEFAULT_SYSTEM
    from qwenvl_jax.checkpoint import load_pretrained
    from qwenvl_jax.generate import GenerationConfig, decode_params
    from qwenvl_jax.images import ImageLoader
    from qwenvl_jax.model import QwenVL
    from qwenvl_jax.tokenizer import QwenVLTokenizer

    model, params = load_pretrained(args.ckpt, dtype=args.dtype)
    self.params = decode_params(params, consume=True)  # the fast layout, without keeping two copies
    self.model = QwenVL(model.config.replace(dtype=args.dtype))
    self.tokenizer = QwenVLTokenizer.from_pretrained(args.vocab or args.ckpt,
                                                     image_span_length=model.config.vision.n_queries)
    overrides = {k: v for k, v in dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k).items() if v is not None}
    if args.greedy:
      overrides['do_sample'] = False
    self.generation_config = GenerationConfig.from_pretrained(args.ckpt, **overrides)
    self.loader = ImageLoader(allowed_root=args.image_root, allow_urls=args.allow_urls)
    self.system = DEFAULT_SYSTEM if args.system is None else args.system
    self.save_dir = pathlib.Path(args.save_dir)
    self.rng = random.Random(args.seed)
    self.history: list[tuple[str, str]] = []

  def ask(self, query: str, out: TextIO) -> str:
    """Streams one answer to `out`, then saves its boxes drawn on the latest image."""
    from qwenvl_jax.chat import chat_stream
    shown = ''
    for text in chat_stream(self.model, self.params, self.tokenizer, query, self.history, self.system,
                            generation_config=self.generation_config, image_loader=self.loader,
                            seed=self.rng.randrange(2**31)):
      out.write(text[len(shown):] if text.startswith(shown) else '\n' + text)
      out.flush()
      shown = text
    out.write('\n')
    self.history.append((query, shown))
    self._save_boxes(shown, out)
    return shown

  def _save_boxes(self, response: str, out: TextIO) -> None:
    from qwenvl_jax.chat import latest_image
    from qwenvl_jax.grounding import draw_boxes, extract_boxes
    try:
      boxes = extract_boxes(response)
    except ValueError as e:  # a malformed box in generated text is not worth stopping the chat for
      out.write(f'[boxes not drawn: {e}]\n')
      return
    ref = latest_image(response, self.history) if boxes else None
    if ref is None:
      return
    self.save_dir.mkdir(parents=True, exist_ok=True)
    path = self.save_dir / f'turn{len(self.history)}_{pathlib.Path(ref).stem or "image"}_boxes.png'
    draw_boxes(self.loader.load(ref), boxes).save(path)
    out.write(f'[{len(boxes)} box(es) drawn on {ref}: {path}]\n')


def _image_ref(image: str, root: pathlib.Path) -> str:
  """A command-line image path (relative to the working directory) as a prompt reference.

  It becomes relative to the image root: short enough for the image span, and loadable from there.
  """
  if '://' in image:
    return image
  path = pathlib.Path(image).resolve()
  if not path.is_relative_to(root):
    raise PermissionError(f'--image {image} is outside the image root {root}; '
                          'pass --image-root with a directory that holds it')
  return os.path.relpath(path, root)


def _first_query(args: argparse.Namespace, tokenizer, prompt: str) -> str:
  root = pathlib.Path(args.image_root).resolve()
  images = [{'image': _image_ref(image, root)} for image in args.image]
  return tokenizer.from_list_format(images + [{'text': prompt}]) if images else prompt


def _chat(args: argparse.Namespace, stdin: TextIO, out: TextIO) -> int:
  session = _Session(args)
  if args.prompt is not None:
    session.ask(_first_query(args, session.tokenizer, args.prompt), out)
    return 0
  out.write(INTERACTIVE_HELP + '\n')
  first = True
  while True:
    out.write('User> ')
    out.flush()
    line = stdin.readline()
    if not line or line.strip() == ':exit':
      return 0
    line = line.strip()
    if line == ':clear':
      session.history.clear()
      first = True
      continue
    if not line:
      continue
    query = _first_query(args, session.tokenizer, line) if first else line
    out.write('Qwen-VL> ')
    try:
      session.ask(query, out)
      first = False
    except (OSError, ValueError) as e:
      out.write(f'\nerror: {e}\n')


if __name__ == '__main__':
  sys.exit(main())
