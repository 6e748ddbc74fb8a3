"""What binds a checkpoint's description to itself and its directory: field types, the checksum of
``zquant.json``, and the tokenizer files.

The checksum (``meta_sha256``) is the SHA-256 of the canonical JSON (sorted keys, no whitespace)
of every other field of ``zquant.json``. Every field is covered, not a chosen subset: the scheme,
adapter, model class and source config decide the numerics, the weights entry binds the tensors
(their SHA-256) to them, and the steps, source and versions are the provenance that reports and
``--reference`` checks rely on; a field added later is covered without anyone remembering to add
it. It is an integrity check, not a signature: it catches hand edits and corruption; a forged
description that recomputes it must still pass every structural check of `zquant.checkpoint.load`
(tensor names, shapes, dtypes, finite scales).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from .errors import CheckpointError

CHECKSUM = "meta_sha256"
MAX_JSON_BYTES = 256 << 20     # a tokenizer file larger than this is not a tokenizer file
# Files a saved tokenizer always includes (transformers writes tokenizer_config.json; fast ones tokenizer.json).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def meta_checksum(meta: Mapping) -> str:
    """SHA-256 (hex) of the canonical JSON of ``meta`` without its checksum field."""
    body = {k: v for k, v in meta.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stamped(meta: Mapping) -> dict:
    """``meta`` as plain JSON data (what reading it back gives) with its checksum added."""
    plain = json.loads(json.dumps(meta, default=str))
    return {**plain, CHECKSUM: meta_checksum(plain)}


def verify_checksum(meta: Mapping, path: Path) -> None:
    if meta.get(CHECKSUM) != meta_checksum(meta):
        raise CheckpointError(f"{path}: its checksum {CHECKSUM} does not match its contents (edited or corrupted); "
                              "re-quantize the source model rather than editing a checkpoint")


def check_fields(meta: Mapping, path: Path) -> None:
    """The JSON types of the header fields (the record's are checked by `QuantRecord.from_dict`)."""
    kinds = {"model_class": str, "source_config": dict, "weights": dict}
    for key, kind in kinds.items():
        if not isinstance(meta[key], kind):
            raise CheckpointError(f"{path}: field {key!r} must be a JSON {'object' if kind is dict else 'string'}, "
                                  f"got {type(meta[key]).__name__}")
    info = meta["weights"]
    name = info.get("file")
    if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
        raise CheckpointError(f"{path}: weights.file must be a plain file name inside the checkpoint, got {name!r}")
    if not isinstance(info.get("sha256"), str) or type(info.get("bytes")) is not int:
        raise CheckpointError(f"{path}: weights must record 'sha256' (a string) and 'bytes' (an integer)")


def check_tokenizer_files(directory: Path) -> None:
    """Refuse a checkpoint whose files could mislead (or hang) the tokenizer loader: a symbolic link
    that leaves the directory, a ``.json`` file that is not a regular JSON file (a FIFO would block
    the read), or no tokenizer at all (saved without one). Run before anything reads them."""
    root = directory.resolve()
    for f in sorted(directory.iterdir()):
        if f.is_symlink() and not f.resolve().is_relative_to(root):
            raise CheckpointError(f"{f}: a symbolic link that leaves the checkpoint directory")
        if f.suffix != ".json":
            continue
        try:
            if not f.is_file() or f.stat().st_size > MAX_JSON_BYTES:
                raise ValueError("not a regular file of a plausible size")
            json.loads(f.read_bytes())
        except (ValueError, OSError):
            raise CheckpointError(f"{f}: not a JSON file{' (a symbolic link)' if f.is_symlink() else ''}") from None
    if not any((directory / n).is_file() for n in TOKENIZER_FILES):
        raise CheckpointError(f"{directory} was saved without a tokenizer, which evaluation and generation need: "
                              "save it with zquant.save(model, dir, tokenizer=...), or copy the source model's "
                              "tokenizer files into it")
