"""`qwenvl-jax`: `chat` with a checkpoint (one prompt, or interactive), `plan` (sharding plans) and `serve`.

Errors the user can fix (a bad flag value, a missing file, a refused image, a prompt too long) print
one line `qwenvl-jax: error: ...` and exit 2 for a wrong command line, 1 otherwise; anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
from typing import Sequence, TextIO

from qwenvl_jax import runtime_options

INTERACTIVE_HELP = 'Type a message; :clear forgets the conversation, :exit (or Ctrl-D) quits.'
# GenerationConfig field -> the flag that sets it, for naming the flag in errors.
_FLAGS = {'max_new_tokens': '--max-new-tokens', 'temperature': '--temperature', 'top_p': '--top-p',
          'top_k': '--top-k'}


class UsageError(ValueError):
  """A flag value that cannot be used: exit status 2, as for argparse's own errors."""


def _add_chat_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument('prompt', nargs='?', help='the message; without it the chat is interactive')
  p.add_argument('--ckpt', required=True, help='checkpoint directory (released layout or converted)')
  p.add_argument('--vocab', help='qwen.tiktoken (default: the one in --ckpt)')
  p.add_argument('--image', action='append', default=[], metavar='PATH',
                 help='an image for the first message (repeatable); a relative PATH is taken relative to '
                      '--image-root when given, else to the working directory, and must lie under it')
  p.add_argument('--image-root', default=None, metavar='DIR',
                 help='images (from --image and from <img> tags in messages) must lie under this directory '
                      '(default: the working directory)')
  p.add_argument('--allow-urls', action='store_true', help='fetch http(s) images named in prompts')
  p.add_argument('--save-dir', default='.', help='where answers with boxes are saved, drawn on the image')
  p.add_argument('--system', default=None, help='system message')
  p.add_argument('--max-new-tokens', type=int,
                 help='default: generation_config.json (512); the prompt plus this must fit the model '
                      'window (max_position_embeddings, 8192 for the released models)')
  p.add_argument('--greedy', action='store_true', help='greedy decoding instead of sampling')
  p.add_argument('--temperature', type=float, help='finite, >= 0; 0 is greedy (default: 1)')
  p.add_argument('--top-p', type=float, help='in (0, 1]; 1 turns it off (default: generation_config.json)')
  p.add_argument('--top-k', type=int, help='>= 0; 0 turns it off (default: generation_config.json)')
  p.add_argument('--seed', type=int, help='sampling seed (default: random)')
  runtime_options.add_arguments(p)


