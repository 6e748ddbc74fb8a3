"""The Python entry points: `load`, `load_tokenizer`, `quantize`, `save`.

One path through the library: source -> plan (`zquant.plan`, computed once) -> the block
pipeline of calibration algorithms (`zquant.pipeline`, `zquant.algorithms`) -> conversion to
integer modules (`zquant.convert`) -> runtime preparation chosen by the kernel dispatch point
(`zquant.fusion.prepare_runtime`) -> checkpoint or export (`zquant.formats`).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from . import checkpoint, formats, sources
from .algorithms import LKD, StaticRanges
from .config import ConfigError, LKDConfig, QuantConfig, get_scheme
from .convert import check_finite, convert_embeddings, mark_quantized
from .data import DEFAULT_CALIB_TEXT, sample_batches
from .float_parts import round_float_parts
from .fusion import prepare_runtime
from .pipeline import Algorithm, Pipeline
from .plan import Plan, make_plan
from .record import QuantRecord, refuse_quantized


def load(model: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """A ready-to-run transformers model (eval mode) on ``device`` (default CPU): floating point for a
    MODEL argument (directory, .gguf file or built-in name), quantized for a directory written by
    `save`, whose runtime is prepared for that device."""
    if Path(str(model)).is_dir() and checkpoint.is_checkpoint(model):
        loaded = checkpoint.load(model)
        if device is not None:
            loaded.to(device)
        prepare_runtime(loaded)
        return loaded
    loaded = sources.load_float(model)
    return loaded if device is None else loaded.to(device)


def load_tokenizer(model: str | os.PathLike):
    """The tokenizer that goes with `load(model)`."""
    return sources.load_tokenizer(model)


def _warn_unmatched(plan: Plan) -> None:
    """Say so when an override matches none of the model's block layers (a typo would be silent)."""
    for o in plan.config.overrides:
        if not any(o.matches(t.name) for t in plan.layers):
            warnings.warn(f"zquant: override {o.pattern!r} matches no layer of this model (its layers are named "
                          f"like {plan.layers[0].name!r})", UserWarning, stacklevel=3)


def _algorithms(plan: Plan, config: QuantConfig, calibration, tokenizer, calib_text: str,
                lkd: LKDConfig | bool | None) -> list[Algorithm]:
    """The pipeline steps the scheme and options ask for: static ranges first, then LKD."""
    steps: list[Algorithm] = []
    if plan.needs_calibration():
        source = "user batches"
        if calibration is None:
            if tokenizer is None:
                raise ValueError(f"scheme {config.name!r} uses static activation scales: pass calibration batches "
                                 "or a tokenizer")
            seq_len = 128 if plan.kind == "encoder" else 256
            calibration, source = sample_batches(tokenizer, calib_text, count=16, seq_len=seq_len), calib_text
        steps.append(StaticRanges(calibration, source))
    if lkd is not None and not isinstance(lkd, (bool, LKDConfig)):
        raise ConfigError(f"lkd must be True, False or an LKDConfig, got {type(lkd).__name__}")
    if lkd:
        steps.append(LKD(LKDConfig() if lkd is True else lkd, tokenizer))
    return steps


def quantize(model: nn.Module, scheme: str | QuantConfig, calibration: Iterable[dict[str, Tensor]] | None = None,
             tokenizer=None, calib_text: str = DEFAULT_CALIB_TEXT, lkd: LKDConfig | bool | None = None,
             lkd_resume: str | os.PathLike | None = None, quiet: bool = False) -> nn.Module:
    """Quantize ``model`` in place with a preset name or a `QuantConfig`, and return it.

    Static activation schemes need calibration batches: pass ``calibration`` (model kwargs
    dicts), or a ``tokenizer`` and zquant samples ``calib_text`` (default: a packaged text that is
    not the default evaluation text).

    ``lkd=True`` (default settings) or an `LKDConfig` distills every block with LKD (see
    `zquant.algorithms.lkd`); text data needs the ``tokenizer``. ``lkd_resume`` is a directory
    where finished blocks are kept so an interrupted run can resume; ``quiet`` silences the
    per-block progress lines.

    The parts that stay floating point (embeddings, norms, biases, float layers, an untied head)
    are rounded to the scheme's ``float_dtype`` (default bfloat16), after calibration and LKD,
    which see the float32 values; they stay float32 tensors, so compute is float32, and `save`
    stores them in that dtype. With ``embeddings="int8"`` the embedding table becomes INT8 rows
    (`zquant.embedding`), and a head tied to it runs from them as a W8A8 linear.
    """
    config = get_scheme(scheme)
    refuse_quantized(model)
    plan = make_plan(model, config)
    check_finite(model, plan.quantized())      # NaN / Inf weights: refused before calibration or LKD
    _warn_unmatched(plan)
    calibration = list(calibration) if calibration is not None else None
    steps = _algorithms(plan, config, calibration, tokenizer, calib_text, lkd)
    recorded = Pipeline(model, plan, steps, resume_dir=lkd_resume, quiet=quiet).run()
    convert_embeddings(model, plan)             # INT8 table (and tied head) when the scheme asks
    round_float_parts(model, config.float_dtype)   # the storage dtype is part of the numerics
    mark_quantized(model, plan, QuantRecord(config, plan.adapter.name, steps=recorded))
    prepare_runtime(model, plan)   # runtime-only module swaps for the fast path; the state dict is unchanged
    return model


def save(model: nn.Module, directory: str | os.PathLike, tokenizer=None, format: str = "zquant",
         force: bool = False) -> Path:
    """Write a quantized model (and the tokenizer if given) atomically, in zquant's format by default.

    ``directory`` must be absent, an empty directory or a zquant checkpoint, which is replaced;
    anything else there (other files, a regular file, a link) is refused unless ``force=True``.
    The model's recorded source, or a path inside it, is always refused."""
    return formats.write(model, directory, format, tokenizer, force)
