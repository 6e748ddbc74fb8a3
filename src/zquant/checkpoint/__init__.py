"""zquant's own checkpoint format: ``model.safetensors`` + ``zquant.json`` (+ tokenizer files).

``zquant.json`` holds the quantization record (`zquant.record.QuantRecord`: scheme, adapter,
source, what each calibration algorithm recorded), the model class, the source model's config,
the library version and the SHA-256 of the weights file, so `load` rebuilds a runnable model
from the directory alone and refuses truncated, tampered or mismatched files with a clear error.
Nothing is ever unpickled. Writes go to a temporary sibling that is renamed into place, so a
crash never leaves a half-written checkpoint that loads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..convert import empty_embeddings, empty_layers, mark_quantized
from ..float_parts import float_part_names
from ..fsutil import atomic_directory, sha256
from ..plan import make_plan
from ..record import QuantRecord, record_of
from .errors import CheckpointError
from .floats import save_weights, upcast_float_parts
from .skeleton import assign_weights, build_skeleton

FORMAT = "zquant"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "zquant.json"
_HEADER_KEYS = ("format", "format_version", "zquant_version", "torch_version", "model_class", "source_config",
                "weights")

__all__ = ["CheckpointError", "FORMAT", "META", "WEIGHTS", "is_checkpoint", "load", "read_meta", "save"]


def _version() -> str:
    from .. import __version__
    return __version__


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META).is_file()


def save(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write a quantized model (and optionally its tokenizer) to ``directory``, atomically."""
    record = record_of(model)
    if record is None:
        raise ValueError("zquant.save expects a model quantized by zquant.quantize (it has no quantization record)")
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_weights(model, tmp / WEIGHTS, record.scheme.float_dtype)   # float parts in the record's dtype
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "zquant_version": _version(),
            "torch_version": torch.__version__.split("+")[0],
            "model_class": type(model).__name__,
            "source_config": model.config.to_dict(),
            **record.to_dict(),
            "weights": {"file": WEIGHTS, "sha256": sha256(tmp / WEIGHTS), "bytes": (tmp / WEIGHTS).stat().st_size},
        }
        with open(tmp / META, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
    return directory


def read_meta(directory: str | os.PathLike) -> dict:
    """The ``zquant.json`` of a checkpoint directory, its header checked (the record is checked by `read_record`)."""
    directory = Path(directory)
    meta_path = directory / META
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not meta_path.is_file():
        raise CheckpointError(f"{directory}: no {META}; not a zquant checkpoint (or an interrupted save)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a zquant checkpoint description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('format_version')!r}; "
                              f"this zquant reads version {FORMAT_VERSION}")
    for key in ("scheme", "adapter", "model_class", "source_config", "weights"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: missing field {key!r}")
    return meta


def read_record(directory: str | os.PathLike, meta: dict | None = None) -> QuantRecord:
    """The validated quantization record of a checkpoint directory."""
    meta = meta if meta is not None else read_meta(directory)
    try:
        return QuantRecord.from_dict({k: v for k, v in meta.items() if k not in _HEADER_KEYS})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{Path(directory) / META}: bad record: {e}") from None


def _weights_file(directory: Path, meta: dict) -> Path:
    info = meta["weights"]
    name = info.get("file", WEIGHTS) if isinstance(info, dict) else None
    if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
        raise CheckpointError(f"{directory / META}: weights.file must be a plain file name inside the checkpoint, "
                              f"got {name!r}")
    weights = directory / name
    if weights.is_symlink() and not weights.resolve().is_relative_to(directory.resolve()):
        raise CheckpointError(f"{weights}: a symbolic link that leaves the checkpoint directory")
    if not weights.is_file():
        raise CheckpointError(f"{directory}: weights file {weights.name} is missing")
    if weights.stat().st_size != meta["weights"].get("bytes"):
        raise CheckpointError(f"{weights}: {weights.stat().st_size} bytes, expected {meta['weights'].get('bytes')} "
                              "(truncated or replaced)")
    if sha256(weights) != meta["weights"].get("sha256"):
        raise CheckpointError(f"{weights}: SHA-256 does not match {META} (corrupted or modified)")
    return weights


def load(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a quantized model (eval mode, CPU, runtime not prepared) from a checkpoint directory alone."""
    directory = Path(directory)
    meta = read_meta(directory)
    weights = _weights_file(directory, meta)
    record = read_record(directory, meta)
    model = build_skeleton(meta)
    plan = make_plan(model, record.scheme)
    if plan.adapter.name != record.adapter:
        raise CheckpointError(f"{directory / META}: records adapter {record.adapter!r}, but this zquant maps the "
                              f"model to {plan.adapter.name!r}")
    empty_layers(model, plan)
    empty_embeddings(model, plan)
    floats = float_part_names(model)           # what the skeleton says is float, before the file's tensors
    assign_weights(model, weights)
    upcast_float_parts(model, floats, record.scheme.float_dtype, weights)
    mark_quantized(model, plan, record)
    return model.eval()
