"""Model-family adapters, found from the model's config (``config.model_type``).

An adapter only names things: where the repeated transformer blocks live, which linear layers
inside a block belong to attention and which to the MLP, and which runtime fusions the family's
block layout allows (`NormFeed`, `ActMLP`, `GatedMLP`). A family is one `Adapter` entry in
`REGISTRY` (see `families`); a model of an unknown family falls back to `generic_adapter`, which
finds the blocks by structure and classifies linear layers by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from torch import nn

from ..modules import is_float_linear


@dataclass(frozen=True)
class NormFeed:
    """A norm (name relative to the block) whose output only feeds the ``readers`` linears; a
    leading ``next.`` names a layer of the following block. Fused as norm + per-token quantize."""
    norm: str
    readers: tuple[str, ...]

    @property
    def target(self) -> str:          # the module the fused one replaces
        return self.norm


@dataclass(frozen=True)
class ActMLP:
    """A module computing ``second(act(first(x)))``, or ``act(first(x))`` when ``second`` is "";
    ``first``/``act``/``second`` are relative to ``module``, ``reader`` (the linear that reads the
    activation) to the block. Fused as a GEMM with the activation in its epilogue."""
    module: str
    first: str
    act: str
    second: str
    reader: str

    @property
    def target(self) -> str:
        return self.module


@dataclass(frozen=True)
class GatedMLP:
    """A module computing ``down(act(gate(x)) * up(x))`` (names relative to ``module``). Fused as one
    GEMM over interleaved gate/up weights whose epilogue forms the product."""
    module: str
    gate: str
    up: str
    down: str
    act: str

    @property
    def target(self) -> str:
        return self.module


Fusion = Union[NormFeed, ActMLP, GatedMLP]


@dataclass(frozen=True)
class DecodeLayout:
    """Where zquant's own decode step (`zquant.generate`'s fast path) finds a pre-norm decoder's
    parts. Block names are relative to a block, the others to the model. ``qkv``: the query, key
    and value layers (run as one GEMM), or one layer that computes all three (GPT-2's c_attn);
    ``mlp_in``: gate and up (a gated MLP), or the one input layer; ``rotary``: the RoPE module, or
    ``positions``: an absolute position embedding added to the token embedding. (The token table and
    the head are the adapter's: `Adapter.find_embeddings`.)"""
    norm1: str
    qkv: tuple[str, ...]
    out: str
    norm2: str
    mlp_in: tuple[str, ...]
    mlp_act: str
    mlp_out: str
    final_norm: str
    rotary: str | None = None
    positions: str | None = None


KINDS = ("decoder", "encoder")


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    kind: str                          # "decoder" (causal LM) or "encoder"
    blocks: str                        # name suffix of the ModuleList of blocks
    attention: tuple[str, ...]         # linear layers in a block (names relative to the block)
    mlp: tuple[str, ...]
    fusions: tuple[Fusion, ...] = ()   # runtime fusions of the fast path (`zquant.fusion`)
    # Name suffixes of the token embedding table and the output head ("": the model's own
    # get_input_embeddings() / get_output_embeddings()).
    embeddings: str = ""
    head: str = ""
    decode: DecodeLayout | None = None  # zquant's own decode step, for families it runs

    @property
    def default_groups(self) -> int:
        """ZeroQuant's reference configs: 48 row groups for BERT, 64 for GPT-style decoders."""
        return 48 if self.kind == "encoder" else 64

    def find_blocks(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """(qualified name, ModuleList) of the transformer blocks."""
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and (name == self.blocks or name.endswith("." + self.blocks)):
                return name, module
        raise ValueError(f"{type(model).__name__}: no block list '*{self.blocks}' for adapter {self.name!r}")

    def find_embeddings(self, model: nn.Module) -> tuple[str | None, str | None]:
        """(qualified name of the token embedding table, of the output head); None where there is none."""
        return (_find_module(model, self.embeddings, "get_input_embeddings"),
                _find_module(model, self.head, "get_output_embeddings"))

    def role(self, relative_name: str) -> str | None:
        """'attention', 'mlp' or None (not quantized) for a linear layer's name inside a block."""
        if relative_name in self.attention:
            return "attention"
        if relative_name in self.mlp:
            return "mlp"
        return None


def _find_module(model: nn.Module, suffix: str, getter: str) -> str | None:
    """The qualified name of the module called ``suffix`` (or ending in ``.suffix``), else of the one
    ``model.<getter>()`` returns; None when there is none."""
    if suffix:
        return next((n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix)), None)
    try:
        target = getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        return None
    return next((n for n, m in model.named_modules() if m is target and n), None) if target is not None else None


REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    for t in adapter.model_types:
        REGISTRY[t] = adapter
    return adapter


def model_kind(config) -> str:
    """"decoder" (a causal LM) or "encoder" for a transformers config, or for a model (its class name counts too)."""
    names = []
    if isinstance(config, nn.Module):
        names.append(type(config).__name__)
        config = getattr(config, "config", None)
    adapter = REGISTRY.get(getattr(config, "model_type", None))
    if adapter is not None:
        return adapter.kind
    names += list(getattr(config, "architectures", None) or [])
    causal = any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)
    return "decoder" if causal or bool(getattr(config, "is_decoder", False)) else "encoder"


_MLP_NAME = re.compile(r"(mlp|ffn|feed_forward|intermediate|fc\d|fc_in|fc_out|w[123]\b|dense_h_to_4h|dense_4h_to_h|"
                       r"^output\.dense$|gate|up_proj|down_proj)")


def generic_adapter(model: nn.Module) -> Adapter:
    """Find the repeated blocks (the longest ModuleList of one block class holding linear layers)
    and classify their linear layers as MLP by name, attention otherwise."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            if any(is_float_linear(m) for m in module[0].modules()) and (best is None or len(module) > best[0]):
                best = (len(module), name, module)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if best is None:
        raise UnsupportedModelError(model_type)
    _, blocks_name, blocks = best
    linears = [n for n, m in blocks[0].named_modules() if is_float_linear(m)]
    mlp = tuple(n for n in linears if _MLP_NAME.search(n))
    attention = tuple(n for n in linears if n not in mlp)
    return Adapter(f"generic:{model_type}", (model_type,), model_kind(model), blocks_name, attention, mlp,
                   _generic_fusions(blocks[0], linears))


# Layers that read a pre-norm block's normalized input first, by name: q/k/v (or fused QKV) after
# the attention norm, the MLP's input projections after the MLP norm.
_NORM_READERS = {
    "attention": re.compile(r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|Wqkv)$"),
    "mlp": re.compile(r"(^|\.)(gate_proj|up_proj|gate_up_proj|fc1|fc_in|c_fc|dense_h_to_4h)$"),
}
_NORM_NAMES = {"input_layernorm": "attention", "ln_1": "attention", "post_attention_layernorm": "mlp", "ln_2": "mlp"}


def _generic_fusions(block: nn.Module, linears: list[str]) -> tuple[Fusion, ...]:
    """Fusions a block of an unknown family declares by its names (pre-norm norms and Llama-style
    gated MLPs). Only declarations: `zquant.fusion` fuses a module only where the kernels compute
    exactly what it does (the norm class, the activation op and the layers' specs are checked)."""
    out: list[Fusion] = []
    for name, child in block.named_children():
        group = _NORM_NAMES.get(name)
        readers = tuple(n for n in linears if group and _NORM_READERS[group].search(n))
        if readers:
            out.append(NormFeed(name, readers))
    for name, module in block.named_modules():
        if name and all(hasattr(module, c) for c in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            out.append(GatedMLP(name, gate="gate_proj", up="up_proj", down="down_proj", act="act_fn"))
    return tuple(out)


class UnsupportedModelError(ValueError):
    """A model zquant cannot quantize; one short line naming the supported families (not every model type)."""

    def __init__(self, model_type: str, reason: str = "no adapter and no repeated transformer blocks found"):
        families = sorted({a.name for a in REGISTRY.values()})
        super().__init__(f"unsupported architecture {model_type!r}: {reason}; supported families: "
                         f"{', '.join(families)}, and other transformers decoders and encoders built of "
                         "repeated blocks")


def get_adapter(model: nn.Module) -> Adapter:
    """The registered adapter for ``model.config.model_type``, else the generic fallback."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    return generic_adapter(model)


from . import families  # noqa: E402,F401  -- registers the built-in families
