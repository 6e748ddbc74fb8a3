"""What a backend needs to build a whole-model decode step (`zquant.generate`'s fast path).

Plain data gathered from a quantized model by `zquant.generate.fast`; a backend that offers the
``"decoder"`` operation turns a `DecoderSpec` into an object with ``reserve(slots, max_len)``
(allocate the KV cache), ``step(x, seqs, all_rows)`` (run every block for the new tokens of some
sequences) and ``cache(block)``; see csrc/decode.cpp for the CPU one.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

# The largest head_dim a backend's decode step takes (the CPU one: csrc/attention.cpp's register
# budget, exported by the extension as MAX_HEAD_DIM; a test checks they agree).
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class NormSpec:
    weight: Tensor               # float32 [H]
    bias: Tensor | None
    eps: float


@dataclass(frozen=True)
class BlockSpec:
    """One pre-norm block: ``x += out(attn(rope(qkv(norm1(x)))))``, then with ``n = norm2(x)``
    ``x += down(act(gate(n)) * up(n))`` (gated: ``mlp_in`` = (gate, up)) or ``x += down(act(up(n)))``.
    The linear layers are `zquant.modules.QuantLinear`s."""
    norm1: NormSpec
    qkv: tuple                   # (q, k, v) layers run as one GEMM, or one layer computing all three
    out: object
    norm2: NormSpec
    mlp_in: tuple                # (gate, up) or (up,)
    down: object
    act: str                     # "silu" (gated), or relu / gelu / gelu_tanh / gelu_new / silu
    scaling: float               # attention's softmax scale


@dataclass(frozen=True)
class DecoderSpec:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    norm_kind: str               # "rms" or "layer"
    cos: Tensor | None           # RoPE tables float32 [positions, head_dim], as the model computes them
    sin: Tensor | None           # (None: no RoPE)
    final_norm: NormSpec
    blocks: tuple[BlockSpec, ...]
