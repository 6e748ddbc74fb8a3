"""The checkpoint error type (its own module so every checkpoint module can raise it)."""


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupted or inconsistent."""
