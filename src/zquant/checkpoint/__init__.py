"""zquant's own checkpoint format: ``model.safetensors`` + ``zquant.json`` (+ tokenizer files).

``zquant.json`` holds the quantization record (`zquant.record.QuantRecord`: scheme, adapter,
source, what each calibration algorithm recorded), the model class, the source model's config,
the library version and the SHA-256 of the weights file, so `load` rebuilds a runnable model
from the directory alone and refuses truncated, tampered or mismatched files with a clear error.
Nothing is ever unpickled. Writes go to a temporary sibling that is renamed into place, so a
crash never leaves a half-written checkpoint that loads.

`load` trusts nothing it reads: ``zquant.json``'s field types and checksum (`integrity`), the
weights file's size and SHA-256, then the safetensors header against the plan (`validate`: tensor
names, shapes and dtypes, compared on a meta-device skeleton before any tensor is allocated),
then the scales' values. Format version 2 added the checksum and the dtype checks; a version-1
checkpoint is refused with a "re-quantize" line rather than loaded with a warning: its description
cannot be verified, re-quantizing takes seconds (minutes with LKD), and no version-1 checkpoint
was ever published.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import outdir
from ..config import ConfigError
from ..convert import empty_embeddings, empty_layers, mark_quantized
from ..float_parts import DTYPES, float_part_names
from ..fsutil import atomic_directory, sha256
from ..plan import make_plan
from ..record import QuantRecord, record_of
from .errors import CheckpointError
from .floats import save_weights, upcast_float_parts
from .integrity import CHECKSUM, check_fields, check_tokenizer_files, stamped, verify_checksum
from .skeleton import assign_weights, build_skeleton, materialize_buffers, model_class, recorded_config
from .validate import check_block_count, check_buffer_budget, check_scales, check_tensors, read_header

FORMAT = "zquant"
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
META = "zquant.json"
_HEADER_KEYS = ("format", "format_version", "zquant_version", "torch_version", "model_class", "source_config",
                "weights", CHECKSUM)

__all__ = ["CheckpointError", "FORMAT", "META", "WEIGHTS", "check_target", "check_tokenizer_files", "is_checkpoint",
           "load", "read_meta", "save"]


def _version() -> str:
    from .. import __version__
    return __version__


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META).is_file()


def check_target(directory: str | os.PathLike, sources=(), force: bool = False,
                 force_hint: str = "pass force=True") -> Path:
    """``directory`` once a checkpoint may be written there (`zquant.outdir.check_target`): absent,
    empty or a checkpoint already, unless ``force``; never the model read (``sources``) or inside it."""
    return outdir.check_target(directory, META, "zquant checkpoint", sources, force, force_hint)


def _source_paths(record: QuantRecord) -> list[Path]:
    """The recorded MODEL as a path (a directory or .gguf file, a built-in name's package file)."""
    from ..sources import resolve
    try:
        return [resolve(record.source)] if record.source else []
    except ValueError:              # the source is gone or was never a path: nothing to protect
        return []


def save(model: nn.Module, directory: str | os.PathLike, tokenizer=None, force: bool = False) -> Path:
    """Write a quantized model (and optionally its tokenizer) to ``directory``, atomically.

    ``directory`` must be absent, empty or a zquant checkpoint (which is replaced); ``force=True``
    replaces anything else there. Never the recorded source model or a path inside it."""
    record = record_of(model)
    if record is None:
        raise ValueError("zquant.save expects a model quantized by zquant.quantize (it has no quantization record)")
    if tokenizer is None:
        warnings.warn(f"zquant.save: no tokenizer given; evaluating or generating from {directory} will need one "
                      "(pass tokenizer=...)", UserWarning, stacklevel=2)
    directory = check_target(directory, _source_paths(record), force)
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
            json.dump(stamped(meta), f, indent=2, sort_keys=True)
    return directory


def read_meta(directory: str | os.PathLike) -> dict:
    """The ``zquant.json`` of a checkpoint directory: its header fields' types, its record and its
    checksum checked (in that order, so a malformed field is named before the checksum is)."""
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
    if meta.get("format_version") == 1:
        raise CheckpointError(f"{meta_path}: format version 1, written before checkpoints were checksummed and "
                              "their tensors checked against the scheme; re-quantize the source model")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('format_version')!r}; "
                              f"this zquant reads version {FORMAT_VERSION}")
    for key in ("scheme", "adapter", "model_class", "source_config", "weights"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: missing field {key!r}")
    check_fields(meta, meta_path)
    _record(meta, meta_path)
    verify_checksum(meta, meta_path)
    return meta


def _record(meta: dict, meta_path: Path) -> QuantRecord:
    try:
        return QuantRecord.from_dict({k: v for k, v in meta.items() if k not in _HEADER_KEYS})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: bad record: {e}") from None


def read_record(directory: str | os.PathLike, meta: dict | None = None) -> QuantRecord:
    """The validated quantization record of a checkpoint directory."""
    meta = meta if meta is not None else read_meta(directory)
    return _record(meta, Path(directory) / META)


def _weights_file(directory: Path, meta: dict) -> Path:
    """The weights file ``zquant.json`` names (a plain name, checked by `read_meta`), its size and SHA-256 checked."""
    info = meta["weights"]
    weights = directory / info["file"]
    if weights.is_symlink() and not weights.resolve().is_relative_to(directory.resolve()):
        raise CheckpointError(f"{weights}: a symbolic link that leaves the checkpoint directory")
    if not weights.is_file():
        raise CheckpointError(f"{directory}: weights file {weights.name} is missing")
    if weights.stat().st_size != info["bytes"]:
        raise CheckpointError(f"{weights}: {weights.stat().st_size} bytes, expected {info['bytes']} "
                              "(truncated or replaced)")
    if sha256(weights) != info["sha256"]:
        raise CheckpointError(f"{weights}: SHA-256 does not match {META} (corrupted or modified)")
    return weights


def load(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a quantized model (eval mode, CPU, runtime not prepared) from a checkpoint directory alone.

    Nothing the record claims is allocated before it is checked: the skeleton is built on the meta
    device after the recorded layer count is compared with the file's blocks, and compared tensor
    by tensor with the safetensors header before the file's tensors are read."""
    directory = Path(directory)
    meta = read_meta(directory)
    weights = _weights_file(directory, meta)
    record = read_record(directory, meta)
    header = read_header(weights)
    config = recorded_config(meta)
    check_block_count(config, header, weights)
    model = build_skeleton(model_class(meta, config), config, budget=16 * len(header) + 4096)
    plan = make_plan(model, record.scheme)
    if plan.adapter.name != record.adapter:
        raise CheckpointError(f"{directory / META}: records adapter {record.adapter!r}, but this zquant maps the "
                              f"model to {plan.adapter.name!r}")
    with torch.device("meta"):
        empty_layers(model, plan)
        empty_embeddings(model, plan)
    floats = float_part_names(model)           # what the skeleton says is float, before the file's tensors
    check_tensors(model, header, weights, float_storage=(DTYPES[record.scheme.float_dtype],))
    check_buffer_budget(model, weights)
    assign_weights(model, weights)
    upcast_float_parts(model, floats, record.scheme.float_dtype, weights)
    materialize_buffers(model)
    check_scales(model, weights)
    mark_quantized(model, plan, record)
    return model.eval()
