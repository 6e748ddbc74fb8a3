"""The plan: a model's structure for one scheme, computed once and handed to every later step.

`make_plan(model, config)` finds the family adapter (once), the block list, and every linear
layer inside the blocks with its role and its resolved `LayerQuant` (role config + overrides +
the family's default number of row groups). Calibration algorithms, the conversion to integer
modules, the runtime fusions, checkpoints, evaluation and inspection all read this object
instead of re-examining the model.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import LayerQuant, QuantConfig
from .models import Adapter, get_adapter, model_kind
from .modules import QuantLinear, is_float_linear

PLAN_ATTR = "zquant_plan"          # where a quantized model keeps its plan (never saved)
ALL_LAYERS = QuantConfig(name="all-layers")   # a scheme that lists every block linear layer


@dataclass(frozen=True)
class LayerPlan:
    name: str          # qualified module name in the model
    block: int         # index of the transformer block
    relative: str      # name inside the block
    role: str          # "attention" or "mlp"
    spec: LayerQuant   # resolved: weight is None when the layer stays floating point

    @property
    def quantized(self) -> bool:
        return self.spec.weight is not None


@dataclass(frozen=True)
class Plan:
    adapter: Adapter
    config: QuantConfig
    blocks_name: str                   # qualified name of the ModuleList of blocks
    num_blocks: int
    layers: tuple[LayerPlan, ...]      # every block linear layer with a role, in order
    embedding: str | None = None       # qualified name of the token embedding table (from the adapter)
    head: str | None = None            # qualified name of the output head, if the model has one

    @property
    def kind(self) -> str:
        return self.adapter.kind

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_name)

    def quantized(self) -> list[LayerPlan]:
        return [t for t in self.layers if t.quantized]

    def block_layers(self, k: int, quantized_only: bool = True) -> list[LayerPlan]:
        """The layers of block ``k`` (only those that are quantized, by default)."""
        return [t for t in self.layers if t.block == k and (t.quantized or not quantized_only)]

    def needs_calibration(self) -> bool:
        """True if some layer uses static activation scales."""
        return any(t.spec.act.mode == "static" for t in self.quantized())


def make_plan(model: nn.Module, config: QuantConfig, adapter: Adapter | None = None) -> Plan:
    """The plan of ``model`` (floating point, or a skeleton being rebuilt) for ``config``."""
    adapter = adapter or get_adapter(model)
    blocks_name, blocks = adapter.find_blocks(model)
    layers = []
    for i, block in enumerate(blocks):
        for rel, module in block.named_modules():
            role = adapter.role(rel) if is_float_linear(module) or isinstance(module, QuantLinear) else None
            if role is None:
                continue
            name = f"{blocks_name}.{i}.{rel}"
            spec = config.layer(name, role)
            if spec.weight is not None:
                spec = LayerQuant(spec.weight.with_default_groups(adapter.default_groups), spec.act)
            layers.append(LayerPlan(name, i, rel, role, spec))
    if not layers:
        raise ValueError(f"adapter {adapter.name!r} found no linear layers to quantize in {type(model).__name__}")
    return Plan(adapter, config, blocks_name, len(blocks), tuple(layers), *adapter.find_embeddings(model))


def plan_of(model: nn.Module) -> Plan | None:
    """The plan a quantized model carries (None for a floating-point model)."""
    return getattr(model, PLAN_ATTR, None)


def layer_plan(model: nn.Module) -> Plan:
    """The model's own plan if quantized, else one listing every block linear layer (inspection, sizes)."""
    return plan_of(model) or make_plan(model, ALL_LAYERS)


def kind_of(model: nn.Module) -> str:
    """"decoder" or "encoder": from the model's plan if it has one, else from its config."""
    plan = plan_of(model)
    return plan.kind if plan is not None else model_kind(model)
