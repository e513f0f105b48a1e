"""XLA options that keep bfloat16 (or float16) weights at their own size on the CPU.

XLA's CPU backend has no bfloat16 dot: it converts each weight to float32 before its product. By default
it then schedules every such conversion of a program early (the concurrency-optimised scheduler) and
hoists those of loop-invariant weights out of while loops and scans, so a program over bf16 weights holds
a float32 copy of all of them: 3x the weight bytes, which for the 9.6B model is more than a 24 GB host has.
With the options below one layer's conversion is live at a time (measured with
`compile().memory_analysis()`: 8 bf16 [4096, 4096] weights in a loop, 537 -> 67 MB of temporaries).
XLA reads XLA_FLAGS when its first backend starts, so `use_for_low_precision_cpu` must run before the
first JAX computation of the process.
"""
from __future__ import annotations

import importlib.util
import os

LOW_PRECISION_CPU = ('--xla_cpu_enable_concurrency_optimized_scheduler=false',
                     '--xla_disable_hlo_passes=while-loop-invariant-code-motion')
# Packages that bring an accelerator backend; with one installed the flags are left alone (the second
# would apply to that backend too).
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'libtpu')


def use_for_low_precision_cpu() -> bool:
  """Adds LOW_PRECISION_CPU to XLA_FLAGS (what the user set there stays and wins) when no accelerator
  backend is installed; returns whether it did."""
  if any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS):
    return False
  current = os.environ.get('XLA_FLAGS', '')
  missing = [f for f in LOW_PRECISION_CPU if f.split('=')[0] not in current]
  if missing:
    os.environ['XLA_FLAGS'] = ' '.join([*missing, current]).strip()
  return True
