"""Compile time of the released-size (9.6B) forward, lowered from eval_shape'd parameters.

Nothing of the model is allocated: parameters and inputs are ShapeDtypeStructs. Because both towers run
under nn.scan, one ViT block and one decoder block are compiled whatever the depth.

  python -m bench.compile_time [--seq 512] [--dtype bfloat16] [--remat none]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from qwenvl_jax import QwenVL, qwen_vl_7b
from qwenvl_jax.model import param_shapes


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--seq', type=int, default=512)
  ap.add_argument('--batch', type=int, default=1)
  ap.add_argument('--dtype', default='bfloat16')
  ap.add_argument('--remat', default='none')
  args = ap.parse_args(argv)

  cfg = qwen_vl_7b(dtype=args.dtype, param_dtype=args.dtype, remat=args.remat)
  model = QwenVL(cfg)
  t0 = time.perf_counter()
  params = param_shapes(model)
  t_shape = time.perf_counter() - t0
  n_params = sum(x.size for x in jax.tree.leaves(params))
  size = cfg.vision.image_size
  ids = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  pixels = jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.float32)
  fwd = jax.jit(lambda p, i, x: model.apply({'params': p}, i, x, logits_at=jnp.full((i.shape[0], 1),
                                                                                     i.shape[1] - 1)))
  t0 = time.perf_counter()
  lowered = fwd.lower(params, ids, pixels)
  t_lower = time.perf_counter() - t0
  t0 = time.perf_counter()
  lowered.compile()
  t_compile = time.perf_counter() - t0
  print(f'released Qwen-VL forward: {n_params:,} params, batch {args.batch}, {args.seq} tokens + '
        f'{args.batch} image(s) of {size}px, {args.dtype}, remat={args.remat}, backend={jax.default_backend()}')
  print(f'eval_shape {t_shape:.1f}s  lower {t_lower:.1f}s  compile {t_compile:.1f}s')


if __name__ == '__main__':
  main()
