"""The CPU decode-attention kernel: parity with XLA's attention, its use in generation, and its build."""
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenvl_jax as q
from qwenvl_jax import cpu_kernels
from qwenvl_jax.kernel_math import attend

from qwenvl_jax import batching, sampling
from qwenvl_jax import decode as gen


@pytest.fixture(scope='module')
def kernel():
  """The kernel, built. It is optional: without a C++ compiler (or switched off) these tests skip; with
  one, a failed build fails them."""
  if not cpu_kernels.enabled():
    pytest.skip('QWENVL_JAX_CPU_KERNELS turns the kernel off')
  if cpu_kernels._compiler() is None:
    pytest.skip('no C++ compiler ($CXX, c++, g++, clang++): generation attends with XLA alone')
  if not cpu_kernels.available():
    pytest.fail('a C++ compiler is there but the kernel did not build (see the warning)')


def masks(b: int, s: int) -> np.ndarray:
  """Row 0 left-padded, row 1 with holes, row 2 causal (only a prefix), row 3 all masked, others full."""
  rng = np.random.default_rng(1)
  m = np.ones((b, s), bool)
  rows = [np.arange(s) >= s // 3, rng.random(s) < 0.7, np.arange(s) <= s // 2, np.zeros(s, bool)]
  for r, row in enumerate(rows[:b]):
    m[r] = row
  return m


@pytest.mark.parametrize('b, h, d, s', [(1, 2, 64, 1), (4, 3, 8, 37), (5, 16, 64, 192), (2, 2, 128, 1030)])
def test_attend_one_equals_attend(kernel, b, h, d, s):
  rng = np.random.default_rng(0)
  shapes = ((b, h, d), (b, h, d, s), (b, h, d, s))
  qs, k, v = (rng.normal(size=shape).astype(np.float32) * 3 for shape in shapes)
  valid = masks(b, s) if b > 1 else np.ones((1, s), bool)
  want = attend(qs[:, None], k.transpose(0, 3, 1, 2), v.transpose(0, 3, 1, 2), valid[:, None], jnp.float32)
  got = jax.jit(cpu_kernels.attend_one)(qs, k, v, valid)
  # Outputs of magnitude ~1 summed over up to 1030 slots in another order than XLA's (whose order also
  # depends on its code generation): a few float32 roundings apart.
  chex.assert_trees_all_close(got, want[:, 0], atol=1e-5, rtol=2e-5)
  other_backends = jax.jit(cpu_kernels._xla_attend_one)(qs, k, v, valid)  # platform_dependent's default
  chex.assert_trees_all_close(other_backends, want[:, 0], atol=1e-6, rtol=1e-6)


def test_attend_one_reads_the_first_rows_of_a_larger_cache(kernel):
  """A server's step over its first b busy rows passes the whole cache: the kernel reads those rows where
  they lie, as it attends over them alone."""
  rng = np.random.default_rng(1)
  qs, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((3, 2, 8), (5, 2, 8, 11), (5, 2, 8, 11)))
  valid = masks(3, 11)
  got = jax.jit(cpu_kernels.attend_one)(qs, k, v, valid)
  np.testing.assert_array_equal(got, jax.jit(cpu_kernels.attend_one)(qs, k[:3], v[:3], valid))
  chex.assert_trees_all_close(jax.jit(cpu_kernels._xla_attend_one)(qs, k, v, valid), got, atol=1e-5, rtol=2e-5)


def test_attend_one_lowers_to_the_kernel_on_cpu(kernel):
  args = (jnp.zeros((2, 2, 8)), jnp.zeros((2, 2, 8, 5)), jnp.zeros((2, 2, 8, 5)), jnp.ones((2, 5), bool))
  assert cpu_kernels.ATTEND_TARGET in jax.jit(cpu_kernels.attend_one).lower(*args).as_text()


@pytest.fixture
def fresh_traces():
  """jit's caches emptied before and after: traced decode steps depend on the kernel switch."""
  jax.clear_caches()
  yield
  jax.clear_caches()