def _parser(with_plan: bool) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='qwenvl-jax', description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  _add_chat_arguments(sub.add_parser('chat', help='chat with a Qwen-VL-Chat checkpoint'))
  plan = sub.add_parser('plan', help='memory and sharding plan for a configuration')
  sub.add_parser('serve', help='OpenAI-compatible HTTP server (qwenvl-jax serve --help)', add_help=False)
  if with_plan:  # imported only when asked for: it is optional for chat
    from train import plan as plan_lib
    plan_lib.add_arguments(plan)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ['serve']:  # the server parses its own flags (and needs the `serve` extra)
    from serve.cli import main as serve_main
    return serve_main(argv[1:])
  want_plan = argv[:1] == ['plan']
  args = _parser(with_plan=want_plan).parse_args(argv)
  if args.command == 'plan':
    from train import plan as plan_lib
    return plan_lib.run(args)
  try:
    return _chat(args, sys.stdin, sys.stdout)
  except UsageError as e:
    print(f'qwenvl-jax: error: {e}', file=sys.stderr)
    return 2
  except (OSError, ValueError) as e:  # bad paths, refused images, malformed checkpoints, long prompts
    print(f'qwenvl-jax: error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    return 130


def _generation_config(args: argparse.Namespace):
  """generation_config.json of --ckpt with the flags on top; a bad flag value is a UsageError naming it."""
  from qwenvl_jax.decode import GenerationConfig, SettingError
  overrides = {k: v for k, v in dict(
      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
      top_k=args.top_k).items() if v is not None}
  if args.greedy:
    overrides['do_sample'] = False
  try:
    return GenerationConfig.from_pretrained(args.ckpt, **overrides)
  except SettingError as e:  # file errors are ConfigFileErrors: only the flags raise this
    flag = _FLAGS.get(e.name)
    raise UsageError(f'{flag} {overrides[e.name]}: {e.problem}' if flag else str(e)) from None


def _image_refs(images: Sequence[str], root: pathlib.Path) -> list[str]:
  """--image paths as prompt references, relative to `root` (where the loader resolves them).

  Checked to lie under the root and to exist before the model loads, so a typo costs no loading.
  """
  refs = []
  for image in images:
    if '://' in image:  # a URL: the loader refuses it unless --allow-urls
      refs.append(image)
      continue
    path = (root / image).resolve()
    if not path.is_relative_to(root):
      raise PermissionError(f'--image {image} resolves to {path}, outside the image root {root}; '
                            'pass --image-root with a directory that holds it')
    if not path.is_file():
      raise FileNotFoundError(f'--image {image}: no such file {path}')
    refs.append(os.path.relpath(path, root))
  return refs


class _Session:
  """A loaded model plus the conversation so far.

  Everything a flag names is checked before the weights load: the generation settings, --max-new-tokens
  against the model window, the image root and the --image files, the vocabulary.
  """

  def __init__(self, args: argparse.Namespace):
    from qwenvl_jax import budget
    from qwenvl_jax.chat_session import DEFAULT_SYSTEM
    from qwenvl_jax.config import QwenVLConfig
    from qwenvl_jax.images import ImageLoader
    from qwenvl_jax.tokenizer import QwenVLTokenizer

    ckpt = pathlib.Path(args.ckpt)
    if not ckpt.is_dir():
      raise FileNotFoundError(f'checkpoint directory not found: {ckpt}')
    self.generation_config = _generation_config(args)
    # Without config.json, load_pretrained says below what is wrong with the directory.
    config = QwenVLConfig.from_json(ckpt) if (ckpt / 'config.json').is_file() else None
    if config is not None:
      try:
        budget.check_window(config, 1, self.generation_config.max_new_tokens)
      except budget.GenerationLimitError as e:
        raise UsageError(f'--max-new-tokens {self.generation_config.max_new_tokens}: {e}') from None
    root = pathlib.Path('.' if args.image_root is None else args.image_root).resolve()
    if not root.is_dir():
      raise UsageError(f'--image-root {args.image_root}: not a directory')
    if runtime_options.check(args):
      raise UsageError(runtime_options.check(args))
    self.loader = ImageLoader(allowed_root=root, allow_urls=args.allow_urls)
    self.images = _image_refs(args.image, root)
    for ref in self.images:  # a corrupt file fails now, naming it
      if '://' not in ref:
        self.loader.load(ref)
    spans = {} if config is None else {'image_span_length': config.vision.n_queries}
    self.tokenizer = QwenVLTokenizer.from_pretrained(ckpt if args.vocab is None else args.vocab, **spans)
    self.system = DEFAULT_SYSTEM if args.system is None else args.system
    self.save_dir = pathlib.Path(args.save_dir)
    self.rng = random.Random(args.seed)
    self.history: list[tuple[str, str]] = []
    self._load(args)

  def _load(self, args: argparse.Namespace) -> None:
    runtime_options.apply(args)
    from qwenvl_jax.decode import decode_params
    from qwenvl_jax.model import QwenVL
    from qwenvl_jax.tokenizer import check_tokenizer
    from qwenvl_jax.quant import load
    params, config = load(args.ckpt, args.weights, args.dtype, split_layers=True)
    self.params = decode_params(params, consume=True)  # the fast layout, without keeping two copies
    self.model = QwenVL(config)
    check_tokenizer(self.tokenizer, self.model.config)

  def first_query(self, prompt: str) -> str:
    """The first message of a conversation: the --image pictures, then the prompt."""
    items = [{'image': ref} for ref in self.images]
    return self.tokenizer.from_list_format(items + [{'text': prompt}]) if items else prompt

  def ask(self, query: str, out: TextIO) -> str:
    """Streams one answer to `out` (each piece once: chat_stream's texts extend one another), then saves
    its boxes drawn on the latest image."""
    from qwenvl_jax.chat_session import chat_stream
    shown = ''
    for text in chat_stream(self.model, self.params, self.tokenizer, query, self.history, self.system,
                            generation_config=self.generation_config, image_loader=self.loader,
                            seed=self.rng.randrange(2**31)):
      out.write(text[len(shown):])
      out.flush()
      shown = text
    out.write('\n')
    self.history.append((query, shown))
    self._save_boxes(shown, out)
    return shown

  def _save_boxes(self, response: str, out: TextIO) -> None:
    """Draws the answer's boxes (special tokens in it are text to the box parser); a failure to draw is
    reported and the chat goes on."""
    from qwenvl_jax.chat_session import latest_image
    from qwenvl_jax.grounding import draw_boxes, extract_boxes
    try:
      boxes = extract_boxes(response)
      ref = latest_image(response, self.history) if boxes else None
      if ref is None:
        return
      self.save_dir.mkdir(parents=True, exist_ok=True)
      path = self.save_dir / f'turn{len(self.history)}_{pathlib.Path(ref).stem or "image"}_boxes.png'
      draw_boxes(self.loader.load(ref), boxes).save(path)
    except (OSError, ValueError) as e:  # a malformed box or a missing image is not worth ending the chat
      out.write(f'[boxes not drawn: {e}]\n')
      return
    out.write(f'[{len(boxes)} box(es) drawn on {ref}: {path}]\n')


def _chat(args: argparse.Namespace, stdin: TextIO, out: TextIO) -> int:
  session = _Session(args)
  if args.prompt is not None:
    session.ask(session.first_query(args.prompt), out)
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
    query = session.first_query(line) if first else line
    out.write('Qwen-VL> ')
    try:
      session.ask(query, out)
      first = False
    except (OSError, ValueError) as e:
      out.write(f'\nerror: {e}\n')


if __name__ == '__main__':
  sys.exit(main())
