"""Rebuild a model from a checkpoint's record without materialising its float weights.

The skeleton is the recorded transformers class built from the recorded config with every
parameter on the meta device (no memory, no initialisation); the checkpoint's tensors are then
assigned in place of them, tied weights re-tied, and any tensor left unset refused.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import CheckpointError


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
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


def build_skeleton(meta: dict) -> nn.Module:
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
    with warnings.catch_warnings(), parameters_on_meta():
        warnings.simplefilter("ignore")
        return cls._from_config(config, dtype=torch.float32)


def assign_weights(model: nn.Module, weights: Path) -> None:
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
