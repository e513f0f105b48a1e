"""The XLA options for bfloat16 weights on the CPU: set only where they apply, and they keep a program over
bf16 weights from holding a float32 copy of all of them."""
import json
import os
import subprocess
import sys

from qwenvl_jax import xla_flags

_PROBE = '''
import json, jax, jax.numpy as jnp
ws = jax.ShapeDtypeStruct((8, 1024, 1024), jnp.bfloat16)
x = jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16)
def decode(ws, x):  # a loop over steps, each over 8 layers, as generation runs
  def step(_, x):
    for layer in range(ws.shape[0]):
      x = jnp.tanh(jnp.einsum('bd,de->be', x, ws[layer]))
    return x
  return jax.lax.fori_loop(0, 4, step, x)
print(json.dumps(jax.jit(decode).lower(ws, x).compile().memory_analysis().temp_size_in_bytes))
'''


def _temp_bytes(flags: str) -> int:
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_flags_keep_one_layer_converted_at_a_time():
  weights = 8 * 1024 * 1024 * 2
  default, flagged = _temp_bytes(''), _temp_bytes(' '.join(xla_flags.LOW_PRECISION_CPU))
  assert default >= 1.9 * weights  # float32 copies of every layer
  assert flagged < 0.3 * weights  # one layer's (4 MiB of 16 MiB of bf16 weights)


def test_flags_added_once_and_user_flags_kept(monkeypatch):
  monkeypatch.setattr(xla_flags.importlib.util, 'find_spec', lambda name: None)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  assert xla_flags.use_for_low_precision_cpu()
  assert xla_flags.use_for_low_precision_cpu()
  flags = os.environ['XLA_FLAGS'].split()
  assert sorted(flags) == sorted([*xla_flags.LOW_PRECISION_CPU, '--xla_force_host_platform_device_count=2'])
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_concurrency_optimized_scheduler=true')  # the user's wins
  xla_flags.use_for_low_precision_cpu()
  assert '--xla_cpu_enable_concurrency_optimized_scheduler=false' not in os.environ['XLA_FLAGS']


def test_flags_left_alone_with_an_accelerator_backend(monkeypatch):
  monkeypatch.setattr(xla_flags.importlib.util, 'find_spec', lambda name: name == 'jax_cuda12_plugin')
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert not xla_flags.use_for_low_precision_cpu()
  assert 'XLA_FLAGS' not in os.environ
