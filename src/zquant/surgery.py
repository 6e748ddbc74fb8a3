"""Module surgery: one walker that finds the quantizable linear layers and swaps them.

`plan` lists every linear layer inside the transformer blocks with its effective `LayerQuant`
(role config + overrides + the family's default number of row groups). `quantize_model` swaps
those layers for `QuantLinear`s in place. Static activation scales are calibrated first, on the
floating-point model, by `calibrate_absmax`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from .config import LayerQuant, QuantConfig
from .models import Adapter, get_adapter
from .modules import QuantLinear


@dataclass(frozen=True)
class Target:
    name: str          # qualified module name in the model
    block: int         # index of the transformer block
    relative: str      # name inside the block
    role: str          # "attention" or "mlp"
    spec: LayerQuant   # resolved: weight is None when the layer stays floating point


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear)) or type(module).__name__ == "Conv1D"


def plan(model: nn.Module, config: QuantConfig, adapter: Adapter | None = None) -> list[Target]:
    """Every linear layer of every block, in order, with its resolved config."""
    adapter = adapter or get_adapter(model)
    blocks_name, blocks = adapter.find_blocks(model)
    targets = []
    for i, block in enumerate(blocks):
        for rel, module in block.named_modules():
            if not _is_linear(module):
                continue
            role = adapter.role(rel)
            if role is None:
                continue
            name = f"{blocks_name}.{i}.{rel}"
            spec = config.layer(name, role)
            if spec.weight is not None:
                spec = LayerQuant(spec.weight.with_default_groups(adapter.default_groups), spec.act)
            targets.append(Target(name, i, rel, role, spec))
    if not targets:
        raise ValueError(f"adapter {adapter.name!r} found no linear layers to quantize in {type(model).__name__}")
    return targets


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


@torch.no_grad()
def calibrate_absmax(model: nn.Module, names: Iterable[str], batches: Iterable[dict[str, Tensor]],
                     momentum: float = 0.95) -> dict[str, Tensor]:
    """Per-tensor input range of the named layers on calibration batches (model kwargs dicts).

    Like DeepSpeed's static ``QuantAct``: an exponential moving average (``momentum``) of each
    batch's absolute maximum, starting from the first batch's.
    """
    stats: dict[str, Tensor] = {}

    def hook(name):
        def record(_module, args):
            batch_max = args[0].detach().abs().amax().float()
            stats[name] = batch_max if name not in stats else momentum * stats[name] + (1 - momentum) * batch_max
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in stats]
    if missing:
        raise ValueError(f"calibration never reached {len(missing)} layer(s), e.g. {missing[0]}")
    return stats


def static_absmax(model: nn.Module, config: QuantConfig, targets: list[Target],
                  calibration: Iterable[dict[str, Tensor]] | None) -> dict[str, Tensor]:
    """``calibrate_absmax`` for the targets with static activation scales ({} if there are none)."""
    static = [t.name for t in targets if t.spec.act.mode == "static"]
    if not static:
        return {}
    if calibration is None:
        raise ValueError(f"scheme {config.name!r} uses static activation scales: pass calibration batches")
    return calibrate_absmax(model, static, calibration)


def quantize_model(model: nn.Module, config: QuantConfig, calibration: Iterable[dict[str, Tensor]] | None = None,
                   adapter: Adapter | None = None) -> nn.Module:
    """Swap the model's block linear layers for `QuantLinear`s in place and return the model.

    ``calibration`` (model kwargs dicts, e.g. ``{"input_ids": ...}``) is needed when any layer uses
    static activation quantization.
    """
    adapter = adapter or get_adapter(model)
    targets = [t for t in plan(model, config, adapter) if t.spec.weight is not None]
    absmax = static_absmax(model, config, targets, calibration)
    for t in targets:
        set_submodule(model, t.name, QuantLinear.from_float(model.get_submodule(t.name), t.spec, absmax.get(t.name)))
    attach_info(model, config, adapter)
    return model


def attach_info(model: nn.Module, config: QuantConfig, adapter: Adapter, **extra) -> None:
    """Record how the model was quantized (read back by `zquant.io.save`)."""
    info = dict(getattr(model, "zquant_info", {}) or {})
    info.update(scheme=config.to_dict(), adapter=adapter.name, **extra)
    model.zquant_info = info
