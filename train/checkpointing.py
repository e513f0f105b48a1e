"""Orbax checkpoints of a run: the TrainState (params, optimizer state, LoRA, step) and the loader state.

Saves are asynchronous: `save` returns once the arrays are copied off the device and writes in the
background; `close` waits for the last one. A step that cannot be read back (a disk that filled up, a
copy cut short) is reported by number and the previous readable step is used; the damaged step stays on
disk until the resumed run saves that step again.
"""
from __future__ import annotations

import os
import pathlib
import sys
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.earlier_int4 import earlier_int4, packed, read_as_stored
from train.errors import TrainError
from train.lora import check_layout
from train.step import TrainState


class CheckpointError(TrainError):
  """No checkpoint of the run can be read back; the message names every step tried and why."""


def _say(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _reason(e: BaseException) -> str:
  """The first line of an error (TensorStore's run to a hundred lines), at most 160 characters."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  text = f'{type(e).__name__}: {lines[0] if lines else ""}'
  return text if len(text) <= 160 else text[:157] + '...'


class Checkpointer:
  def __init__(self, directory: str | os.PathLike, save_every: int, keep: int):
    self.directory = pathlib.Path(directory).resolve()
    self.save_every = save_every
    self.damaged: set[int] = set()  # steps found unreadable; replaced when the run saves them again
    # The interval is applied here: Orbax's own would also save the first step of every run.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, loader_state: Mapping[str, Any], force: bool = False) -> bool:
    """Saves when `step` is a multiple of save_every (or `force`) and not saved yet; returns whether it
    did."""
    if step % self.save_every and not force:
      return False
    if step in self.damaged:
      self._manager.wait_until_finished()
      self._manager.delete(step)
      self.damaged.discard(step)
    elif step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(dict(loader_state))), force=True)

  def restore(self, like: TrainState, say: Callable[[str], None] = _say
              ) -> tuple[TrainState, dict[str, Any]]:
    """(state, loader state) of the latest readable step, shaped and placed like `like`.

    A step that fails to read is named through `say` and the one before it is tried; CheckpointError
    when none can be read.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'no checkpoint to resume from in {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    failures = []
    for step in steps:
      saved = _metadata(self.directory, step)
      _check_lora_layout(self.directory, step, saved)  # each step tried: an older one may be the old layout
      upgrade = earlier_int4(saved, abstract) if saved is not None else {}
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(read_as_stored(abstract, upgrade)), loader=ocp.args.JsonRestore()))
      except Exception as e:  # TensorStore, JSON and file errors alike: this step cannot be read
        failures.append(f'step {step}: {_reason(e)}')
        self.damaged.add(step)
        say(f'checkpoint step {step} in {self.directory} is damaged and cannot be read ({_reason(e)}); '
            'trying the previous step')
        continue
      if failures:
        say(f'resuming from step {step}, the latest readable checkpoint; the damaged step(s) '
            f'{sorted(self.damaged)} stay on disk until this run saves them again')
      if upgrade:
        say(f'checkpoint step {step}: its int4 values, one per byte (an earlier version), are packed two per '
            'byte as the run now holds them')
      return packed(restored.state, abstract, upgrade), dict(restored.loader)
    raise CheckpointError(f'no readable checkpoint in {self.directory}: ' + '; '.join(failures)
                          + '. Start again in a new out_dir (or with init_from=<a good checkpoint>)')

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_weights(directory: str | os.PathLike, shardings: Any, say: Callable[[str], None] = _say
                    ) -> tuple[int, dict, dict | None]:
  """(step, params, LoRA tree or None) of the latest readable step in a run's checkpoint directory; the
  optimizer state is not read. The params come in float32 on `shardings` (a tree of them matching the
  params), each process reading only the slices its devices hold; the LoRA factors (small) whole on
  each of the same devices."""
  directory = pathlib.Path(directory).resolve()
  manager = ocp.CheckpointManager(directory)
  try:
    steps = sorted(manager.all_steps(), reverse=True)
  finally:
    manager.close()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  failures = []
  checkpointer = ocp.PyTreeCheckpointer()
  for step in steps:
    path = directory / str(step) / 'state'
    try:
      tree = checkpointer.metadata(path).item_metadata.tree
      _check_lora_layout(directory, step, tree)
      wanted = {'params': _targets(tree['params'], shardings, 'params')}
      if tree.get('lora'):
        whole = _replicated(jax.tree.leaves(shardings)[0])
        wanted['lora'] = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=whole),
                                      tree['lora'])
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
          partial_restore=True))
    except CheckpointError:
      raise
    except Exception as e:  # as in Checkpointer.restore
      failures.append(f'step {step}: {_reason(e)}')
      say(f'checkpoint step {step} in {directory} is damaged and cannot be read ({_reason(e)}); '
          'trying the previous step')
      continue
    return step, restored['params'], restored.get('lora')
  raise CheckpointError(f'no readable checkpoint in {directory}: ' + '; '.join(failures))


def _metadata(directory: pathlib.Path, step: int) -> Any:
  """The tree of a step's saved state (shapes and dtypes), or None when it cannot be read (damaged: the
  restore reports it)."""
  try:
    return ocp.PyTreeCheckpointer().metadata(directory / str(step) / 'state').item_metadata.tree
  except Exception:
    return None


def _check_lora_layout(directory: pathlib.Path, step: int, tree: Any) -> None:
  """CheckpointError when the step's LoRA factors are in an earlier version's layout (`lora.check_layout`);
  a step whose metadata cannot be read (None) is left to the restore, which names it."""
  lora = tree.get('lora') if isinstance(tree, Mapping) else None
  try:
    check_layout(lora, f'checkpoint step {step} in {directory}')
  except ValueError as e:
    raise CheckpointError(str(e)) from None


def _targets(metadata: Any, shardings: Any, what: str) -> Any:
  """Restore targets: the saved shapes, float32, on `shardings`; a saved tree that differs from the
  run's is named, leaf by leaf, rather than failing inside Orbax."""
  saved = {jax.tree_util.keystr(k): m for k, m in jax.tree_util.tree_flatten_with_path(metadata)[0]}
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  wanted = {jax.tree_util.keystr(k) for k, _ in flat}
  if saved.keys() != wanted:
    raise ValueError(f'saved {what} differ from the model: missing {sorted(wanted - saved.keys())}, '
                     f'unexpected {sorted(saved.keys() - wanted)}')
  return jax.tree_util.tree_unflatten(treedef, [
      jax.ShapeDtypeStruct(saved[jax.tree_util.keystr(k)].shape, np.float32, sharding=s) for k, s in flat])


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return sharding
