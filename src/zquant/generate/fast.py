"""The fast decode path: a quantized decoder run by the kernel backend's whole-model step.

For a family whose adapter declares a `zquant.models.DecodeLayout` (Llama, GPT-2), the
quantized layers are packed once into the backend's step runner (csrc/decode.cpp on CPU), which
runs every block in one call per step over a preallocated KV cache: no per-token Python work per
layer, no cache concatenation. The embedding lookup is one op and the output head one kernel
call (`head_logits`, batch-invariant; bfloat16 weights when the head's values are exactly
bfloat16, which halves its read per token at no change in results).

`unsupported_reason` says why a model cannot take this path (the engine then uses the general
one and says so once).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..fusion import NORM_KINDS, activation_kind
from ..kernels.decoder import MAX_HEAD_DIM, BlockSpec, DecoderSpec, NormSpec
from ..modules import QuantLinear
from ..plan import plan_of

# RoPE variants whose tables depend on the position only (not on the sequence's length).
_STATIC_ROPE = ("default", "linear", "llama3")


def _norm_spec(module: nn.Module) -> NormSpec:
    eps = getattr(module, "eps", None)
    eps = module.variance_epsilon if eps is None else eps
    return NormSpec(module.weight.detach().float(), None if getattr(module, "bias", None) is None
                    else module.bias.detach().float(), float(eps))


def _norm_kind(module: nn.Module) -> str | None:
    return getattr(module, "kind", None) or NORM_KINDS.get(type(module).__name__)


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def _layer_reason(name: str, m: nn.Module) -> str | None:
    if not isinstance(m, QuantLinear):
        return f"{name} is not quantized"
    if not m.act_spec.enabled or m.weight_spec.granularity == "input_group":
        return f"{name} has no INT8 activations or uses input-group scales"
    return None


def mlp_activation(module: nn.Module) -> str | None:
    """The step runner's name for an MLP activation module, or None."""
    if type(module).__name__ == "NewGELUActivation":
        return "gelu_new"
    return activation_kind(module)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _model_reason(model: nn.Module, layout) -> str | None:
    config = model.config
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return "it is not a float32 model on the CPU"
    if layout.rotary and _rope_type(config) not in _STATIC_ROPE:
        return f"RoPE type {_rope_type(config)!r}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if _head_dim(config) > MAX_HEAD_DIM:
        return f"head_dim {_head_dim(config)} (the step's attention takes up to {MAX_HEAD_DIM})"
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", None):
        return f"attention implementation {config._attn_implementation!r} (the step runs sdpa's)"
    return None


def _block_reason(block: nn.Module, layout) -> str | None:
    attn = block.get_submodule(layout.qkv[0].rpartition(".")[0])
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return "per-head q / k norms"
    for name in (*layout.qkv, layout.out, *layout.mlp_in, layout.mlp_out):
        reason = _layer_reason(name, block.get_submodule(name))
        if reason:
            return reason
    qkv = [block.get_submodule(n) for n in layout.qkv]
    mlp_in = [block.get_submodule(n) for n in layout.mlp_in]
    if len({m.spec for m in qkv}) != 1 or len({m.spec for m in mlp_in}) != 1:
        return "q / k / v (or gate / up) are quantized differently"
    act = mlp_activation(block.get_submodule(layout.mlp_act))
    if act is None or (len(mlp_in) == 2 and act != "silu"):
        return "its MLP activation is not one the step computes"
    kinds = {_norm_kind(block.get_submodule(n)) for n in (layout.norm1, layout.norm2)}
    if len(kinds) != 1 or None in kinds:
        return "its norms are neither RMSNorm nor LayerNorm"
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot take the fast path, or None."""
    plan = plan_of(model)
    if plan is None:
        return "it is not a zquant-quantized model"
    layout = plan.adapter.decode
    if layout is None:
        return f"the {plan.adapter.name} family has no zquant decode step yet"
    if kernels.runtime_op("decoder", "cpu") is None:
        return "the CPU kernels are not in use"
    reason = _model_reason(model, layout)
    for block in plan.blocks(model):
        reason = reason or _block_reason(block, layout)
    return reason


def _rope_tables(rotary: nn.Module, positions: int) -> tuple[Tensor, Tensor]:
    """cos, sin float32 [positions, head_dim], computed by the model's own rotary module."""
    ids = torch.arange(positions).unsqueeze(0)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), ids)
    return cos[0].contiguous(), sin[0].contiguous()


