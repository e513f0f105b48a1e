"""LoRA checkpoints: the factors in the layout of an earlier version (merged into the kernels before the
model ran) are refused by name, on resume and on export."""
import jax.numpy as jnp
import pytest

from train.checkpointing import CheckpointError, Checkpointer, restore_weights
from train.step import TrainState


def _state(lora):
  return TrainState(jnp.zeros((), jnp.int32), {'w': jnp.ones((2, 3))}, {}, lora)


def test_earlier_lora_layout_is_refused_by_name(tmp_path):
  old = {'c_attn': {'a': jnp.ones((2, 3, 4)), 'b': jnp.zeros((2, 4, 6))}}
  new = {'decoder': {'layers': {'attn': {'c_attn': {'a': jnp.ones((2, 3, 4)), 'b': jnp.zeros((2, 4, 6))}}}}}
  checkpointer = Checkpointer(tmp_path / 'checkpoints', save_every=1, keep=2)
  try:
    checkpointer.save(1, _state(old), {'epoch': 0})
    checkpointer._manager.wait_until_finished()
    with pytest.raises(CheckpointError, match='checkpoint step 1 in .* layout of an earlier version.*cannot be '
                                              'resumed'):
      checkpointer.restore(_state(new))
  finally:
    checkpointer.close()
  with pytest.raises(CheckpointError, match='layout of an earlier version'):
    restore_weights(tmp_path / 'checkpoints', {'w': None})


def test_factors_shard_by_their_declared_axes():
  """On a mesh the state's LoRA factors split as their logical axes say (FSDP: A's embed dim), the rank
  dim never; plan and trainer read the same specs (`sharding.state_specs`)."""
  from jax.sharding import PartitionSpec as P
  from qwenvl_jax import sharding as sh
  lora = {'decoder': {'layers': {'attn': {'c_attn': {'a': jnp.zeros((2, 8, 4)), 'b': jnp.zeros((2, 4, 3, 2, 4))}},
                                 'mlp': {'w1': {'a': jnp.zeros((2, 8, 4)), 'b': jnp.zeros((2, 4, 6))}}}}}
  specs = sh.state_specs(_state(lora), {'data': 1, 'fsdp': 2, 'tensor': 2}, 'fsdp_tp').lora['decoder']['layers']
  assert specs['attn']['c_attn'] == {'a': P(None, 'fsdp', None), 'b': P(None, None, None, 'tensor', None)}
  assert specs['mlp']['w1'] == {'a': P(None, 'fsdp', None), 'b': P(None, None, 'tensor')}


def test_an_older_step_in_the_earlier_layout_is_refused_when_the_newest_is_damaged(tmp_path):
  """The newest step unreadable, the step before it in the earlier layout: named as the earlier layout,
  not as one more damaged step."""
  old = {'c_attn': {'a': jnp.ones((2, 3, 4)), 'b': jnp.zeros((2, 4, 6))}}
  new = {'decoder': {'layers': {'attn': {'c_attn': {'a': jnp.ones((2, 3, 4)), 'b': jnp.zeros((2, 4, 6))}}}}}
  checkpointer = Checkpointer(tmp_path / 'checkpoints', save_every=1, keep=2)
  try:
    checkpointer.save(1, _state(old), {'epoch': 0})
    checkpointer.save(2, _state(new), {'epoch': 0})
    checkpointer._manager.wait_until_finished()
    for f in (tmp_path / 'checkpoints' / '2' / 'state').rglob('*'):
      if f.is_file():
        f.write_bytes(b'damaged')
    with pytest.raises(CheckpointError, match='checkpoint step 1 in .* layout of an earlier version'):
      checkpointer.restore(_state(new), say=lambda _: None)
  finally:
    checkpointer.close()
