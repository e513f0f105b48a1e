"""The engine's token choice (serve/choice.py): per-row settings as arrays, one program for any values."""
import jax
import numpy as np

from qwenvl_jax import GenerationConfig
from qwenvl_jax.sampling import Sampler, candidate_width, select
from serve import choice
from serve.choice import Choices

V = 1000
_select = jax.jit(select, static_argnums=4)  # as generate runs it: compiled, settings static
# (settings, step, seed): greedy and sampled rows, top-k past the 256 candidates, flat rows (top-p sorts
# every token), min_new_tokens holding stop ids, a vocab limit, more stop ids than the width
ROWS = [
    (dict(do_sample=False, stop_ids=(5, 7), min_new_tokens=1), 0, 0),
    (dict(temperature=0.7, top_p=0.9, stop_ids=()), 3, 1),
    (dict(temperature=1.3, top_k=40, top_p=0.8, stop_ids=(3,), min_new_tokens=2, vocab_limit=900), 1, 2),
    (dict(temperature=1.0, top_k=300, top_p=1.0, stop_ids=(1, 2)), 2, 3),
    (dict(temperature=2.0, top_p=1.0, stop_ids=(9,), min_new_tokens=9), 5, 2**32 - 1),
    (dict(temperature=0.5, top_k=5, top_p=0.95), 0, 7),
    (dict(temperature=0.9, top_p=0.3, stop_ids=tuple(range(10, 22)), min_new_tokens=4), 1, 8),
    (dict(do_sample=False, vocab_limit=500, stop_ids=(499,)), 4, 9),
]


def _logits(seed: int) -> np.ndarray:
  scale = np.array([3.0, 0.05, 3.0, 1.0, 2.0, 0.05, 1.0, 1.0], np.float32)[:, None]  # peaked and flat rows
  return np.random.default_rng(seed).normal(size=(len(ROWS), V)).astype(np.float32) * scale


def _table(rows=ROWS) -> tuple[Choices, np.ndarray]:
  table = Choices(len(rows))
  for r, (settings, _, seed) in enumerate(rows):
    table.set(r, GenerationConfig(**settings), seed)
  return table, np.array([step for _, step, _ in rows], np.int32)


def test_each_row_chooses_as_alone():
  """Rows of different settings chosen together: each token is `select`'s for that row alone (logits
  [1, v], its own Sampler and seeded key), as `generate` chooses for the request alone."""
  table, steps = _table()
  for seed in range(3):
    logits = _logits(seed)
    logits[2, 3] = logits[4, 9] = logits[6, 12] = 100.0  # stop ids held by min_new_tokens
    together = table.choose(jax.numpy.asarray(logits), np.arange(len(ROWS)), steps)
    alone = [int(_select(logits[r:r + 1], steps[r], settings.get('min_new_tokens', 0), jax.random.key(s),
                         Sampler.of(GenerationConfig(**settings)))[0]) for r, (settings, _, s) in enumerate(ROWS)]
    assert together.tolist() == alone
    assert together[2] != 3 and together[4] != 9 and together[6] != 12 and together[7] < 500


def test_settings_compile_nothing():
  """New temperatures, top_k (up to the 256 candidates, or past the vocabulary), top_p, stop lists and
  seeds reuse the program of their row count; more stop ids than the width widen it once (a program per
  width, not per value)."""
  table, steps = _table(ROWS[:3])
  logits = jax.numpy.asarray(_logits(0)[:3])
  table.choose(logits, np.arange(3), steps)
  size = choice._choose._cache_size()
  rng = np.random.default_rng(0)
  for i in range(6):
    table.set(i % 3, GenerationConfig(temperature=float(rng.uniform(0.1, 2)),
                                      top_k=10**12 if i == 1 else int(rng.integers(0, 257)),
                                      top_p=float(rng.uniform(0.1, 1)), stop_ids=tuple(rng.integers(0, V, i)),
                                      min_new_tokens=i, do_sample=bool(i % 3)), seed=i)
    table.choose(logits, np.arange(3), steps + i)
  assert choice._choose._cache_size() == size
  table.set(0, GenerationConfig(stop_ids=tuple(range(choice.STOP_WIDTH + 1))), 0)
  table.choose(logits, np.arange(3), steps)
  assert choice._choose._cache_size() == size + 1 and table.stop_ids.shape[1] == 2 * choice.STOP_WIDTH
  for i in range(3):
    table.set(1, GenerationConfig(stop_ids=tuple(range(i))), i)
    table.choose(logits, np.arange(3), steps)
  assert choice._choose._cache_size() == size + 1


def test_top_k_width_follows_the_rows():
  """A row's top_k past the 256 candidates makes the rows chosen with it look among the next power of two
  of best tokens (one program per power of two, not per value), not sort the vocabulary; once it leaves,
  the others are back to 256. Each row still chooses as alone."""
  assert candidate_width([0, 40, 256], V) == 256 and candidate_width([300, 5], V) == 512
  assert candidate_width([600, 10**12], V) == V and candidate_width([10**12, 1000], V) == 256
  table, steps = _table()  # ROWS[3] has top_k 300
  assert table._width(np.arange(len(ROWS)), V) == 512 and table._width(np.arange(3), V) == 256
  logits = _logits(1)
  alone = [int(_select(logits[r:r + 1], steps[r], settings.get('min_new_tokens', 0), jax.random.key(s),
                       Sampler.of(GenerationConfig(**settings)))[0]) for r, (settings, _, s) in enumerate(ROWS)]
  size = choice._choose._cache_size()
  for k in (300, 400, 511):
    table.set(3, GenerationConfig(**{**ROWS[3][0], 'top_k': k}), ROWS[3][2])
    table.choose(jax.numpy.asarray(logits), np.arange(len(ROWS)), steps)
  table.set(3, GenerationConfig(**ROWS[3][0]), ROWS[3][2])
  assert table.choose(jax.numpy.asarray(logits), np.arange(len(ROWS)), steps).tolist() == alone
  assert choice._choose._cache_size() <= size + 1
  table.clear(3)
  assert table._width(np.arange(len(ROWS)), V) == 256
