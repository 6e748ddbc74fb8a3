"""The float parts of a quantized model: what stays floating point, and the dtype it is stored in.

Every floating-point tensor of a quantized model's state dict is a float part (embeddings, norms,
biases, layers kept in floating point, an untied output head) except quantization scales, which
the module that owns them names in ``scale_buffers`` and which stay float32.

The scheme's ``float_dtype`` (`QuantConfig.float_dtype`) is part of the numerics: `zquant.quantize`
rounds the float parts to it (`round_float_parts`, round to nearest even), so the model in memory
computes exactly what a checkpoint stores and `zquant compare` shows the true cost. Compute stays
float32: the tensors remain float32 tensors holding bfloat16 / float16 values (the CPU kernels and
the fused norms take float32), and a checkpoint casts them to ``float_dtype`` and back, both exact.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError
from .record import record_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def float_part_names(model: nn.Module) -> set[str]:
    """The state-dict names of the float parts of ``model`` (every alias of a tied tensor)."""
    names = set()
    for name, t in model.state_dict(keep_vars=True).items():
        owner, _, attr = name.rpartition(".")
        if t.is_floating_point() and attr not in getattr(model.get_submodule(owner), "scale_buffers", ()):
            names.add(name)
    return names


def float_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the float parts (the parameter or buffer itself), each shared tensor once."""
    names, out, seen = float_part_names(model), {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in names and id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


@torch.no_grad()
def round_float_parts(model: nn.Module, float_dtype: str) -> None:
    """Replace every float part of ``model`` by a copy rounded to ``float_dtype`` (its dtype stays
    float32). The model's original tensors are not written (a caller may still hold them); tied
    tensors get one shared copy. Refuses a float16 rounding that overflows, naming the tensor."""
    dtype, names = DTYPES[float_dtype], float_part_names(model)
    copies: dict[int, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for slots in (module._parameters, module._buffers):
            for attr, t in slots.items():
                name = f"{prefix}.{attr}" if prefix else attr
                if name not in names or t.dtype == dtype:
                    continue
                if id(t) not in copies:
                    copies[id(t)] = _rounded(name, t, dtype)
                slots[attr] = copies[id(t)]


def _rounded(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rounded = t.detach().to(dtype)
    if dtype == torch.float16 and bool((rounded.isinf() & t.isfinite()).any()):
        raise ConfigError(f"{name}: values up to {float(t.abs().max()):.4g} overflow float16 "
                          "(largest 65504); use float_dtype bfloat16 or float32")
    out = rounded.to(t.dtype)
    return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out


def float_itemsize(model: nn.Module) -> int | None:
    """Bytes per element a quantized model's float parts are stored with; None for a float model."""
    record = record_of(model)
    return DTYPES[record.scheme.float_dtype].itemsize if record else None
