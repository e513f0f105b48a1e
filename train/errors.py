"""The training error every layer of train/ raises: below both the run directory and the checkpoints."""


class TrainError(RuntimeError):
  """A run that cannot start or go on, for a reason the user can fix; the message says how."""
