"""Orbax checkpoints of a run: the TrainState (params, optimizer state, LoRA, step) and the loader state.

Saves are asynchronous: `save` returns once the arrays are copied off the device and writes in the
background; `close` waits for the last one.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from train.step import TrainState


class Checkpointer:
  def __init__(self, directory: str | os.PathLike, save_every: int, keep: int):
    self.directory = pathlib.Path(directory).resolve()
    self.save_every = save_every
    # The interval is applied here: Orbax's own would also save the first step of every run.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, loader_state: Mapping[str, Any], force: bool = False) -> bool:
    """Saves when `step` is a multiple of save_every (or `force`) and not saved yet; returns whether it
    did."""
    if (step % self.save_every and not force) or step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(dict(loader_state))), force=True)

  def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """(state, loader state) of `step` (default: the latest), shaped and placed like `like`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint to resume from in {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), loader=ocp.args.JsonRestore()))
    return restored.state, dict(restored.loader)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
