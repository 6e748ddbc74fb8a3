"""Save and load quantized models: ``model.safetensors`` + ``zquant.json`` (+ tokenizer files).

``zquant.json`` records the scheme, the adapter, the model class, the source model's config, the
library version and the SHA-256 of the weights file, so `load` rebuilds a runnable model from the
directory alone and refuses truncated, tampered or mismatched files with a clear error. Nothing is
ever unpickled. Writes go to a temporary sibling that is renamed into place, so a crash never
leaves a half-written checkpoint that loads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .config import ConfigError, QuantConfig
from .models import adapter_by_name
from .modules import QuantLinear
from .surgery import plan, set_submodule

FORMAT = "zquant"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "zquant.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupted or inconsistent."""


def _version() -> str:
    from . import __version__
    return __version__


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "d")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META).is_file()


def save(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write a quantized model (and optionally its tokenizer) to ``directory``, atomically."""
    from safetensors.torch import save_model
    info = getattr(model, "zquant_info", None)
    if not info:
        raise ValueError("zquant.save expects a model quantized by zquant.quantize (it has no zquant_info)")
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "zquant_version": _version(),
            "torch_version": torch.__version__.split("+")[0],
            "model_class": type(model).__name__,
            "source_config": model.config.to_dict(),
            **info,
            "weights": {"file": WEIGHTS, "sha256": sha256(tmp / WEIGHTS), "bytes": (tmp / WEIGHTS).stat().st_size},
        }
        with open(tmp / META, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
    return directory


def read_meta(directory: str | os.PathLike) -> dict:
    """The validated ``zquant.json`` of a checkpoint directory."""
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


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every `nn.Parameter` on the meta device (no memory, no initialization) while buffers
    stay real: rotary frequencies and position ids are computed in ``__init__`` and never saved."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _skeleton(meta: dict) -> nn.Module:
    """A model of the recorded class and config whose parameters are on the meta device (they are
    assigned from the checkpoint next, so the float model is never materialized)."""
    import transformers
    from transformers import AutoConfig
    cfg = dict(meta["source_config"])
    model_type = cfg.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint records model type {model_type!r}, which this transformers "
                              f"({transformers.__version__}) cannot build: {e}") from None
    cls = getattr(transformers, meta["model_class"], None)
    if cls is None:
        raise CheckpointError(f"checkpoint records model class {meta['model_class']!r}, unknown to transformers "
                              f"{transformers.__version__}")
    with warnings.catch_warnings(), _parameters_on_meta():
        warnings.simplefilter("ignore")
        return cls._from_config(config, dtype=torch.float32)


def _assign_weights(model: nn.Module, weights: Path) -> None:
    """Assign the checkpoint's tensors to ``model`` (its float parameters are still on meta),
    re-tie shared weights, and refuse a file that leaves any tensor unset or has extra ones."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(weights))
    except SafetensorError as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({e})") from None
    # Tied weights (an LM head sharing the embeddings) are one tensor in the file, under one of
    # their names: give every name of a shared parameter that tensor, so they stay one tensor.
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for group in names.values():
        present = [n for n in group if n in state]
        for n in group:
            if present and n not in state:
                state[n] = state[present[0]]
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()[:300]
        raise CheckpointError(f"{weights}: does not match the recorded model and scheme: {first}") from None
    for group in names.values():            # assign made one Parameter per name: make them one again
        shared = model.get_parameter(group[0])
        for n in group[1:]:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)
    unset = sorted({*result.missing_keys,
                    *(n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta)})
    if result.unexpected_keys or unset:
        parts = ([f"unexpected tensors {result.unexpected_keys[:5]}"] if result.unexpected_keys else []) + \
                ([f"missing tensors {unset[:5]}"] if unset else [])
        raise CheckpointError(f"{weights}: does not match the recorded model and scheme: {'; '.join(parts)}")


def load(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a runnable quantized model (eval mode, CPU) from a checkpoint directory alone."""
    directory = Path(directory)
    meta = read_meta(directory)
    weights = directory / meta["weights"].get("file", WEIGHTS)
    if not weights.is_file():
        raise CheckpointError(f"{directory}: weights file {weights.name} is missing")
    if weights.stat().st_size != meta["weights"].get("bytes"):
        raise CheckpointError(f"{weights}: {weights.stat().st_size} bytes, expected {meta['weights'].get('bytes')} "
                              "(truncated or replaced)")
    if sha256(weights) != meta["weights"].get("sha256"):
        raise CheckpointError(f"{weights}: SHA-256 does not match {META} (corrupted or modified)")
    try:
        config = QuantConfig.from_dict(meta["scheme"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory / META}: bad scheme: {e}") from None

    model = _skeleton(meta)
    adapter = adapter_by_name(meta["adapter"], model)
    for t in plan(model, config, adapter):
        if t.spec.weight is None:
            continue
        src = model.get_submodule(t.name)
        n, k = (src.weight.shape[1], src.weight.shape[0]) if type(src).__name__ == "Conv1D" else src.weight.shape
        set_submodule(model, t.name, QuantLinear(k, n, t.spec, bias=src.bias is not None))
    _assign_weights(model, weights)
    model.zquant_info = {k: meta[k] for k in meta if k not in
                         ("format", "format_version", "source_config", "model_class", "weights", "torch_version")}
    from .fusion import auto_fuse
    auto_fuse(model.eval())   # runtime-only module swaps for the CPU fast path
    return model
