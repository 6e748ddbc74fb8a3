"""What a backend needs to build a whole-model decode step (`zquant.generate`'s fast path).

Plain data gathered from a quantized model by `zquant.generate.fast`; a backend that offers the
``"decoder"`` operation turns a `DecoderSpec` into an object with ``reserve(slots, max_len)``
(allocate the KV cache), ``step(x, seqs, all_rows)`` (run every block for the new tokens of some
sequences) and ``cache(block)``; see csrc/decode.cpp for the CPU one.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class NormSpec:
    weight: Tensor               # float32 [H]
    bias: Tensor | None
    eps: float


@dataclass(frozen=True)
class BlockSpec:
    """One pre-norm block: ``x += out(attn(rope(qkv(norm1(x)))))``, ``x += down(act(gate(n)) * up(n))``,
    ``n = norm2(x)``; the linear layers are `zquant.modules.QuantLinear`s."""
    norm1: NormSpec
    qkv: tuple                   # (q, k, v) layers, run as one GEMM
    out: object
    norm2: NormSpec
    gate: object
    up: object
    down: object
    act: str                     # the gated activation ("silu")


@dataclass(frozen=True)
class DecoderSpec:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    norm_kind: str               # "rms" or "layer"
    scaling: float               # attention's softmax scale
    cos: Tensor | None           # RoPE tables float32 [positions, head_dim], as the model computes them
    sin: Tensor | None
    final_norm: NormSpec
    blocks: tuple[BlockSpec, ...]
