"""`qwenvl-jax plan --compile --json` for several runs of a small model, in one process whose JAX starts
with simulated CPU devices; tests/test_plan.py runs it as

  JAX_PLATFORMS=cpu python tests/plan_checks.py CONFIG.json CASE...

and reads one JSON line per case: {"case", "rc", "out" (the command's JSON object)}. No XLA_FLAGS are
needed: `--compile` asks for as many simulated devices as the mesh has before JAX starts.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys

from train import plan

COMMON = ['--seq', '256']
# Cases run in one process must use one device count (the first case's mesh sets it).
CASES = {  # 4 devices
    'stage1': ['--stage', '1', '--mesh', 'fsdp=4', '--batch', '4'],
    'stage2': ['--stage', '2', '--mesh', 'fsdp=4', '--batch', '4'],
    'stage3': ['--stage', '3', '--mesh', 'fsdp=4', '--batch', '4'],
    'lora': ['--stage', '3', '--mesh', 'fsdp=4', '--batch', '4', '--lora'],
    'qlora': ['--stage', '3', '--mesh', 'fsdp=4', '--batch', '4', '--lora', '--weights', 'int4'],
    'qlora_remat': ['--stage', '3', '--mesh', 'fsdp=4', '--batch', '4', '--lora', '--weights', 'int4', '--remat',
                    'full'],
    # 8 devices
    'fsdp_tp': ['--stage', '2', '--mesh', 'fsdp=4,tensor=2', '--batch', '8', '--rules', 'fsdp_tp'],
    'remat_accum': ['--stage', '2', '--mesh', 'fsdp=8', '--batch', '16', '--remat', 'full',
                    '--grad-accum', '2'],
}


def main(config: str, cases: list[str]) -> None:
  for name in cases:
    flags = CASES[name]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      rc = plan.main(['--config', config, '--compile', '--json', *COMMON, *flags])
    print(json.dumps({'case': name, 'rc': rc, 'out': json.loads(out.getvalue()) if rc == 0 else None}),
          flush=True)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
