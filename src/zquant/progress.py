"""Minimal progress reporting on stderr (no dependency): a line per step with elapsed time and ETA."""
from __future__ import annotations

import sys
import time


def fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``with Progress(total, "ppl") as p: ... p.update(1, loss=...)``.

    On a terminal the line is rewritten in place; otherwise at most one line every ``every``
    seconds (and the last one) is printed, so CI logs stay short. ``quiet`` silences it.
    """

    def __init__(self, total: int, desc: str, quiet: bool = False, every: float = 5.0, stream=None):
        self.total, self.desc, self.quiet, self.every = max(1, total), desc, quiet, every
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if not self.quiet and self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        if self.quiet:
            return
        now = time.perf_counter()
        final = self.done >= self.total
        if not (self._tty or final or now - self._last >= self.every):
            return
        self._last = now
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        line = f"{self.desc}: {self.done}/{self.total} [{fmt_seconds(elapsed)} elapsed, {fmt_seconds(eta)} left] {extra}".rstrip()
        self.stream.write(("\r" + line + "\x1b[K") if self._tty else line + "\n")
        self.stream.flush()

    def log(self, message: str) -> None:
        """A full line of its own (e.g. a per-layer summary)."""
        if self.quiet:
            return
        self.stream.write(("\r\x1b[K" if self._tty else "") + message + "\n")
        self.stream.flush()
