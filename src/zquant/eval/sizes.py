"""Model sizes in bytes, as stored (int8 / packed int4 weights count as what they are)."""
from __future__ import annotations

from torch import nn

from ..modules import QuantLinear


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from (b for n, b in module.named_buffers() if b is not None and _persistent(module, n))


def _persistent(root: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    return leaf not in owner._non_persistent_buffers_set


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and saved buffer, each shared (tied) tensor counted once."""
    seen, total = set(), 0
    for t in _tensors(model):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def layer_bytes(model: nn.Module, names: list[str]) -> dict:
    """Stored bytes of the named linear layers, and what the same layers take in FP16."""
    stored = fp16 = 0
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, QuantLinear):
            stored += sum(t.numel() * t.element_size() for t in (m.qweight, m.wscale, m.bias, m.act_scale) if t is not None)
            fp16 += 2 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
        else:
            params = list(m.parameters())
            stored += sum(p.numel() * p.element_size() for p in params)
            fp16 += sum(2 * p.numel() for p in params)
    return {"bytes": stored, "fp16_bytes": fp16, "ratio_to_fp16": stored / fp16 if fp16 else float("nan")}
