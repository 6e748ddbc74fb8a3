"""The checkpoint error type (its own module so every checkpoint module can raise it)."""


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupted or inconsistent."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """The gist of a library's exception as one line: its cause's message if it has one (transformers'
    config validators wrap the ValueError that says what is wrong), else its last non-empty line."""
    lines = [line.strip() for line in str(e.__cause__ or e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:limit]