def test_generation_with_and_without_the_kernel(kernel, golden_dir, golden, monkeypatch, fresh_traces):
  """Greedy tokens equal and logits within float rounding, for a left-padded batch, kernel on or off."""
  model, params = q.load_pretrained(golden_dir / 'checkpoint')
  rows = [golden['long.input_ids'][0][:30], golden['long.input_ids'][0][:11]]
  results = []
  for on in ('1', '0'):
    monkeypatch.setenv('QWENVL_JAX_CPU_KERNELS', on)
    jax.clear_caches()
    ids = gen.decode_params(params)
    args, kwargs = _advance_args(model, ids, rows)
    lowered = gen._advance_jit.lower(*args, **kwargs).as_text()
    assert (cpu_kernels.ATTEND_TARGET in lowered) == (on == '1')
    results.append(gen.generate(model, ids, rows, max_new_tokens=12, do_sample=False, output_logits=True))
  (tokens_on, logits_on), (tokens_off, logits_off) = results
  np.testing.assert_array_equal(tokens_on, tokens_off)
  chex.assert_trees_all_close(logits_on, logits_off, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('n_rows', [1, 2])
def test_decode_step_copies_no_cache(kernel, golden_dir, n_rows):
  """The compiled decode step updates every cache in place (without the b axis, a batch of 1 had its
  caches copied several times per layer around the kernel)."""
  model, params = q.load_pretrained(golden_dir / 'checkpoint')
  args, kwargs = _advance_args(model, gen.decode_params(params), [np.arange(5, 12)] * n_rows)
  compiled = gen._advance_jit.lower(*args, **kwargs).compile().as_text()
  cache_shape = ','.join(map(str, args[1].cache[0].k.shape))
  assert cpu_kernels.ATTEND_TARGET in compiled
  assert not [line for line in compiled.splitlines() if f'[{cache_shape}]' in line and ' copy(' in line]


def test_server_step_over_its_first_rows_copies_no_cache(kernel, golden_dir):
  """The server's step over its first 2 of 4 rows, and the first 64 of their 128 slots, writes and reads
  them in the whole cache: no copy of the cache, nor of those rows (they were copied out and back, ~40% of
  a 1-row step at the bench dims)."""
  from serve.slots import Slots
  model, params = q.load_pretrained(golden_dir / 'checkpoint')
  slots, n = Slots(model.config, gen.decode_params(params), 4, 128), 2
  state = slots.state(*(np.zeros(4, np.int32) for _ in range(4)))
  compiled = slots._step.lower(slots.params, slots.cache, state, config=model.config, n=n, slots=64).compile().as_text()
  rows, *rest = slots.cache[0].k.shape
  assert cpu_kernels.ATTEND_TARGET in compiled
  assert not [line for line in compiled.splitlines() if f'[{rows},{",".join(map(str, rest))}]' in line and ' copy(' in line]
  assert f'[{n},{",".join(map(str, rest))}]' not in compiled


def _advance_args(model, params, rows):
  batch = batching.make_batch(rows, None, model.config, 0, gen.Buckets())
  config = gen.GenerationConfig(do_sample=False)
  sampler, key, min_new = sampling.Sampler.of(config), jax.random.key(0), jnp.int32(0)
  features = jnp.zeros((1, model.config.vision.n_queries, model.config.text.hidden_size))
  state, _ = gen._prefill_jit(params, batch.ids, batch.mask, features, min_new, key, config=model.config,
                              sampler=sampler, slots=batch.ids.shape[1] + 16)
  return (params, state, batch.ids.shape[1], min_new, key), dict(config=model.config, sampler=sampler)


def test_build_is_cached_and_atomic(kernel, tmp_path):
  compiler = cpu_kernels._compiler()
  first = cpu_kernels.build(compiler, tmp_path)
  mtime = first.stat().st_mtime_ns
  assert cpu_kernels.build(compiler, tmp_path) == first and first.stat().st_mtime_ns == mtime
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_failed_build_names_the_compiler_and_leaves_nothing(tmp_path):
  with pytest.raises(RuntimeError, match='false failed'):
    cpu_kernels.build('/bin/false', tmp_path)
  assert not list(tmp_path.iterdir())


def test_switch(monkeypatch):
  for off in ('0', 'false', 'OFF'):
    monkeypatch.setenv('QWENVL_JAX_CPU_KERNELS', off)
    assert not cpu_kernels.enabled() and not cpu_kernels.available()
  monkeypatch.setenv('QWENVL_JAX_CPU_KERNELS', '1')
  assert cpu_kernels.enabled()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert not cpu_kernels.available()  # nor built: a GPU process needs no C++ compiler
  assert pathlib.Path(cpu_kernels.SOURCE).exists()


def test_without_a_compiler_it_warns_and_xla_attends(monkeypatch):
  monkeypatch.setattr(cpu_kernels, '_compiler', lambda: None)
  with pytest.warns(RuntimeWarning, match='no C\\+\\+ compiler'):
    assert cpu_kernels._registered.__wrapped__() is False  # the cached answer of this process stays
