"""`qwenvl-jax plan --compile --json` for several runs of a small model, in one process whose JAX starts
with simulated CPU devices; tests/test_plan.py runs it as

  JAX_PLATFORMS=cpu python tests/plan_checks.py CONFIG.json

and reads one JSON line per case: {"case", "rc", "out" (the command's JSON object)}. No XLA_FLAGS are
needed: `--compile` asks for as many simulated devices as the mesh has before JAX starts.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys

from train import plan

COMMON = ['--batch', '8', '--seq', '256']
CASES = {
    'stage1': ['--stage', '1', '--mesh', 'fsdp=8'],
    'stage2': ['--stage', '2', '--mesh', 'fsdp=8'],
    'stage3': ['--stage', '3', '--mesh', 'fsdp=8'],
    'lora': ['--stage', '3', '--mesh', 'fsdp=8', '--lora'],
    'fsdp_tp': ['--stage', '2', '--mesh', 'fsdp=4,tensor=2', '--rules', 'fsdp_tp'],
    'remat_accum': ['--stage', '2', '--mesh', 'fsdp=4', '--remat', 'full', '--grad-accum', '2'],
}


def main(config: str) -> None:
  for name, flags in CASES.items():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      rc = plan.main(['--config', config, '--compile', '--json', *COMMON, *flags])
    print(json.dumps({'case': name, 'rc': rc, 'out': json.loads(out.getvalue()) if rc == 0 else None}),
          flush=True)


if __name__ == '__main__':
  main(sys.argv[1])
