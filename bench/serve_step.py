"""KV-cache bytes one decode step of the server reads, at the released Qwen-VL-Chat dims (bfloat16).

The engine's step program (`serve.slots._step`) is traced, not run (no weights or cache are allocated),
for the (rows, slots) bucket the engine picks (`serve.slots.step_bucket`) when each of `--rows` rows
holds `--tokens` tokens in a cache of `--max-len` slots a row; the bytes are taken from the shapes every
layer's attention reads in that program (keys and values of its rows and slots). Beside them: what the
same step read before slot buckets, every slot of its rows (the cache's own slot count, from the same
trace). Memory-bound decoding pays for these bytes at every step, whatever the rows' real lengths.

  python -m bench.serve_step [--rows 8 --max-len 2048 --tokens 100 200 1000 2000]
"""
from __future__ import annotations

import argparse
import datetime
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.config import qwen_vl_7b
from qwenvl_jax.decode import decoding_model, empty_cache
from qwenvl_jax.decoder import KVCache
from qwenvl_jax.model import param_shapes
from serve import slots as slots_module

GIB = 2**30


def cache_reads(config, rows: int, max_len: int, tokens: int) -> dict:
  """{rows, slots, read, whole}: the step's bucket, the cache bytes its attention reads, and the bytes of
  every slot of those rows (what a step read before buckets), from the traced program's shapes."""
  n, slots = slots_module.step_bucket(rows, tokens, rows, max_len)  # every row writes its next token at `tokens`
  params = param_shapes(decoding_model(config))
  cache = jax.eval_shape(lambda: empty_cache(config, rows, max_len))
  state = slots_module.RowState(*(jax.ShapeDtypeStruct((rows,), t)
                                  for t in (jnp.int32, jnp.int32, jnp.int32, jnp.int32, jnp.float32, bool)))
  seen = []
  attend = KVCache.attend

  def recorded(self, q, mask, dtype):  # the shapes of what each layer's attention reads in this trace
    per_slot = int(np.prod(self.k.shape[-3:-1] if self.slots_last else self.k.shape[-2:])) * self.k.dtype.itemsize
    total = self.k.shape[-1] if self.slots_last else self.k.shape[-3]
    seen.append((q.shape[0], mask.shape[-1], total, per_slot))
    return attend(self, q, mask, dtype)
  KVCache.attend = recorded
  try:
    jax.eval_shape(functools.partial(slots_module._step, config=config, n=n, slots=slots), params, cache, state)
  finally:
    KVCache.attend = attend
  assert len(seen) == config.text.num_layers, seen
  read = sum(2 * b * s * per_slot for b, s, _, per_slot in seen)  # keys and values
  whole = sum(2 * b * total * per_slot for b, _, total, per_slot in seen)
  return dict(rows=n, slots=slots, read=read, whole=whole)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--rows', type=int, default=8)
  ap.add_argument('--max-len', type=int, default=2048)
  ap.add_argument('--tokens', type=int, nargs='+', default=[100, 200, 1000, 2000], help="each row's length")
  args = ap.parse_args(argv)
  config = qwen_vl_7b(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  t = config.text
  print(f'# serve step cache reads {datetime.date.today()}: released dims (hidden {t.hidden_size}, '
        f'{t.num_layers} layers, bfloat16), {args.rows} rows x --max-len {args.max_len}\n')
  print('| tokens a row | step bucket (rows x slots) | cache read a step | before (every slot) | less |')
  print('| --- | --- | --- | --- | --- |')
  for tokens in args.tokens:
    r = cache_reads(config, args.rows, args.max_len, min(tokens, args.max_len - 1))
    print(f'| {tokens} | {r["rows"]} x {r["slots"]} | {r["read"] / GIB:.2f} GiB | {r["whole"] / GIB:.2f} GiB | '
          f'{r["whole"] / r["read"]:.0f}x |')


if __name__ == '__main__':
  main()
