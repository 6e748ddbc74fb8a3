"""The Python entry points: `load`, `load_tokenizer`, `quantize`, `save`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from torch import Tensor, nn

from . import io, sources
from .config import ConfigError, LKDConfig, QuantConfig, get_scheme
from .data import DEFAULT_CALIB_TEXT, sample_batches
from .fusion import auto_fuse
from .models import get_adapter
from .surgery import plan, quantize_model


def load(model: str | os.PathLike) -> nn.Module:
    """A ready-to-run transformers model (eval mode, CPU): floating point for a MODEL argument
    (directory, .gguf file or built-in name), quantized for a directory written by `save`."""
    if Path(str(model)).is_dir() and io.is_checkpoint(model):
        return io.load(model)
    return sources.load_float(model)


def load_tokenizer(model: str | os.PathLike):
    """The tokenizer that goes with `load(model)`."""
    return sources.load_tokenizer(model)


def quantize(model: nn.Module, scheme: str | QuantConfig, calibration: Iterable[dict[str, Tensor]] | None = None,
             tokenizer=None, calib_text: str = DEFAULT_CALIB_TEXT, lkd: LKDConfig | bool | None = None,
             lkd_resume: str | os.PathLike | None = None, quiet: bool = False) -> nn.Module:
    """Quantize ``model`` in place with a preset name or a `QuantConfig`, and return it.

    Static activation schemes need calibration batches: pass ``calibration`` (model kwargs
    dicts), or a ``tokenizer`` and zquant samples ``calib_text`` (default: a packaged text that is
    not the default evaluation text).

    ``lkd=True`` (default settings) or an `LKDConfig` distills every block with LKD (see
    `zquant.lkd`); text data needs the ``tokenizer``. ``lkd_resume`` is a directory where finished
    blocks are kept so an interrupted run can resume; ``quiet`` silences LKD's progress lines.
    """
    config = get_scheme(scheme)
    if getattr(model, "zquant_info", None):
        raise ValueError("this model is already quantized; load the floating-point model to quantize it again")
    adapter = get_adapter(model)
    needs_calibration = any(t.spec.act.mode == "static" for t in plan(model, config, adapter))
    calib_source = "user batches"
    if needs_calibration and calibration is None:
        if tokenizer is None:
            raise ValueError(f"scheme {config.name!r} uses static activation scales: pass calibration batches "
                             "or a tokenizer")
        seq_len = 128 if adapter.kind == "encoder" else 256
        calibration = sample_batches(tokenizer, calib_text, count=16, seq_len=seq_len)
        calib_source = calib_text
    if lkd is not None and not isinstance(lkd, (bool, LKDConfig)):
        raise ConfigError(f"lkd must be True, False or an LKDConfig, got {type(lkd).__name__}")
    if lkd is True:
        lkd = LKDConfig()
    if lkd:
        from .lkd import distill
        distill(model, config, lkd, tokenizer, calibration if needs_calibration else None, adapter,
                resume_dir=lkd_resume, quiet=quiet)
    else:
        quantize_model(model, config, calibration if needs_calibration else None, adapter)
    if needs_calibration:
        model.zquant_info["calibration"] = {"text": calib_source}
    auto_fuse(model)   # runtime-only module swaps for the CPU fast path; the state dict is unchanged
    return model


def save(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write a quantized model (safetensors + zquant.json, and the tokenizer if given) atomically."""
    return io.save(model, directory, tokenizer)
