"""The train state of a run, born where it lives: shapes from `eval_shape`, then created on its shardings.

Nothing is built on one device and moved afterwards. `Layout` holds the state's shardings on the mesh;
`create` runs the random init (or the cast of loaded weights), the LoRA init and `optimizer.init` under
one jit with those `out_shardings`, so each device computes only its own slices. A resume restores into
`Layout.abstract` (ShapeDtypeStructs carrying the shardings) and initialises nothing. The train step is
jitted here too, with the same shardings and the state donated, so `qwenvl-train` and
`qwenvl-jax plan --compile` run one function.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from qwenvl_jax import gptq, sharding
from qwenvl_jax.config import QwenVLConfig
from qwenvl_jax.gptq_checkpoint import packed_config
from qwenvl_jax.model import QwenVL, init_params, param_shapes
from qwenvl_jax.quant import is_quantized, quantize, quantized_config
from train.config import TrainConfig
from train.frozen import MASTER_DTYPE, hold
from train.lora import init_lora
from train.optim import make_optimizer
from train.run_dir import is_run_dir
from train.step import TrainState, init_state


def _lora(cfg: TrainConfig, params: Any) -> Any:
  return init_lora(params, cfg.lora_targets, cfg.lora_rank, jax.random.key(cfg.seed + 1)) if cfg.lora else None


def int4_source(cfg: TrainConfig) -> gptq.GptqConfig | None:
  """The GPTQ config of cfg.init_from when it is a released Int4 checkpoint, else None."""
  if not cfg.init_from or is_run_dir(cfg.init_from):
    return None
  return gptq.read_config(cfg.init_from)


def base_config(cfg: TrainConfig, config: QwenVLConfig) -> QwenVLConfig:
  """The config of the params the state holds: `config` (float), or under cfg.weights (Q-LoRA) the
  frozen quantized base's: an Int4 init_from kept packed with weights=int4 (its groups, lm_head float),
  else the float weights quantized (as they are read, `quant.load`; params given float, when the state
  is made)."""
  if cfg.weights == 'float':
    return config
  source = int4_source(cfg)
  if source is not None and cfg.weights == 'int4':
    return packed_config(config, source)
  return quantized_config(config, cfg.weights)


def run_optimizer(cfg: TrainConfig, model: QwenVL) -> optax.GradientTransformation:
  """The run's optimizer, built from the shapes of params (the base as the state holds it) alone
  (nothing allocated)."""
  return make_optimizer(cfg, param_shapes(QwenVL(base_config(cfg, model.config))))


def from_params(cfg: TrainConfig, optimizer: optax.GradientTransformation, base: QwenVLConfig | None = None
                ) -> Callable[[Any], TrainState]:
  """params (any float dtype) -> the initial TrainState: float32 master weights of the trained leaves,
  frozen ones the model reads in the compute dtype held in it (train/frozen.py), LoRA, optimizer state.
  `base` (`base_config`) quantized: float params are quantized to it, a quantized tree kept as it is."""
  def build(params):
    # a quantized base's int8 values stay as they are (Q-LoRA: frozen, dequantized in the loss); its
    # scales, like the float leaves, in float32 (exact for the Int4 checkpoint's float16 ones)
    params = jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jnp.integer) else jnp.asarray(x, MASTER_DTYPE),
                          params)
    if base is not None and base.weights != 'float' and not is_quantized(params):
      params = quantize(params, base.replace(weights='float'), base.weights)
    params = hold(cfg, params)
    lora = _lora(cfg, params)
    return init_state(cfg, params, optimizer, lora)
  return build


def from_random(cfg: TrainConfig, model: QwenVL, optimizer: optax.GradientTransformation
                ) -> Callable[[], TrainState]:
  """() -> the initial TrainState of a random init with cfg.seed."""
  build = from_params(cfg, optimizer, base_config(cfg, model.config))
  return lambda: build(init_params(model, jax.random.key(cfg.seed)))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the state lives: one device (mesh None) or its shardings on a mesh under `rules`."""
  abstract: TrainState  # ShapeDtypeStructs, carrying shardings on a mesh
  mesh: jax.sharding.Mesh | None = None
  rules: Any = None
  shardings: Any = None  # TrainState of NamedSharding, None on one device

  def jit(self, fn: Callable) -> Callable:
    """jit for `fn(state, batch) -> (state, metrics)`: state donated, kept on its shardings."""
    if self.mesh is None:
      return jax.jit(fn, donate_argnums=0)
    return sharding.sharded_jit(fn, self.mesh, self.rules, out_shardings=(self.shardings, None),
                                donate_argnums=0)

  def place_batch(self, batch: dict) -> dict:
    """This process's rows of a batch -> global arrays split along the batch axes."""
    if self.mesh is None:
      return batch
    return {k: jax.make_array_from_process_local_data(
        sharding.batch_sharding(self.mesh, self.rules, (v.shape[0] * jax.process_count(),) + v.shape[1:]), v)
        for k, v in batch.items()}

  def param_shardings(self) -> Any:
    """Shardings of the params alone (targets for a checkpoint restore); None on one device."""
    return None if self.shardings is None else self.shardings.params


def make_layout(cfg: TrainConfig, model: QwenVL, optimizer: optax.GradientTransformation,
                mesh_spec: str = '', rules: str = '') -> Layout:
  """The state's shapes (`jax.eval_shape` of the init: nothing allocated) and, with a mesh, shardings."""
  abstract = jax.eval_shape(from_random(cfg, model, optimizer))
  if not mesh_spec:
    return Layout(abstract)
  mesh = sharding.make_mesh(mesh_spec)
  rules = rules or sharding.default_rules(dict(mesh.shape))
  shardings = sharding.state_shardings(mesh, abstract, rules)
  return Layout(sharding.with_shardings(abstract, shardings), mesh, rules, shardings)


def create(layout: Layout, cfg: TrainConfig, model: QwenVL, optimizer: optax.GradientTransformation,
           params: Any = None) -> TrainState:
  """The initial state, made on its shardings: from `params` (already placed on
  `layout.param_shardings()`, e.g. restored from a checkpoint; donated) or a random init."""
  kwargs = {} if layout.shardings is None else {'out_shardings': layout.shardings}
  if params is None:
    return jax.jit(from_random(cfg, model, optimizer), **kwargs)()
  return jax.jit(from_params(cfg, optimizer, base_config(cfg, model.config)), donate_argnums=0, **kwargs)(params)
