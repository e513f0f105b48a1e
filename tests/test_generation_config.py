"""GenerationConfig: every setting refused by name when it cannot work, generation_config.json errors
naming the file and key, and no setting producing an id past the tokenizer's vocabulary."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwenvl_jax as q
from qwenvl_jax import sampling
from qwenvl_jax.decode import GenerationConfig, SettingError, generate, generate_stream
from qwenvl_jax.jsonfile import ConfigFileError



@pytest.mark.parametrize('name, value', [
    ('temperature', float('inf')), ('temperature', float('nan')), ('temperature', -0.5),
    ('temperature', '1.0'), ('top_p', 0.0), ('top_p', 1.5), ('top_p', float('nan')), ('top_k', -1),
    ('top_k', 2.5), ('top_k', True), ('max_new_tokens', 0), ('max_new_tokens', 10.0),
    ('min_new_tokens', -1), ('do_sample', 1), ('stop_ids', 'x'), ('stop_ids', (-3,)), ('stop_ids', 7),
    ('pad_id', -1), ('vocab_limit', 0), ('chat_format', 'llama'), ('max_window_size', 0)])
def test_bad_settings_refused_by_name(name, value):
  with pytest.raises(SettingError, match=name) as e:
    GenerationConfig(**{name: value})
  assert e.value.name == name
  with pytest.raises(SettingError, match=name):
    GenerationConfig().replace(**{name: value})


def test_settings_normalised_and_temperature_zero_is_greedy():
  g = GenerationConfig(temperature=0, top_k=np.int64(3), stop_ids=[5, np.int32(6)], vocab_limit=100)
  assert (g.temperature, g.top_k, g.stop_ids) == (0.0, 3, (5, 6))
  assert type(g.top_k) is int and g.greedy and not GenerationConfig().greedy
  assert not sampling.Sampler.of(g).do_sample
  with pytest.raises(SettingError, match=r'stop_ids \[100\] can never be generated'):
    g.replace(stop_ids=(5, 100))


def _write(tmp_path, content) -> str:
  (tmp_path / 'generation_config.json').write_text(content if isinstance(content, str) else json.dumps(content))
  return str(tmp_path / 'generation_config.json')


@pytest.mark.parametrize('content, key, problem', [
    ('{"top_p": 0.5,', None, 'not valid JSON'),
    ([1, 2], None, 'expected a JSON object'),
    ({'top_p': '0.5'}, 'top_p', "found a string '0.5'"),
    ({'eos_token_id': 'eos'}, 'eos_token_id', 'found a string'),
    ({'eos_token_id': [151643, 'x']}, 'eos_token_id', "got 'x'"),
    ({'do_sample': 'true'}, 'do_sample', 'expected a boolean'),
    ({'max_new_tokens': 0}, 'max_new_tokens', 'must be >= 1'),
    ({'top_p': 1.5}, 'top_p', 'must be in (0, 1]'),
    ({'temperature': -1}, 'temperature', 'must be >= 0'),
    ({'pad_token_id': -2}, 'pad_token_id', 'must be >= 0'),
    ({'num_beams': 4}, 'num_beams', 'does not implement'),
])
def test_generation_config_file_errors_name_file_and_key(tmp_path, content, key, problem):
  file = _write(tmp_path, content)
  with pytest.raises(ConfigFileError) as e:
    GenerationConfig.from_pretrained(tmp_path)
  assert e.value.file == file and e.value.key == key and problem in str(e.value)


def test_generation_config_file_and_overrides(tmp_path):
  assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig()  # no file: the defaults
  with pytest.raises(FileNotFoundError, match='nowhere'):
    GenerationConfig.from_pretrained(tmp_path / 'nowhere')
  _write(tmp_path, {'eos_token_id': [7, 8], 'pad_token_id': None, 'top_k': 4, 'temperature': 1,
                    'transformers_version': '4.31.0'})
  g = GenerationConfig.from_pretrained(tmp_path, top_p=0.9)
  assert (g.stop_ids, g.pad_id, g.top_k, g.temperature, g.top_p) == ((7, 8), GenerationConfig().pad_id,
                                                                     4, 1.0, 0.9)
  with pytest.raises(SettingError, match='top_p') as e:  # a bad override names the setting, not the file
    GenerationConfig.from_pretrained(tmp_path, top_p=2.0)
  assert not isinstance(e.value, ConfigFileError)


@pytest.mark.parametrize('settings', [
    dict(temperature=1e30), dict(temperature=1e-30), dict(temperature=1e-30, top_p=1.0),
    dict(temperature=3.0, top_k=50, top_p=1.0), dict(temperature=1.0, do_sample=False), dict(temperature=0.0),
    dict(temperature=float('inf'))])  # refused by GenerationConfig; the sampler holds even so
def test_sampler_never_picks_an_id_past_vocab_limit(settings):
  """Logits that favour the padding ids (and NaN or -inf in the valid ones) still give valid ids."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 1000)).astype(np.float32)
  logits[:, 600:] = 50.0
  logits[1, :600] = -np.inf
  logits[2, 10:20] = np.nan
  logits[3, :600] = -1e30
  if settings['temperature'] == float('inf'):
    sampler = sampling.Sampler(True, float('inf'), 0, 0.5, (), 0, vocab_limit=600)
  else:
    sampler = sampling.Sampler.of(GenerationConfig(vocab_limit=600, stop_ids=(), **settings))
  draws = jax.jit(jax.vmap(lambda s: sampling.select(jnp.asarray(logits), s, 0, jax.random.key(1), sampler)))(
      jnp.arange(64))
  assert np.asarray(draws).max() < 600


@pytest.fixture(scope='module')
def tiny(golden_dir):
  return q.load_pretrained(golden_dir / 'checkpoint')


@pytest.mark.slow
def test_generate_stays_under_vocab_limit(tiny, golden):
  """End to end: the golden model (1024 ids) limited to 512, at a flattening temperature."""
  model, params = tiny
  prompt = golden['long.input_ids'][0, :20]
  kw = dict(max_new_tokens=24, min_new_tokens=24, vocab_limit=512, stop_ids=(), temperature=1e6, top_p=1.0)
  free = generate(model, params, [prompt], max_new_tokens=24, min_new_tokens=24, stop_ids=(),
                  temperature=1e6, top_p=1.0, seed=3)[0, 20:]
  assert (free >= 512).any()  # without the limit the padding ids do come up
  streamed = np.concatenate(list(generate_stream(model, params, [prompt], seed=3, **kw)))
  assert len(streamed) == 24 and streamed.max() < 512
