"""Errors raised while reading or writing checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint file or index is malformed, truncated or inconsistent; the message names the file and tensor."""
