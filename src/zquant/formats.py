"""Checkpoint and export formats, by name: one registry that every writer plugs into.

A format is a function ``write(model, path, tokenizer, force) -> Path`` for a quantized model
(which carries its plan and record); it refuses to replace what it did not write unless ``force``
(`zquant.outdir.check_target`). zquant's own format is ``zquant`` (`zquant.checkpoint`); export
formats for other engines register here too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from torch import nn

Writer = Callable[[nn.Module, Path, object, bool], Path]
FORMATS: dict[str, Writer] = {}


def register_format(name: str, writer: Writer) -> Writer:
    FORMATS[name] = writer
    return writer


def write(model: nn.Module, path: str | os.PathLike, format: str = "zquant", tokenizer=None,
          force: bool = False) -> Path:
    """Write a quantized model in ``format`` (``force``: replace whatever is at ``path``)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[format](model, Path(path), tokenizer, force)


def _zquant(model: nn.Module, path: Path, tokenizer, force: bool) -> Path:
    from . import checkpoint
    return checkpoint.save(model, path, tokenizer, force)


register_format("zquant", _zquant)
