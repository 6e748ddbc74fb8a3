"""Checks that bind a checkpoint's record to its tensors, run before any tensor is allocated.

The record (``zquant.json``) says what to build; the safetensors header says what the file holds.
`read_header` reads the header only (names, dtypes, shapes; no tensor data). `check_block_count`
runs before the skeleton is built, because even on the meta device a claimed 10^6 layers takes
hours to construct. `check_tensors` compares the meta skeleton's state dict (the recorded class
and config after `convert.empty_layers`: what the plan says the file must hold) with the header,
and `check_buffer_budget` bounds the buffers the config makes the model compute (a hostile
``max_position_embeddings`` must not allocate gigabytes). `check_scales` runs once the scales
are loaded: the kernels divide and multiply by them.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

# safetensors' dtype codes for the torch dtypes a checkpoint can hold
_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
          torch.bool: "BOOL"}
BUFFER_BUDGET = 64 << 20   # bytes of computed buffers any model may ask for, beyond its weights file's size

Header = dict[str, tuple[str, tuple[int, ...]]]


def read_header(weights: Path) -> Header:
    """``{name: (dtype code, shape)}`` of a safetensors file, from its header alone (safetensors
    bounds and validates the header; no tensor data is read)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(weights), "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: unreadable safetensors header ({e})") from None


def held_blocks(header: Header) -> int:
    """How many blocks the file holds: the most distinct indices of a top-level list
    (``model.layers.N.``, ``transformer.h.N.``, ``encoder.layer.N.``)."""
    indices: dict[str, set[int]] = {}
    for name in header:
        m = re.match(r"((?:[^.\d][^.]*\.)+?)(\d+)\.", name)
        if m:
            indices.setdefault(m.group(1), set()).add(int(m.group(2)))
    return max((len(v) for v in indices.values()), default=0)


def check_block_count(config, header: Header, weights: Path) -> None:
    """Refuse a recorded layer count larger than the blocks the file holds (before building it)."""
    claimed = getattr(config, "num_hidden_layers", None)
    if claimed is None:
        return
    held = held_blocks(header)
    if not isinstance(claimed, int) or isinstance(claimed, bool) or not 0 < claimed <= held:
        raise CheckpointError(f"{weights}: holds {held} blocks, but the recorded source_config has "
                              f"num_hidden_layers {claimed!r}")


def _scale_names(model: nn.Module) -> set[str]:
    """State-dict names of quantization scales (modules name theirs in ``scale_buffers``)."""
    return {f"{name}.{attr}" if name else attr for name, m in model.named_modules()
            for attr in getattr(type(m), "scale_buffers", ()) if getattr(m, attr, None) is not None}


def _allowed(name: str, t: torch.Tensor, scales: set[str], float_storage: Collection[torch.dtype] | None) -> set:
    """The dtype codes the file may hold ``name`` in: integers and scales exactly as the module
    stores them; other floating tensors in ``float_storage`` (None: as the skeleton has them)."""
    if not t.is_floating_point() or name in scales or float_storage is None:
        return {_CODES.get(t.dtype, str(t.dtype))}
    return {_CODES[d] for d in float_storage}


def _show(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype} {list(shape)}"


def check_tensors(model: nn.Module, header: Header, weights: Path,
                  float_storage: Collection[torch.dtype] | None = None) -> None:
    """Refuse a file whose tensor names, shapes or dtypes differ from what ``model`` (the meta
    skeleton after `empty_layers`) expects, naming the first differing tensor. A shared (tied)
    tensor is saved once, under any one of its names."""
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in expected.items():
        groups.setdefault(id(t), []).append(name)
    scales = _scale_names(model)
    for name, t in expected.items():
        group = groups[id(t)]
        if name not in header:
            if not any(n in header for n in group):
                raise CheckpointError(f"{weights}: tensor {name} is missing (the recorded model and scheme "
                                      f"expect {_show(_CODES.get(t.dtype, str(t.dtype)), tuple(t.shape))})")
            continue
        dtype, shape = header[name]
        allowed = _allowed(name, t, scales, float_storage)
        if shape != tuple(t.shape) or dtype not in allowed:
            raise CheckpointError(f"{weights}: tensor {name} is {_show(dtype, shape)}, but the recorded model and "
                                  f"scheme expect {_show('/'.join(sorted(allowed)), tuple(t.shape))}")
    unexpected = [n for n in header if n not in expected]
    if unexpected:
        raise CheckpointError(f"{weights}: tensor {unexpected[0]} is not part of the recorded model and scheme "
                              f"({len(unexpected)} unexpected tensors)")


def check_buffer_budget(model: nn.Module, weights: Path) -> None:
    """Refuse a config whose computed (never saved) buffers would take more than `BUFFER_BUDGET`
    plus the weights file's size: position tables that large come from a hostile config."""
    saved = model.state_dict().keys()
    pending = [(n, b) for n, b in model.named_buffers() if b.is_meta and n not in saved]
    total = sum(b.numel() * b.element_size() for _, b in pending)
    budget = BUFFER_BUDGET + weights.stat().st_size
    if total > budget:
        name, largest = max(pending, key=lambda nb: nb[1].numel() * nb[1].element_size())
        raise CheckpointError(f"{weights}: the recorded source_config makes the model compute {total >> 20} MiB of "
                              f"buffers (largest {name} {list(largest.shape)}), more than this checkpoint can need")


def check_scales(model: nn.Module, weights: Path) -> None:
    """Refuse quantization scales that are not finite and positive (NaN, infinite, zero or negative)."""
    for name in sorted(_scale_names(model)):
        s = model.get_buffer(name)
        bad = ~(torch.isfinite(s) & (s > 0))
        if bad.any():
            raise CheckpointError(f"{weights}: {name} holds {int(bad.sum())} scale(s) that are not finite and "
                                  f"positive (e.g. {s[bad].flatten()[0].item()}); corrupted or hand-edited")
