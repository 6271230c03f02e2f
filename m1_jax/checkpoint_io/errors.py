"""The one error for checkpoints that cannot be read, written or restored as asked."""


class CheckpointError(ValueError):
    """A checkpoint (a source directory, a converted one or a training checkpoint) that cannot be read,
    written or restored as asked; the message names the directory, file or key."""
