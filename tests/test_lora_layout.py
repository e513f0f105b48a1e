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