def decoder_spec(model: nn.Module) -> DecoderSpec:
    plan = plan_of(model)
    layout, config = plan.adapter.decode, model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = _head_dim(config)
    blocks = []
    for block in plan.blocks(model):
        get = block.get_submodule
        attn = get(layout.qkv[0].rpartition(".")[0])
        blocks.append(BlockSpec(_norm_spec(get(layout.norm1)), tuple(get(n) for n in layout.qkv), get(layout.out),
                                _norm_spec(get(layout.norm2)), tuple(get(n) for n in layout.mlp_in),
                                get(layout.mlp_out), mlp_activation(get(layout.mlp_act)),
                                float(getattr(attn, "scaling", head_dim ** -0.5))))
    cos = sin = None
    if layout.rotary:
        cos, sin = _rope_tables(model.get_submodule(layout.rotary), config.max_position_embeddings)
    return DecoderSpec(config.hidden_size, heads, kv_heads, head_dim, _norm_kind(plan.blocks(model)[0].get_submodule(
        layout.norm1)), cos, sin, _norm_spec(model.get_submodule(layout.final_norm)), tuple(blocks))


class FastRunner:
    """Runs a supported quantized decoder (see `unsupported_reason`) through the step runner."""

    name = "fast"

    def __init__(self, model: nn.Module):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fast decode path cannot run this model: {reason}")
        adapter = plan_of(model).adapter
        layout = adapter.decode
        self._embed_name, head_name = adapter.find_embeddings(model)
        self.model = model
        self.context = model.config.max_position_embeddings
        self.decoder = kernels.runtime_op("decoder", "cpu")(decoder_spec(model))
        self.embed_module = model.get_submodule(self._embed_name)     # nn.Embedding, or an INT8 table
        self.positions = model.get_submodule(layout.positions).weight.detach() if layout.positions else None
        head = model.get_submodule(head_name)
        # a float nn.Linear runs in the head kernel; a quantized head (a QuantLinear, or one that reads
        # an INT8 embedding table) runs as it is, through the kernels' dispatch point (per row exact)
        self._head_module = None if isinstance(head, nn.Linear) else head
        self._head_w = None if self._head_module else kernels.runtime_op("head_weight", "cpu")(head.weight)
        self._head_b = None if self._head_module or head.bias is None else head.bias.detach().float()
        self._head_op = kernels.runtime_op("head", "cpu")
        self._built_from = self._weights_now()

    def _weights_now(self) -> tuple:
        plan = plan_of(self.model)
        first = plan.blocks(self.model)[0].get_submodule(plan.adapter.decode.qkv[0])
        embed = self.model.get_submodule(self._embed_name)
        return (*(t.data_ptr() for t in (*embed.parameters(), *embed.buffers())), first.qweight.data_ptr(),
                first.wscale.data_ptr(), kernels.runtime_op("decoder", "cpu") is not None)

    def current(self) -> bool:
        """Whether the model still has the weights (and backend) this runner was built from."""
        return plan_of(self.model) is not None and self._weights_now() == self._built_from

    def reserve(self, slots: int, max_len: int, kv_cache: str = "fp", attention: str = "zquant") -> None:
        """A KV cache for ``slots`` sequences of up to ``max_len`` tokens each: float32 (``"fp"``) or
        INT8 with one scale per token per head (``"int8"``, a quarter of the memory). ``attention``:
        zquant's kernel (``"zquant"``), or torch's SDPA (``"sdpa"``, slower; with a float32 cache the
        hidden states are bit-identical to the model's own forward)."""
        self.decoder.reserve(slots, max_len, kv_cache == "int8")
        self.decoder.use_sdpa(attention == "sdpa")

    def logits(self, rows: Tensor) -> Tensor:
        """float32 [S, V] logits of the final-normed rows [S, H]."""
        if self._head_module is not None:
            return self._head_module(rows).float()
        out = self._head_op(rows, self._head_w)
        return out if self._head_b is None else out + self._head_b

    @torch.no_grad()
    def forward(self, seqs: list[tuple[int, int, list[int]]]) -> Tensor:
        """Append tokens to sequences, ``(slot, start position, new token ids)`` each; returns the
        logits after each sequence's last new token, float32 [S, V]."""
        ids = torch.tensor([t for _, _, toks in seqs for t in toks], dtype=torch.long)
        table = torch.tensor([(slot, start, len(toks)) for slot, start, toks in seqs], dtype=torch.long)
        return self.logits(self.decoder.step(self.embed_tokens(ids, seqs), table, False))

    def embed_tokens(self, ids: Tensor, seqs: list[tuple[int, int, list[int]]]) -> Tensor:
        """The step's input rows float32 [T, H]: token embeddings (+ absolute position embeddings)."""
        x = self.embed_module(ids).float()
        if self.positions is None:
            return x
        pos = torch.tensor([start + i for _, start, toks in seqs for i in range(len(toks))], dtype=torch.long)
        return x + F.embedding(pos, self.positions)
