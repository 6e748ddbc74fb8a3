"""Conversion to integer modules: swap a plan's linear layers for `QuantLinear`s.

`convert_layers` quantizes float layers in place (what round-to-nearest is); `empty_layers` swaps
in uninitialised `QuantLinear`s of the right shapes for a checkpoint's tensors to fill;
`convert_embeddings` / `empty_embeddings` do the same for an INT8 embedding table (and a head tied
to it); `set_submodule` is the one module-swap primitive every step uses. `check_finite` refuses a
float weight with NaN or infinite values, naming the layer: its quantized group would be all NaN
(see `zquant.primitives`), a broken model better reported than converted.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from .config import ConfigError
from .embedding import QuantEmbedding, TiedHead
from .modules import QuantLinear, float_weight, linear_features
from .plan import LayerPlan, PLAN_ATTR, Plan
from .record import RECORD_ATTR, QuantRecord


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class NonFiniteWeightError(ValueError):
    """A layer to be quantized has NaN or infinite weights; the message names the layer."""


def require_finite(name: str, module: nn.Module) -> None:
    """Refuse the float layer ``module`` (called ``name``) if its weight holds a NaN or an infinity."""
    weight = float_weight(module)[0].detach()
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = weight[~finite]
        kinds = " and ".join(k for k, n in (("NaN", int(bad.isnan().sum())), ("infinite", int(bad.isinf().sum()))) if n)
        raise NonFiniteWeightError(f"layer {name}: {bad.numel()} of {weight.numel()} weights are {kinds}; "
                                   "zquant does not quantize non-finite weights (fix or retrain the model)")


def check_finite(model: nn.Module, layers: Iterable[LayerPlan]) -> None:
    """`require_finite` for every planned layer of ``model`` (one pass over their weights, before slow work)."""
    for t in layers:
        require_finite(t.name, model.get_submodule(t.name))


def convert_layers(root: nn.Module, layers: Iterable[LayerPlan], absmax: Mapping[str, Tensor] | None = None,
                   relative: bool = False) -> nn.Module:
    """Replace each planned float layer of ``root`` by a `QuantLinear` of it; ``absmax`` holds the
    calibrated input ranges of static layers by qualified name. With ``relative``, ``root`` is one
    block and the layers are found by their names inside it. A non-finite weight is refused."""
    absmax = absmax or {}
    for t in layers:
        name = t.relative if relative else t.name
        module = root.get_submodule(name)
        require_finite(t.name, module)
        set_submodule(root, name, QuantLinear.from_float(module, t.spec, absmax.get(t.name)))
    return root


def empty_layers(model: nn.Module, plan: Plan) -> None:
    """Swap every quantized layer of the plan for a `QuantLinear` of the same shape (to be loaded)."""
    for t in plan.quantized():
        src = model.get_submodule(t.name)
        k, n = linear_features(src)
        set_submodule(model, t.name, QuantLinear(k, n, t.spec, bias=src.bias is not None))


def _swap_embeddings(model: nn.Module, plan: Plan, make) -> None:
    """With the scheme's ``embeddings="int8"``, replace the plan's embedding table by ``make(name,
    table)`` and a head that shares the table's weight by a `TiedHead` reading the new table."""
    if plan.config.embeddings != "int8":
        return
    if plan.embedding is None:
        raise ConfigError(f"embeddings='int8': adapter {plan.adapter.name!r} finds no token embedding table in "
                          f"{type(model).__name__}")
    table = model.get_submodule(plan.embedding)
    head = model.get_submodule(plan.head) if plan.head is not None else None
    tied = head is not None and getattr(head, "weight", None) is getattr(table, "weight", False)
    new = make(plan.embedding, table)
    set_submodule(model, plan.embedding, new)
    if tied:   # the float table and head share one Parameter, which nothing references from here on
        set_submodule(model, plan.head, TiedHead(new))


def convert_embeddings(model: nn.Module, plan: Plan) -> None:
    """Quantize the token embedding table to INT8 rows when the scheme asks (``embeddings="int8"``)."""
    _swap_embeddings(model, plan, lambda name, table: QuantEmbedding.from_float(table, name))


def empty_embeddings(model: nn.Module, plan: Plan) -> None:
    """Swap in an empty `QuantEmbedding` (and `TiedHead`) of the right shape, for a checkpoint to fill."""
    def make(name, table):
        return QuantEmbedding(table.num_embeddings, table.embedding_dim, table.padding_idx)
    _swap_embeddings(model, plan, make)


def mark_quantized(model: nn.Module, plan: Plan, record: QuantRecord) -> None:
    """Attach the plan (runtime only) and the record (saved with the model) to a quantized model."""
    object.__setattr__(model, PLAN_ATTR, plan)      # a plain attribute: not a submodule or state
    setattr(model, RECORD_ATTR, record)
