"""Model sizes in bytes, as stored (int8 / packed int4 weights count as what they are, and a
quantized model's float parts as its scheme's ``float_dtype``, see `zquant.float_parts`)."""
from __future__ import annotations

from torch import nn

from ..float_parts import float_itemsize, float_part_names
from ..modules import QuantLinear


def model_bytes(model: nn.Module) -> int:
    """Bytes of every saved tensor as a checkpoint stores it, each shared (tied) tensor counted once."""
    itemsize = float_itemsize(model)
    floats = float_part_names(model) if itemsize else set()
    seen, total = set(), 0
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * (itemsize if name in floats else t.element_size())
    return total


def layer_bytes(model: nn.Module, names: list[str]) -> dict:
    """Stored bytes of the named linear layers, and what the same layers take in FP16."""
    itemsize = float_itemsize(model)
    stored = fp16 = 0
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, QuantLinear):
            stored += sum(t.numel() * t.element_size() for t in (m.qweight, m.wscale, m.act_scale) if t is not None)
            stored += 0 if m.bias is None else m.bias.numel() * (itemsize or m.bias.element_size())
            fp16 += 2 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
        else:
            params = list(m.parameters())
            stored += sum(p.numel() * (itemsize or p.element_size()) for p in params)
            fp16 += sum(2 * p.numel() for p in params)
    return {"bytes": stored, "fp16_bytes": fp16, "ratio_to_fp16": stored / fp16 if fp16 else float("nan")}
