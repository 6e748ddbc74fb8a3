"""Where zquant may write a directory of results, checked once before any slow work.

A save replaces whatever is at its target. So a target must be absent, an empty directory, or a
directory zquant wrote before (recognised by its manifest: ``zquant.json`` for a checkpoint,
``inspect.json`` for ``zquant inspect``); anything else (a directory of other files, a regular
file, a symbolic link) is replaced only when the caller forces it. Never, even forced: the model
being read or anything inside it or containing it, the filesystem root, the home directory, the
current directory or one of their ancestors, or a target named ``.`` / ``..``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable


class OutputError(ValueError):
    """A target directory that zquant refuses to replace; the message says why and what to do."""


def manifest(directory: Path, name: str) -> dict | None:
    """The JSON object in ``directory/name``, or None when it is missing or not a JSON object."""
    try:
        data = json.loads((directory / name).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _refuse_protected(real: Path, shown: str) -> None:
    home, cwd = Path.home().resolve(), Path.cwd().resolve()
    for place, what in ((home, "your home directory"), (cwd, "the current directory")):
        if place == real or place.is_relative_to(real):
            raise OutputError(f"{shown}: would replace {what}" + ("" if place == real else f" ({place})")
                              + "; name a new directory")


def _refuse_sources(real: Path, shown: str, sources: Iterable) -> None:
    for source in sources:
        src = Path(source).expanduser().resolve()
        if real == src or real.is_relative_to(src):
            raise OutputError(f"{shown}: is {'the model' if real == src else 'inside the model'} being read "
                              f"({src}); write somewhere else")
        if src.is_relative_to(real):
            raise OutputError(f"{shown}: contains the model being read ({src}); write somewhere else")


def _refuse_existing(path: Path, shown: str, ours: str, what: str, force_hint: str) -> None:
    if path.is_symlink():
        problem = "is a symbolic link"
    elif path.is_dir():
        if not any(path.iterdir()) or manifest(path, ours) is not None:
            return
        problem = f"is a directory that is not empty and not a {what} (no {ours})"
    elif path.exists():
        problem = "is a file, not a directory"
    else:
        return
    raise OutputError(f"{shown}: {problem}; choose another path, or {force_hint} to replace it")


def _check_parent(path: Path, shown: str) -> None:
    """Create the parent and prove it writable (the way the save will use it), now rather than
    after the slow work."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=path.parent))
    except OSError as e:
        raise OutputError(f"{shown}: cannot write in {path.parent} ({e.strerror or e})") from None


def check_target(path: str | os.PathLike, ours: str, what: str, sources: Iterable = (), force: bool = False,
                 force_hint: str = "pass --force") -> Path:
    """``path`` (user-expanded) once it may be replaced by a directory zquant writes (see the module
    docstring). ``ours`` is the manifest file name that marks a ``what`` zquant wrote there
    before; ``sources`` are the paths being read (a model directory or .gguf file); ``force``
    allows replacing other files and directories. Raises `OutputError` with one line."""
    shown = str(path)
    path = Path(shown).expanduser()
    if path.resolve() == Path(path.resolve().anchor):
        raise OutputError(f"{shown}: would replace the filesystem root; name a new directory")
    if path.name in ("", ".", ".."):
        raise OutputError(f"{shown!r}: name the directory to write (e.g. out/model-w8a8), not '.' or '..'")
    real = path.parent.resolve() / path.name          # the entry itself, not where a link points
    _refuse_protected(real, shown)
    _refuse_sources(real, shown, sources)
    if not force:
        _refuse_existing(path, shown, ours, what, force_hint)
    _check_parent(path, shown)
    return path
