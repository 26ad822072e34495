"""Orbax checkpoints of the train state together with the Grain iterator's position.

One `Composite` per step (`state` + `data`), so a resumed run continues with
exactly the batches it would have seen. Saving happens only after the loss has
been checked finite, so the latest checkpoint is always a good one.

`restore_variables` reads back the model's parameters and statistics alone (an orbax
partial restore of the state): what prediction and embedding need, without building
the optimizer or its schedule.
"""

from __future__ import annotations

import pathlib

import grain
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items))

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The state at `step` (placed by `abstract_state`'s shardings); sets `data_iterator` in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def latest_step(directory) -> int | None:
  """The newest step checkpointed in `directory` (None when there is none)."""
  checkpointer = Checkpointer(directory)
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def restore_variables(directory, step: int, abstract_variables: dict) -> dict:
  """The ``params`` and ``batch_stats`` of the train state saved at `step`, placed by
  `abstract_variables`' shardings ({"params", "batch_stats"}, ShapeDtypeStructs); the
  optimizer state and the data iterator's position are not read."""
  manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  # An empty collection (a model without BatchNorm) has nothing to restore.
  item = {k: v for k, v in abstract_variables.items() if v}
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))["state"]
  finally:
    manager.close()
  return {k: restored.get(k, v) for k, v in abstract_variables.items()}
