"""How a checkpoint stores the float parts (`zquant.float_parts`): in the record's ``float_dtype`` in
the file, float32 in memory. Both casts are exact, because `zquant.quantize` already rounded the
values to that dtype: a loaded model equals the one that was saved, bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..float_parts import DTYPES, float_part_names
from .errors import CheckpointError


def _one_name_per_tensor(state: dict[str, Tensor]) -> dict[str, str]:
    """Drop the aliases of shared (tied) tensors from ``state`` in place, keeping the first name in
    sorted order as `safetensors.torch.save_model` does; returns ``{dropped: kept}``."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if t.numel():
            groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype),
                              []).append(name)
    aliases = {}
    for names in groups.values():
        kept, *dropped = sorted(names)
        for n in dropped:
            aliases[n] = kept
            del state[n]
    return aliases


def save_weights(model: nn.Module, path: Path, float_dtype: str) -> None:
    """Write ``model``'s state dict to the safetensors file ``path``, float parts cast to ``float_dtype``
    and each tied tensor once (the dropped names are listed in the file's metadata)."""
    from safetensors.torch import save_file
    state = model.state_dict()
    aliases = _one_name_per_tensor(state)
    dtype = DTYPES[float_dtype]
    for name in float_part_names(model) & state.keys():
        state[name] = state[name].to(dtype)
    save_file(state, str(path), metadata=aliases or None)


@torch.no_grad()
def upcast_float_parts(model: nn.Module, names: set[str], float_dtype: str, weights: Path) -> None:
    """After the file's tensors are assigned: check that the float parts ``names`` (read from the
    skeleton, before assignment) have the recorded ``float_dtype``, and make them float32 in place
    (ties and the modules holding them are kept)."""
    dtype = DTYPES[float_dtype]
    done = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in names or id(t) in done:
            continue
        if t.dtype != dtype:
            raise CheckpointError(f"{weights}: {name} is stored as {str(t.dtype).removeprefix('torch.')}, but the "
                                  f"record says float parts are {float_dtype}")
        done.add(id(t))
        t.data = t.data.float()
