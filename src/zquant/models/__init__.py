"""Model-family adapters, found from the model's config (``config.model_type``).

An adapter only names things: where the repeated transformer blocks live and which linear layers
inside a block belong to attention and which to the MLP. A family is one `Adapter` entry in
`REGISTRY`; a model of an unknown family falls back to `generic_adapter`, which finds the blocks by
structure and classifies linear layers by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple[str, ...]
    kind: str                          # "decoder" (causal LM) or "encoder"
    blocks: str                        # name suffix of the ModuleList of blocks
    attention: tuple[str, ...]         # linear layers in a block (names relative to the block)
    mlp: tuple[str, ...]
    # Norm -> the linear layers that read its output (relative to the block), for fused
    # norm+quantize kernels. A leading "next." means the layer of the following block.
    norm_feeds: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Runtime fusions of the CPU fast path (`zquant.fusion`); the first name is relative to the
    # block, the next ones to that module. Modules whose forward is second(act(first(x))), or
    # act(first(x)) when second is "": (module, first, activation, second, the linear that reads
    # the activation, relative to the block).
    act_mlps: tuple[tuple[str, str, str, str, str], ...] = ()
    # Gated MLPs whose forward is down(act(gate(x)) * up(x)): (module, gate, up, down, activation).
    gated_mlps: tuple[tuple[str, str, str, str, str], ...] = ()

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

    def role(self, relative_name: str) -> str | None:
        """'attention', 'mlp' or None (not quantized) for a linear layer's name inside a block."""
        if relative_name in self.attention:
            return "attention"
        if relative_name in self.mlp:
            return "mlp"
        return None


REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    for t in adapter.model_types:
        REGISTRY[t] = adapter
    return adapter


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

register(Adapter(
    "llama", ("llama", "mistral", "qwen2", "qwen3"), "decoder", "layers", _LLAMA_ATTN, _LLAMA_MLP,
    norm_feeds=(("input_layernorm", _LLAMA_ATTN[:3]), ("post_attention_layernorm", _LLAMA_MLP[:2])),
    gated_mlps=(("mlp", "gate_proj", "up_proj", "down_proj", "act_fn"),)))
register(Adapter(
    "bert", ("bert", "roberta", "xlm-roberta", "electra"), "encoder", "encoder.layer",
    ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    ("intermediate.dense", "output.dense"),
    norm_feeds=(("attention.output.LayerNorm", ("intermediate.dense",)),
                ("output.LayerNorm", ("next.attention.self.query", "next.attention.self.key",
                                      "next.attention.self.value"))),
    act_mlps=(("intermediate", "dense", "intermediate_act_fn", "", "output.dense"),)))
register(Adapter(
    "gpt2", ("gpt2",), "decoder", "h", ("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj"),
    norm_feeds=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    act_mlps=(("mlp", "c_fc", "act", "c_proj", "mlp.c_proj"),)))
register(Adapter(
    "opt", ("opt",), "decoder", "layers",
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"), ("fc1", "fc2"),
    norm_feeds=(("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("final_layer_norm", ("fc1",)))))
register(Adapter(
    "gpt_neox", ("gpt_neox",), "decoder", "layers", ("attention.query_key_value", "attention.dense"),
    ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    norm_feeds=(("input_layernorm", ("attention.query_key_value",)),
                ("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
    act_mlps=(("mlp", "dense_h_to_4h", "act", "dense_4h_to_h", "mlp.dense_4h_to_h"),)))
register(Adapter(
    "gptj", ("gptj",), "decoder", "h",
    ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"), ("mlp.fc_in", "mlp.fc_out"),
    norm_feeds=(("ln_1", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.fc_in")),),
    act_mlps=(("mlp", "fc_in", "act", "fc_out", "mlp.fc_out"),)))

_MLP_NAME = re.compile(r"(mlp|ffn|feed_forward|intermediate|fc\d|fc_in|fc_out|w[123]\b|dense_h_to_4h|dense_4h_to_h|"
                       r"(^|\.)output\.dense$|gate|up_proj|down_proj)")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def generic_adapter(model: nn.Module) -> Adapter:
    """Find the repeated blocks (the longest ModuleList of one block class holding linear layers)
    and classify their linear layers as MLP by name, attention otherwise."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            if any(_is_linear(m) for m in module[0].modules()) and (best is None or len(module) > best[0]):
                best = (len(module), name, module)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if best is None:
        raise UnsupportedModelError(model_type)
    _, blocks_name, blocks = best
    linears = [n for n, m in blocks[0].named_modules() if _is_linear(m)]
    mlp = tuple(n for n in linears if _MLP_NAME.search(n))
    attention = tuple(n for n in linears if n not in mlp)
    config = getattr(model, "config", None)
    names = [type(model).__name__, *(getattr(config, "architectures", None) or [])]
    is_decoder = bool(getattr(config, "is_decoder", False)) or any(n.endswith(("ForCausalLM", "LMHeadModel"))
                                                                    for n in names)
    return Adapter(f"generic:{model_type}", (model_type,), "decoder" if is_decoder else "encoder",
                   blocks_name, attention, mlp)


class UnsupportedModelError(ValueError):
    def __init__(self, model_type: str):
        families = sorted({a.name for a in REGISTRY.values()})
        super().__init__(f"unsupported architecture {model_type!r}: no adapter and no repeated transformer "
                         f"blocks found; supported families: {', '.join(families)} "
                         f"(model types: {', '.join(sorted(REGISTRY))})")


def get_adapter(model: nn.Module) -> Adapter:
    """The registered adapter for ``model.config.model_type``, else the generic fallback."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    return generic_adapter(model)


def adapter_by_name(name: str, model: nn.Module) -> Adapter:
    """Adapter recorded in a checkpoint (``generic:*`` is recomputed from the model)."""
    if name.startswith("generic:"):
        return generic_adapter(model)
    for adapter in REGISTRY.values():
        if adapter.name == name:
            return adapter
    raise ValueError(f"checkpoint names adapter {name!r}, which this zquant does not have; "
                     f"known: {sorted({a.name for a in REGISTRY.values()})}")
